"""Curvature of a loss: Hessian-vector products, trace/eigenvalue/density estimators, thresholds.

This is the pure measurement layer behind ``HessianMonitor``: plain torch, no Lightning. Every
function takes

* ``loss_fn``: a callable mapping a dict ``name -> tensor`` of parameters to a scalar loss, e.g.
  ``lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)``;
* ``params``: such a dict, e.g. ``{k: v for k, v in model.named_parameters()}``. Its iteration
  order fixes the order of the *flattened* parameter vector θ ∈ ℝⁿ that the flat API
  (:class:`HessianOperator`) works on.

Nothing here changes what it measures: the dict ``loss_fn`` is differentiated at holds fresh leaf
tensors (detached from ``params``), gradients are taken with ``torch.autograd.grad`` (``.grad`` is
never written), probes come from an own ``torch.Generator``, and every evaluation of ``loss_fn``
runs under ``torch.random.fork_rng`` so the global RNG streams are restored afterwards and every
probe of one estimate sees the same dropout mask. ``loss_fn`` itself must not mutate state: for
BatchNorm in train mode pass copies of the buffers
(``functional_call(model, (p, {k: b.clone() for k, b in buffers.items()}), x)``).

Attention: PyTorch's fused scaled-dot-product-attention kernels (CPU flash attention, CUDA flash
and memory-efficient attention) have neither a double-backward nor a forward-mode AD rule, so
every evaluation here runs under ``sdpa_kernel(SDPBackend.MATH)``, the composite backend that has
both.

Conventions
-----------
* A *probe batch* of vectors is either a flat tensor of shape ``(k, n)`` (one probe per row) or a
  dict with the keys of ``params`` whose tensors have shape ``(k, *param.shape)`` (a leading
  probe dimension). A single vector is a flat ``(n,)`` tensor or a dict shaped like ``params``.
* "Top eigenvalue" means the largest *algebraic* eigenvalue λ_max (the sharpness of the
  stability literature), not the largest magnitude: on a spectrum like {-10, 1} it is 1.

Modules
-------
* :mod:`.operator`: :class:`HessianOperator` (routes, fallback, memory-bounded passes), :func:`hvp`,
  the route names (:data:`Route`, :data:`ROUTES`, :data:`EXPLICIT_ROUTES`, :data:`TUNING_PROBES`);
  :mod:`.routes`: how each route computes its products, :func:`finite_difference_step`;
  :mod:`.errors`: :class:`CurvatureError`, :class:`CurvatureMemoryError`,
  :class:`CurvatureFallbackWarning`.
* :mod:`.memory`: :class:`MemoryMeter` (:class:`CudaMemoryMeter`, :class:`RssMemoryMeter`,
  :func:`memory_meter`) and :class:`MemoryLimit`; :mod:`.passes`: the plan of memory-bounded
  passes (samples per micro-batch, probes per pass).
* :mod:`.microbatch`: :class:`MicroBatchLoss`, a batch-mean loss split into micro-batches whose
  weighted Hessians sum to the batch's.
* :mod:`.trace`: :class:`Estimate`, :func:`hutchinson_trace` (with per-block traces),
  :func:`hutchpp_trace`, :func:`parameter_blocks` (the blocks ``hutchinson_trace`` splits into),
  :data:`BLOCK_RULES`, :data:`OTHER_BLOCK`.
* :mod:`.lanczos`: :class:`Eigen`, :func:`top_eigenvalue` (Lanczos, optionally preconditioned).
* :mod:`.density`: :class:`SpectralDensity`, :func:`spectral_density` (stochastic Lanczos
  quadrature), :func:`spectrum_histogram` (its point masses as histogram buckets),
  :func:`smoothed_density`.
* :mod:`.preconditioner`: :func:`adam_preconditioner` (Adam's diagonal P, for the preconditioned
  sharpness).
* :mod:`.thresholds`: :func:`gd_sharpness_threshold`, :func:`momentum_sharpness_threshold`,
  :func:`sgd_trace_threshold`, :func:`adam_sharpness_threshold`, and those of the optimizer in use
  (``stability``, ``nesterov_sharpness_threshold``).

The names in ``__all__`` are importable from ``dynlens.curvature``; everything else from the
module that defines it.
"""

from __future__ import annotations

from .density import SpectralDensity, smoothed_density, spectral_density, spectrum_histogram
from .errors import CurvatureError, CurvatureFallbackWarning, CurvatureMemoryError
from .lanczos import Eigen, top_eigenvalue
from .memory import CudaMemoryMeter, MemoryLimit, MemoryMeter, RssMemoryMeter, memory_meter
from .microbatch import MicroBatchLoss
from .operator import EXPLICIT_ROUTES, ROUTES, TUNING_PROBES, HessianOperator, Route, hvp
from .preconditioner import adam_preconditioner
from .routes import finite_difference_step
from .thresholds import (
    adam_sharpness_threshold,
    gd_sharpness_threshold,
    momentum_sharpness_threshold,
    sgd_trace_threshold,
)
from .trace import (
    BLOCK_RULES,
    OTHER_BLOCK,
    Blocks,
    Estimate,
    hutchinson_trace,
    hutchpp_trace,
    parameter_blocks,
)

__all__ = [
    "BLOCK_RULES",
    "EXPLICIT_ROUTES",
    "OTHER_BLOCK",
    "ROUTES",
    "TUNING_PROBES",
    "Blocks",
    "CudaMemoryMeter",
    "CurvatureError",
    "CurvatureFallbackWarning",
    "CurvatureMemoryError",
    "Eigen",
    "Estimate",
    "HessianOperator",
    "MemoryLimit",
    "MemoryMeter",
    "MicroBatchLoss",
    "Route",
    "RssMemoryMeter",
    "SpectralDensity",
    "adam_preconditioner",
    "adam_sharpness_threshold",
    "finite_difference_step",
    "gd_sharpness_threshold",
    "hutchinson_trace",
    "hutchpp_trace",
    "hvp",
    "memory_meter",
    "momentum_sharpness_threshold",
    "parameter_blocks",
    "sgd_trace_threshold",
    "smoothed_density",
    "spectral_density",
    "spectrum_histogram",
    "top_eigenvalue",
]
