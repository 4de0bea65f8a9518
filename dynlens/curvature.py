"""Curvature of a loss: Hessian-vector products, trace and top-eigenvalue estimators, thresholds.

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
"""

from __future__ import annotations

import contextlib
import gc
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "ROUTES",
    "TUNING_PROBES",
    "CudaMemoryMeter",
    "CurvatureError",
    "CurvatureFallbackWarning",
    "CurvatureMemoryError",
    "Eigen",
    "Estimate",
    "HessianOperator",
    "MemoryLimit",
    "MemoryMeter",
    "RssMemoryMeter",
    "adam_preconditioner",
    "adam_sharpness_threshold",
    "finite_difference_step",
    "gd_sharpness_threshold",
    "hutchinson_trace",
    "hutchpp_trace",
    "hvp",
    "memory_meter",
    "momentum_sharpness_threshold",
    "sgd_trace_threshold",
    "top_eigenvalue",
]

LossFn = Callable[[dict[str, Tensor]], Tensor]
Route = Literal[
    "auto",
    "tuned",
    "double_backward",
    "batched_double_backward",
    "forward_over_reverse",
    "vmap_forward_over_reverse",
    "finite_difference",
]

#: The concrete Hessian-vector-product routes, in the order "auto" falls back through on CPU.
ROUTES: tuple[str, ...] = ("double_backward", "vmap_forward_over_reverse", "forward_over_reverse")
#: Every route ``route=`` accepts besides "auto": ROUTES and the ones outside the fallback order
#: (``"finite_difference"`` approximates; it is never chosen by "auto" but by name, or by
#: ``HessianMonitor`` where the exact routes fail or do not fit in memory).
EXPLICIT_ROUTES: tuple[str, ...] = (*ROUTES, "batched_double_backward", "finite_difference")

#: Probes in the first batch from which ``route="tuned"`` on CPU times the two double-backward
#: routes against each other (one product builds the graph, two are timed one at a time, the
#: rest, up to eight, in one vectorised pass).
TUNING_PROBES = 5
_TRIAL_SEQUENTIAL, _TRIAL_BATCHED, _BATCHED_MARGIN = 2, 8, 0.9

# Reasons already warned about, so a fallback that repeats every measurement warns once per process.
_WARNED: set[tuple[str, ...]] = set()

# `once_differentiable` wraps every backward in the same closure; its code object identifies it.
_ONCE_DIFFERENTIABLE_CODE = once_differentiable(lambda ctx, *grads: grads).__code__

_OOM_ERRORS: tuple[type[BaseException], ...] = (
    (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ()
)


class CurvatureError(RuntimeError):
    """No Hessian-vector-product route can differentiate this loss (the message says why)."""


class CurvatureMemoryError(CurvatureError):
    """Not even one product per pass fits under the :class:`MemoryLimit` (or the device ran out
    of memory at one probe per pass); what the measurement held has been freed."""


class CurvatureFallbackWarning(UserWarning):
    """A route failed (an op lacks a double-backward or forward-AD rule); another one was used."""


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate with its standard error.

    Attributes:
        value: the estimate (e.g. of tr(H)).
        stderr: estimated standard error of ``value``: sample std of the per-probe terms / √m.
            ``nan`` when it cannot be estimated (a single stochastic probe).
        num_probes: Hessian-vector products spent.
        frobenius: estimate of ‖H‖_F where the estimator provides one (Hutchinson), else None.
        route: the Hessian-vector-product route that produced it (pass it back as ``route=``
            to skip a failing route next time).
        product_error: on the ``"finite_difference"`` route, the estimated relative error of
            its products (:attr:`HessianOperator.finite_difference_error`); ``None`` on the
            exact routes.
    """

    value: float
    stderr: float
    num_probes: int
    frobenius: float | None = None
    route: str | None = None
    product_error: float | None = None


@dataclass(frozen=True)
class Eigen:
    """An eigenpair from :func:`top_eigenvalue`.

    Attributes:
        value: the Ritz value, the estimate of λ_max.
        vector: the unit-norm Ritz vector as a dict shaped like ``params`` (norm taken over all
            entries together). With a preconditioner it is the eigenvector of P^{-1/2} H P^{-1/2}.
            Pass it back as ``init=`` to warm-start the next call.
        converged: whether the residual ‖A x − λ x‖ fell to ``tol · |λ|`` within ``max_iter``.
        iterations: Hessian-vector products spent (one per Lanczos step).
        residual: the final residual ‖A x − λ x‖ of the returned pair.
        route: the Hessian-vector-product route used.
        product_error: as :attr:`Estimate.product_error`.
    """

    value: float
    vector: dict[str, Tensor] = field(compare=False, repr=False)
    converged: bool
    iterations: int = 0
    residual: float = math.nan
    route: str | None = None
    product_error: float | None = None


# --------------------------------------------------------------------------------------------
# Memory: meters and the limit that products are planned under
# --------------------------------------------------------------------------------------------


class MemoryMeter:
    """Reads the memory in use and the peak since the last reset, in bytes.

    Subclasses implement :meth:`in_use`, :meth:`reset_peak` and :meth:`peak`; :meth:`measure`
    runs one pass of products between a reset and a reading. Inject a fake one (overriding
    :meth:`measure`) to test what happens when memory binds, e.g. an out-of-memory error.
    """

    #: False where the platform offers nothing to read: products then run one probe per pass.
    available: bool = True

    def in_use(self) -> int:
        raise NotImplementedError

    def reset_peak(self) -> None:
        raise NotImplementedError

    def peak(self) -> int:
        raise NotImplementedError

    def measure(self, fn: Callable[[], Tensor], probes: int) -> tuple[Tensor, int]:
        """Run ``fn`` (a pass of ``probes`` products) and return its result and the peak of the
        memory in use while it ran."""
        self.reset_peak()
        out = fn()
        return out, self.peak()


class CudaMemoryMeter(MemoryMeter):
    """The CUDA caching allocator's counters: ``memory_allocated`` and ``max_memory_allocated``.

    :meth:`reset_peak` calls ``torch.cuda.reset_peak_memory_stats``: a run that reads
    ``max_memory_allocated`` itself sees the peak since the last measurement, not since start.
    """

    def __init__(self, device: torch.device | int | None = None) -> None:
        self.device = device

    def in_use(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))


class RssMemoryMeter(MemoryMeter):
    """The process's resident set size (Linux ``/proc/self/status``: ``VmRSS``, ``VmHWM``).

    A measured peak, not an estimate: writing ``5`` to ``/proc/self/clear_refs`` resets the
    high-water mark ``VmHWM`` (Linux ≥ 4.0). It counts everything the process holds (the
    interpreter and libraries too, and memory the C allocator keeps after a free), so limits
    relative to training's peak are relative to the whole process. Unavailable elsewhere.
    """

    _FIELD = re.compile(rb"(VmRSS|VmHWM):\s+(\d+) kB")

    def __init__(self) -> None:
        try:
            self._read()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.available = False

    def _read(self) -> dict[bytes, int]:
        with open("/proc/self/status", "rb") as f:
            return {k: int(v) * 1024 for k, v in self._FIELD.findall(f.read())}

    def in_use(self) -> int:
        return self._read().get(b"VmRSS", 0) if self.available else 0

    def reset_peak(self) -> None:
        if self.available:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        return self._read().get(b"VmHWM", 0) if self.available else 0


def memory_meter(device: torch.device | str) -> MemoryMeter:
    """The meter for ``device``: :class:`CudaMemoryMeter` on CUDA, else :class:`RssMemoryMeter`."""
    device = torch.device(device)
    if device.type == "cuda":
        return CudaMemoryMeter(device)
    return RssMemoryMeter()


class MemoryLimit:
    """A ceiling on the memory in use while curvature is measured, and the plan that keeps to it.

    ``limit`` is absolute: the peak of the memory in use as ``meter`` counts it (on CUDA the
    allocator's bytes, on CPU the process's RSS) must stay at or below it during every pass of
    products. Before a pass the headroom is ``limit − in_use()`` (what the caller and the
    measurement already hold, e.g. a Lanczos basis, counts against it). Each pass of k probes on a
    route is metered and its increment (peak − in use before) recorded; the plan models

        increment(k) = fixed + k · per_probe

    from the recorded passes (one pass: per_probe = increment / k, fixed 0, the worst case; two
    pass sizes or more: the line through the smallest and the largest, slope ≥ 0), and a pass
    takes the largest k whose prediction is within ``margin`` × headroom. Nothing known about a
    route: one probe per pass (or the prediction of a route named ``like``, e.g. the batched
    double backward from the one-at-a-time one). One probe predicted not to fit raises
    :class:`CurvatureMemoryError` before the pass runs.

    Out of memory (``torch.OutOfMemoryError``) inside a pass: the operator frees what it held,
    the plan caps the route at half the probes and the pass is retried; at one probe per pass it
    raises :class:`CurvatureMemoryError`. The shared gradient graph of the double-backward routes
    is metered on its own when it is built (it is held, so later passes see it as in use).

    A limit learns across operators: pass one object to every call for a model (``HessianMonitor``
    keeps one per run).

    Args:
        limit: bytes, the peak not to exceed.
        meter: what reads memory; default :func:`memory_meter` of the first operator's device.
        margin: the fraction of the headroom a predicted pass may take (measured peaks vary).
    """

    def __init__(self, limit: int, *, meter: MemoryMeter | None = None, margin: float = 0.9):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(
                f"Expected `limit` to be a positive number of bytes, e.g. 8 * 2**30, got {limit!r}"
            )
        if not 0 < margin <= 1:
            raise ValueError(f"Expected `margin` in (0, 1], got {margin!r}")
        self.limit = limit
        self.meter = meter
        self.margin = float(margin)
        #: Highest peak metered under this limit so far (bytes; 0 before any pass).
        self.peak_seen = 0
        #: Passes that ran out of memory, as (route, probes).
        self.out_of_memory: list[tuple[str, int]] = []
        self._passes: dict[str, dict[int, int]] = {}
        self._cap: dict[str, int] = {}

    def bind(self, device: torch.device) -> MemoryMeter:
        if self.meter is None:
            self.meter = memory_meter(device)
        return self.meter

    def headroom(self) -> int:
        assert self.meter is not None
        return self.limit - self.meter.in_use()

    def predict(self, route: str, probes: int, like: str | None = None) -> float | None:
        """Predicted increment of a pass of ``probes`` on ``route`` (``None``: nothing known)."""
        seen = self._passes.get(route) or (self._passes.get(like) if like else None)
        if not seen:
            return None
        small, large = min(seen), max(seen)
        if small == large:
            per, fixed = seen[small] / small, 0.0
        else:
            per = max((seen[large] - seen[small]) / (large - small), 0.0)
            fixed = max(seen[small] - per * small, 0.0)
        return fixed + per * probes

    def probes_per_pass(self, route: str, requested: int, like: str | None = None) -> int:
        """How many of ``requested`` probes the next pass on ``route`` takes: ≥ 1, or 0 when
        not even one is predicted to fit."""
        assert self.meter is not None
        cap = max(1, min(requested, self._cap.get(route, requested)))
        one = self.predict(route, 1, like)
        if one is None or not self.meter.available:
            return 1  # nothing known (or nothing to read): one probe at a time
        room = self.margin * self.headroom()
        if one > room:
            return 0
        per = self.predict(route, 2, like) - one  # type: ignore[operator]
        if per <= 0:
            return cap
        return max(1, min(cap, int((room - one) // per) + 1))

    def record(self, route: str, probes: int, before: int, peak: int) -> None:
        self.peak_seen = max(self.peak_seen, peak)
        seen = self._passes.setdefault(route, {})
        seen[probes] = max(seen.get(probes, 0), max(peak - before, 0))

    def failed(self, route: str, probes: int) -> int:
        """Record an out-of-memory pass; the probes per pass to retry with (0: none left)."""
        self.out_of_memory.append((route, probes))
        retry = probes // 2
        self._cap[route] = max(retry, 1)
        return retry

    def state_dict(self) -> dict[str, object]:
        return {
            "limit": self.limit,
            "passes": {r: dict(v) for r, v in self._passes.items()},
            "cap": dict(self._cap),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.limit = int(state.get("limit", self.limit))  # type: ignore[call-overload]
        passes = state.get("passes", {})
        cap = state.get("cap", {})
        self._passes = {str(r): {int(k): int(b) for k, b in v.items()} for r, v in passes.items()}  # type: ignore[union-attr]
        self._cap = {str(r): int(k) for r, k in cap.items()}  # type: ignore[union-attr]


def finite_difference_step(theta_norm: float, probe_norm: float, dtype: torch.dtype) -> float:
    """ε of the central difference Hv ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε.

    ε = ¼ · u^{1/3} · (1 + ‖θ‖) / ‖v‖ with u the unit roundoff of ``dtype``. The central
    difference's truncation error is (ε²/6)·∇³L[v, v, ·] = O(ε²‖v‖²) and the rounding error of
    the two gradients, each accurate to about u·‖∇L‖, divided by 2ε, is O(u/ε): their sum is
    smallest at ε ∝ u^{1/3} (the forward difference's √u does not apply to the central one). The
    factor (1 + ‖θ‖)/‖v‖ makes the perturbation's norm ε‖v‖ a fixed fraction of the parameters'
    scale (0.12% in float32, 1.5e-6 in float64) whatever the probe's norm, so that for a probe
    with entries ±1 each parameter moves by the same fraction of their root-mean-square. The
    constant ¼ is measured, not derived: against exact products the error was smallest between
    0.1 and 0.3 × u^{1/3}(1 + ‖θ‖) on a tanh MLP, a LayerNorm-GELU MLP and a GPT-2-shaped model
    (float32 and float64), and about ten times larger at 1 (``benchmarks/scale.py``).

        >>> round(finite_difference_step(99.0, 10.0, torch.float32), 6)
        0.012304
    """
    if not probe_norm > 0:
        raise ValueError("Expected a non-zero probe")
    return 0.25 * float(torch.finfo(dtype).eps) ** (1.0 / 3.0) * (1.0 + theta_norm) / probe_norm


# --------------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------------


class HessianOperator:
    """The Hessian H = ∇²L(θ) of ``loss_fn`` at ``params`` as a linear operator on ℝⁿ.

    ``op @ V`` (or ``op.matmul(V)``) returns H·v for a flat vector ``V`` of shape ``(n,)`` or for
    every row of a probe batch of shape ``(k, n)``. One operator is one point θ: the double-backward
    route builds the gradient graph ∇L(θ) (with ``create_graph=True``) on first use and keeps it, so
    any number of products, over any number of calls, pay for one forward and one backward pass
    once and for one extra backward pass each. This is what makes the estimators below cheap:
    they build one operator per estimate.

    Routes (``route=``):

    * ``"double_backward"``: Hv = ∇_θ(∇L(θ)·v), one ``torch.autograd.grad`` per probe through the
      shared graph. About 2.1× a gradient per probe on CPU, 2.0-2.25× on an H200.
    * ``"batched_double_backward"``: the same products, all probes of a batch (``chunk_size``
      of the estimators) in one backward pass vectorised with ``vmap`` (``is_grads_batched``).
      It pays off where per-pass overhead dominates and costs where memory traffic does: a
      1,354-parameter tanh MLP on 200 samples, 1.4-3× faster than ``"double_backward"``; a small
      Transformer 1.24-1.31× a gradient per probe instead of 1.79×; but the grokking MLP
      (5,107 × 200 activations) 3.67× instead of 1.79×, and activation memory grows with the
      batch. Chosen by name, or on CPU by ``"tuned"``'s timed trial; when an op cannot be
      vectorised it runs one probe at a time, with the same results.
    * ``"forward_over_reverse"``: Hv = ``torch.func.jvp(torch.func.grad(L), θ, v)``, one probe at a
      time; nothing is shared between probes (3.0-3.8× a gradient each).
    * ``"vmap_forward_over_reverse"``: the same, vectorised over the probes with ``torch.func.vmap``
      (2.8-4.5× on CPU, 1.85-2.06× on an H200).
    * ``"finite_difference"``: central differences of gradients at perturbed *copies* of θ,
      Hv ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε with ε from :func:`finite_difference_step`, one probe
      at a time: two gradients (about 2× a training step's forward and backward) and the memory
      of one gradient, with no second-derivative rule needed, so it works through
      ``@once_differentiable`` Functions, fused attention kernels and compiled graphs where the
      exact routes fail. An approximation: on a tanh MLP its products were within 4e-5 of the
      exact ones relative to ‖Hv‖ in float32 and within 1e-10 in float64 (``tests/
      test_curvature.py`` holds them to 1e-3 and 1e-8). θ is never perturbed in place
      (``θ + εv − εv`` need not round back to θ). Chosen by name only; ``"auto"`` never
      approximates.
    * ``"auto"`` (default): double backward on CPU, vmapped forward-over-reverse on CUDA. When the
      chosen route fails (an op without a double-backward or forward-mode AD rule), the next one
      is tried, in the order of :data:`ROUTES`, with one :class:`CurvatureFallbackWarning` per
      distinct reason; :class:`CurvatureError` lists every failure when none works. An explicit
      route never falls back.
    * ``"tuned"``: ``"auto"``, except that on CPU, where which of the two double-backward routes
      is faster depends on the model (see above), the first batch of at least
      :data:`TUNING_PROBES` probes is a timed trial: two of its products one at a time, up to
      eight more in one vectorised pass; the operator keeps the route that was faster per probe
      (the vectorised one only when at least 10% faster; where the two are close, as on a small
      Transformer, runs may keep either). The trial's products are part of the result; it costs
      the difference on the slower route's share of them (on the grokking MLP a first call is
      2.2× a gradient per probe, later ones 1.8×). :attr:`route` then names the route kept,
      which callers building many operators for one model pass on to skip the trial
      (``HessianMonitor`` does). Opt-in like ``torch.backends.cudnn.benchmark``: a choice made
      by the clock can differ between calls and runs, and so can the results' last bits, where
      ``"auto"`` gives bit-identical results for identical calls.

    A custom ``torch.autograd.Function`` whose backward is ``@once_differentiable`` is refused with
    :class:`CurvatureError` before any product: double backward cannot pass through it, and
    ``torch.func`` transforms would return wrong (zero) second derivatives through it silently.
    To find such Functions the ``torch.func`` routes spend one extra forward pass per operator.

    Args:
        loss_fn: dict ``name -> tensor`` → scalar loss.
        params: the point θ; floating tensors of one dtype on one device.
        route: see above.
        chunk_size: probes per ``vmap`` call (bounds its memory); ``None`` vectorises all at once.
        memory: a :class:`MemoryLimit`: every pass of products is metered and planned so that the
            memory in use stays within it (a batch is split into passes of as many probes as fit,
            one at first), and out-of-memory is retried with half the probes per pass. ``None``
            (default): no metering, a batch in one pass as described above.

    Example:
        >>> import torch
        >>> from dynlens.curvature import HessianOperator
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> op = HessianOperator(lambda p: 0.5 * p["w"] @ a @ p["w"],
        ...                      {"w": torch.zeros(2, dtype=torch.float64)})
        >>> (op @ torch.eye(2, dtype=torch.float64)).tolist()   # H = a
        [[2.0, 1.0], [1.0, 3.0]]
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: Mapping[str, Tensor],
        *,
        route: Route = "auto",
        chunk_size: int | None = None,
        memory: MemoryLimit | None = None,
    ) -> None:
        if torch.is_inference_mode_enabled():
            raise CurvatureError(
                "curvature cannot be measured under torch.inference_mode(): call it outside the "
                "inference-mode block (e.g. from on_train_batch_end, not from validation)"
            )
        if not isinstance(params, Mapping) or not params:
            raise ValueError(
                "Expected `params` to be a non-empty dict name -> tensor, e.g. "
                "dict(model.named_parameters())"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(
                f"Expected `chunk_size` to be a positive int or None, got {chunk_size}"
            )
        first = next(iter(params.values()))
        for name, p in params.items():
            if not isinstance(p, Tensor) or not p.is_floating_point():
                raise TypeError(f"Expected params[{name!r}] to be a floating-point tensor")
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"Expected every parameter to share one dtype and device; params[{name!r}] is "
                    f"{p.dtype} on {p.device}, the first is {first.dtype} on {first.device}. Pass "
                    "one group at a time"
                )
        self.loss_fn = loss_fn
        self.names: tuple[str, ...] = tuple(params)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for p in params.values())
        self.numels: tuple[int, ...] = tuple(p.numel() for p in params.values())
        self.numel: int = sum(self.numels)
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.chunk_size = chunk_size
        # Detached views (no copy); inference tensors must be cloned to become differentiable.
        self._primals = {
            k: (p.detach().clone() if p.is_inference() else p.detach()) for k, p in params.items()
        }
        self._candidates = _candidate_routes(route, self.device)
        self._tuning = route == "tuned" and self.device.type == "cpu"
        self._index = 0
        self._failures: list[tuple[str, BaseException]] = []
        self._graph: tuple[list[Tensor], Tensor] | None = None
        self._vectorisable = True
        self._checked = False
        self._theta_norm: float | None = None
        #: ``route="finite_difference"``: the estimated relative error of its products (see
        #: :meth:`_self_check`), set by the first product; ``None`` on the exact routes.
        self.finite_difference_error: float | None = None
        self.memory = memory
        if memory is not None:
            memory.bind(self.device)

    @property
    def route(self) -> str:
        """The route the next product will use (after any fallback so far)."""
        return self._candidates[self._index]

    # flat <-> dict ----------------------------------------------------------------------------

    def flatten(self, tensors: Mapping[str, Tensor], *, batched: bool = False) -> Tensor:
        """Concatenate a dict shaped like ``params`` (with a leading probe dim if ``batched``)."""
        if set(tensors) != set(self.names):
            raise ValueError(
                f"Expected the keys of `params` {sorted(self.names)}, got {sorted(tensors)}"
            )
        lead = 1 if batched else 0
        pieces = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = tensors[name]
            if tuple(t.shape[lead:]) != tuple(shape):
                raise ValueError(
                    f"Expected {name!r} of shape {'(k, ' if batched else '('}"
                    f"{', '.join(map(str, shape))}), got {tuple(t.shape)}"
                )
            pieces.append(t.reshape(*t.shape[:lead], -1))
        return torch.cat(pieces, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(..., n)`` tensor into a dict shaped like ``params`` (views)."""
        lead = flat.shape[:-1]
        return {
            name: piece.reshape(*lead, *shape)
            for name, shape, piece in zip(
                self.names, self.shapes, flat.split(self.numels, dim=-1), strict=True
            )
        }

    # products ---------------------------------------------------------------------------------

    def __matmul__(self, vectors: Tensor) -> Tensor:
        return self.matmul(vectors)

    def matmul(self, vectors: Tensor) -> Tensor:
        """H·v for a flat ``(n,)`` vector, or for each row of a ``(k, n)`` probe batch."""
        if vectors.ndim not in (1, 2) or vectors.shape[-1] != self.numel:
            raise ValueError(
                f"Expected a flat vector of shape ({self.numel},) or a probe batch of shape "
                f"(k, {self.numel}), got {tuple(vectors.shape)}"
            )
        batch = vectors.reshape(-1, self.numel).to(device=self.device, dtype=self.dtype)
        while True:
            route = self.route
            try:
                out = (
                    self._apply(route, batch)
                    if self.memory is None
                    else self._planned(route, batch)
                )
            except _OOM_ERRORS:
                raise
            except CurvatureError:
                raise
            except (RuntimeError, NotImplementedError) as err:
                self._failures.append((route, err))
                self._graph = None
                if self._index + 1 == len(self._candidates):
                    raise CurvatureError(self._failure_message()) from err
                self._index += 1
                continue
            if self._failures:
                self._warn_fallback()
            return out[0] if vectors.ndim == 1 else out

    def _apply(self, route: str, batch: Tensor) -> Tensor:
        if route == "double_backward" and self._tuning and len(batch) >= TUNING_PROBES:
            return self._tune(batch)
        if route in ("double_backward", "batched_double_backward"):
            return self._double_backward(batch, batched=route == "batched_double_backward")
        if route == "finite_difference":
            return self._finite_difference(batch)
        if not self._checked:
            self._check_once_differentiable()
        if route == "forward_over_reverse":
            return torch.stack([self._jvp_of_grad(self.unflatten(v)) for v in batch])
        return self._vmap_jvp_of_grad(batch)

    def _tune(self, batch: Tensor) -> Tensor:
        # The first product builds the shared gradient graph, so the timed ones compare the
        # products alone. Wall-clock time is the right clock: this runs on the CPU only.
        first = self._run("double_backward", batch[:1])
        split = 1 + _TRIAL_SEQUENTIAL
        start = time.perf_counter()
        sequential = self._run("double_backward", batch[1:split])
        per_probe = (time.perf_counter() - start) / _TRIAL_SEQUENTIAL
        size = _TRIAL_BATCHED
        if self.memory is not None:
            # The trial obeys the limit too: as many probes as the one-at-a-time passes say fit
            # in one vectorised pass (each probe of it costs at most one such pass).
            size = self.memory.probes_per_pass(
                "batched_double_backward", _TRIAL_BATCHED, like="double_backward"
            )
        self._tuning = False
        parts = [first, sequential]
        trial = batch[split : split + size] if size >= 2 else batch[:0]
        if len(trial):
            start = time.perf_counter()
            # (a vectorised pass that fails, e.g. a CPU allocation for every probe at once, runs
            # probe by probe inside and is not kept)
            parts.append(self._run("batched_double_backward", trial))
            per_probe_batched = (time.perf_counter() - start) / len(trial)
            if self._vectorisable and per_probe_batched < _BATCHED_MARGIN * per_probe:
                self._candidates[self._index] = "batched_double_backward"
        rest = batch[split + len(trial) :]
        if len(rest):
            parts.append(self._run(self.route, rest))
        return torch.cat(parts)

    def _run(self, route: str, batch: Tensor) -> Tensor:
        """``batch`` on ``route``: planned under the memory limit when there is one."""
        if self.memory is None:
            return self._apply(route, batch)
        return self._planned(route, batch)

    # memory-bounded passes -------------------------------------------------------------------

    def _planned(self, route: str, batch: Tensor) -> Tensor:
        memory = self.memory
        assert memory is not None
        if route in ("double_backward", "batched_double_backward") and self._graph is None:
            self._metered(f"{route}:graph", 1, lambda: self._build_graph(), retry=False)
        if route == "double_backward" and self._tuning and len(batch) >= TUNING_PROBES:
            return self._tune(batch)
        # Before its first pass, a vectorised route is predicted from its one-at-a-time twin:
        # each of its probes costs at most one such pass.
        like = {"batched_double_backward": "double_backward"}.get(route)
        parts, start = [], 0
        while start < len(batch):
            probes = memory.probes_per_pass(route, len(batch) - start, like=like)
            if probes == 0:
                self._free(drop_graph=True)
                raise CurvatureMemoryError(self._memory_message(route))
            rows = batch[start : start + probes]
            out = self._metered(route, probes, lambda rows=rows: self._apply(route, rows))
            if out is None:  # out of memory: the plan now caps the route lower; retry
                continue
            parts.append(out)
            start += probes
        return torch.cat(parts) if parts else batch.clone()

    def _metered(
        self, route: str, probes: int, fn: Callable[[], Tensor], *, retry: bool = True
    ) -> Tensor | None:
        """Run one pass under the meter and record its increment; ``None`` after an
        out-of-memory error that a smaller pass may avoid."""
        memory = self.memory
        assert memory is not None and memory.meter is not None
        before = memory.meter.in_use()
        try:
            out, peak = memory.meter.measure(fn, probes)
        except _OOM_ERRORS:
            pass  # handled below, outside the except block, so its traceback's tensors are freed
        else:
            memory.record(route, probes, before, peak)
            return out
        retry_with = memory.failed(route, probes) if retry else 0
        self._free(drop_graph=retry_with == 0)
        if retry_with == 0:
            raise CurvatureMemoryError(
                f"out of memory at one Hessian-vector product per pass on the {route!r} route "
                f"under a limit of {_gib(memory.limit)}; what the measurement held is freed. "
                + _MEMORY_FIX
            )
        return None

    def _free(self, *, drop_graph: bool) -> None:
        if drop_graph:
            self._graph = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _memory_message(self, route: str) -> str:
        memory = self.memory
        assert memory is not None
        product = memory.predict(route, 1) or 0.0
        graph = memory.predict(f"{route}:graph", 1) or 0.0
        held = f" (its gradient graph {_gib(graph)}, one product {_gib(product)})" if graph else ""
        return (
            f"one Hessian-vector product on the {route!r} route needs about "
            f"{_gib(graph + product)} more memory{held}, but only "
            f"{_gib(max(memory.headroom(), 0))} is left under the limit of "
            f"{_gib(memory.limit)}. " + _MEMORY_FIX
        )

    def rows_that_fit(self, requested: int) -> int:
        """Probe rows to hold at once (probes, products and their concatenation: 3 rows of n
        each) so that they take at most a quarter of the headroom under the memory limit."""
        if self.memory is None or self.memory.meter is None or not self.memory.meter.available:
            return requested
        row = 3 * self.numel * torch.finfo(self.dtype).bits // 8
        room = 0.25 * self.memory.margin * self.memory.headroom()
        return max(1, min(requested, int(room // row)))

    def _scalar_loss(self, p: dict[str, Tensor]) -> Tensor:
        loss = self.loss_fn(p)
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(
                "Expected `loss_fn` to return a scalar floating-point tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}: "
                "reduce the loss (e.g. .mean()) inside loss_fn"
            )
        return loss.reshape(())

    @contextlib.contextmanager
    def _evaluation(self) -> Iterator[None]:
        # fork_rng restores the global RNG and makes every evaluation draw the same dropout masks;
        # the math SDPA backend is the only one with second-order and forward-AD rules.
        with contextlib.ExitStack() as stack:
            if self.device.type == "cpu":
                stack.enter_context(torch.random.fork_rng(devices=[]))
            else:
                index = self.device.index
                if index is None:
                    index = torch.cuda.current_device() if self.device.type == "cuda" else 0
                stack.enter_context(
                    torch.random.fork_rng(devices=[index], device_type=self.device.type)
                )
            stack.enter_context(_math_sdpa())
            stack.enter_context(torch.enable_grad())
            yield

    def _leaves(self) -> list[Tensor]:
        return [p.detach().requires_grad_(True) for p in self._primals.values()]

    def _build_graph(self) -> Tensor:
        leaves = self._leaves()
        with self._evaluation():
            loss = self._scalar_loss(dict(zip(self.names, leaves, strict=True)))
            _refuse_once_differentiable(loss)
            self._checked = True
            grads: tuple[Tensor | None, ...] = (None,) * len(leaves)
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        # A gradient that does not require grad is constant in θ: its Hessian block is zero.
        self._graph = (leaves, _flat(grads, leaves))
        return self._graph[1]

    def _double_backward(self, batch: Tensor, batched: bool = False) -> Tensor:
        if self._graph is None:
            self._build_graph()
        assert self._graph is not None
        leaves, flat_grad = self._graph
        if not flat_grad.requires_grad:
            return torch.zeros_like(batch)
        if batched and len(batch) > 1 and self._vectorisable:
            try:
                return self._batched_backward(leaves, flat_grad, batch)
            except RuntimeError as err:  # an op in the gradient's graph cannot be vectorised
                if self.memory is not None and isinstance(err, _OOM_ERRORS):
                    raise  # under a limit, the plan retries with fewer probes per pass
                self._vectorisable = False
        rows = []
        for v in batch:
            hv = torch.autograd.grad(flat_grad @ v, leaves, retain_graph=True, allow_unused=True)
            rows.append(_flat(hv, leaves))
        return torch.stack(rows)

    @staticmethod
    def _batched_backward(leaves: list[Tensor], flat_grad: Tensor, batch: Tensor) -> Tensor:
        # every probe of the batch in one backward pass vectorised with vmap
        with warnings.catch_warnings():  # ops without a batching rule run op by op: still right
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            hv = torch.autograd.grad(
                flat_grad,
                leaves,
                grad_outputs=batch,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        return _flat(hv, leaves, rows=len(batch))

    def _jvp_of_grad(self, tangents: dict[str, Tensor]) -> Tensor:
        with self._evaluation():
            _, out = torch.func.jvp(
                torch.func.grad(self._scalar_loss), (self._primals,), (tangents,)
            )
        return self.flatten(out)

    def _vmap_jvp_of_grad(self, batch: Tensor) -> Tensor:
        def one(tangents: dict[str, Tensor]) -> dict[str, Tensor]:
            grad_fn = torch.func.grad(self._scalar_loss)
            return torch.func.jvp(grad_fn, (self._primals,), (tangents,))[1]

        # randomness="same": dropout inside loss_fn draws one mask shared by all probes.
        with self._evaluation():
            out = torch.func.vmap(one, randomness="same", chunk_size=self.chunk_size)(
                self.unflatten(batch)
            )
        return self.flatten(out, batched=True)

    def _finite_difference(self, batch: Tensor) -> Tensor:
        if self._theta_norm is None:
            self._theta_norm = math.sqrt(
                sum(float(p.double().square().sum()) for p in self._primals.values())
            )
        rows = []
        for v in batch:
            norm = float(v.double().norm())
            if norm == 0.0:
                rows.append(torch.zeros_like(v))
                continue
            eps = finite_difference_step(self._theta_norm, norm, self.dtype)
            hv = self._central_difference(v, eps)
            if self.finite_difference_error is None:
                self.finite_difference_error = self._self_check(v, eps, hv)
            rows.append(hv)
        return torch.stack(rows)

    def _central_difference(self, v: Tensor, eps: float) -> Tensor:
        plus = self._gradient_at(v, eps)
        return (plus - self._gradient_at(v, -eps)) * (0.5 / eps)

    def _self_check(self, v: Tensor, eps: float, hv: Tensor) -> float:
        """Estimated relative error of the products at step ε, from the first probe's product
        repeated at ε/2 (two more gradients per operator).

        With truncation error C·ε², h_ε − h_{ε/2} = ¾·C·ε², so the error of h_ε is about
        (4/3)·‖h_ε − h_{ε/2}‖; rounding noise, larger at ε/2, makes the estimate err on the high
        side. Where the loss is not smooth at the step's scale (ReLU or max kinks crossed by the
        perturbation) the two disagree by the order of the products themselves.
        """
        half = self._central_difference(v, eps / 2)
        scale = float(half.double().norm())
        if scale == 0.0:
            return 0.0 if float(hv.double().norm()) == 0.0 else math.inf
        return 4.0 / 3.0 * float((hv.double() - half.double()).norm()) / scale

    def _gradient_at(self, v: Tensor, step: float) -> Tensor:
        """∇L at a perturbed copy θ + step·v (the primals are never written)."""
        direction = self.unflatten(v)
        leaves = [
            torch.add(p, direction[name], alpha=step).requires_grad_(True)
            for name, p in self._primals.items()
        ]
        with self._evaluation():
            loss = self._scalar_loss(dict(zip(self.names, leaves, strict=True)))
            if not loss.requires_grad:
                return torch.zeros_like(v)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return _flat(grads, leaves)

    def _check_once_differentiable(self) -> None:
        # torch.func routes run the backward under functorch transforms, where a once-differentiable
        # backward silently drops the tangent; a plain forward reveals such Functions in the graph.
        leaves = self._leaves()
        with self._evaluation():
            loss = self._scalar_loss(dict(zip(self.names, leaves, strict=True)))
        _refuse_once_differentiable(loss)
        self._checked = True

    def _failure_message(self) -> str:
        lines = "; ".join(f"{route}: {_first_line(err)}" for route, err in self._failures)
        if len(self._candidates) == 1:
            return (
                f"the Hessian-vector-product route failed ({lines}); route='auto' falls back to "
                "the other routes"
            )
        return (
            f"no Hessian-vector-product route works for this loss_fn ({lines}). Usually an op in "
            "the loss has neither a double-backward rule nor a forward-mode AD rule (torch.func): "
            "replace it for the measurement (e.g. by a differentiable reference implementation), "
            "or measure a sub-module without it"
        )

    def _warn_fallback(self) -> None:
        key = tuple(f"{route}: {_first_line(err)}" for route, err in self._failures)
        if key in _WARNED:
            return
        _WARNED.add(key)
        reasons = "; ".join(key)
        warnings.warn(
            f"dynlens.curvature: Hessian-vector products fell back to the {self.route!r} route "
            f"({reasons}). Results are unaffected, only the speed differs. Pass "
            f"route={self.route!r} to skip the failing route",
            CurvatureFallbackWarning,
            stacklevel=3,
        )


def hvp(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    vectors: Mapping[str, Tensor] | Tensor,
    *,
    route: Route = "auto",
    memory: MemoryLimit | None = None,
) -> dict[str, Tensor] | Tensor:
    """Hessian-vector products H·v of ``loss_fn`` at ``params``.

    ``vectors`` is one of (the output has the same layout):

    * a dict shaped like ``params``: one probe;
    * a dict whose tensors have a leading probe dimension ``(k, *param.shape)``: k probes;
    * a flat tensor ``(n,)`` or ``(k, n)`` in the order of ``params``.

    All probes share one gradient graph (see :class:`HessianOperator` for the routes and the
    fallback). Example:

        >>> import torch
        >>> from dynlens.curvature import hvp
        >>> loss_fn = lambda p: (p["w"] ** 3).sum() / 6          # H = diag(w)
        >>> w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> hvp(loss_fn, {"w": w}, {"w": torch.ones(3, dtype=torch.float64)})["w"].tolist()
        [1.0, 2.0, 3.0]
    """
    op = HessianOperator(loss_fn, params, route=route, memory=memory)
    if isinstance(vectors, Tensor):
        return op.matmul(vectors)
    if set(vectors) != set(op.names):
        raise ValueError(f"Expected the keys of `params` {sorted(op.names)}, got {sorted(vectors)}")
    batched = all(
        v.ndim == len(s) + 1 for v, s in zip(map(vectors.get, op.names), op.shapes, strict=True)
    )
    flat = op.flatten(vectors, batched=batched)
    return op.unflatten(op.matmul(flat))


# --------------------------------------------------------------------------------------------
# Trace
# --------------------------------------------------------------------------------------------


def hutchinson_trace(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    *,
    num_probes: int = 100,
    generator: torch.Generator | None = None,
    route: Route = "auto",
    chunk_size: int = 16,
    memory: MemoryLimit | None = None,
) -> Estimate:
    """Hutchinson's estimate of the Hessian trace tr(H), with its standard error and ‖H‖_F.

    Hutchinson, M. F. (1989). *A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines.* Communications in Statistics - Simulation and Computation.

    For m Rademacher probes v_i (entries ±1 with probability ½ each), E[v vᵀ] = I, so

        tr(H) ≈ (1/m) Σ_i v_iᵀ H v_i                 (unbiased)
        stderr = std_i(v_iᵀ H v_i) / √m               (sample std, Bessel-corrected)
        ‖H‖²_F ≈ (1/m) Σ_i ‖H v_i‖²                   (unbiased: E‖Hv‖² = tr(H²) = ‖H‖²_F)

    The variance of one term is 2(‖H‖²_F − Σ_j H_jj²): zero for a diagonal H, large when the
    off-diagonal mass is. ``frobenius`` is the square root of the unbiased ‖H‖²_F estimate (so
    slightly biased low, by Jensen). All m products share one gradient graph.

    Args:
        num_probes: m, Hessian-vector products to spend (PyHessian's default cap is 100).
        generator: source of the probes. ``None`` creates a fresh generator seeded with 0 on
            ``params``' device, so repeated calls at the same θ agree; pass an own generator
            (kept across calls) for independent probes each time. The global RNG is never used.
        route: Hessian-vector-product route, see :class:`HessianOperator`.
        chunk_size: probes generated and multiplied at a time (bounds memory at ~3·chunk·n).
        memory: a :class:`MemoryLimit` the products are planned under (see
            :class:`HessianOperator`); it also lowers ``chunk_size`` so that the probe rows take
            at most a quarter of the headroom.

    Example (a 50-dim quadratic with eigenvalues 100, 80, 60 and 47 ones: tr(H) = 287,
    ‖H‖_F = 141.59):
        >>> import torch
        >>> from dynlens.curvature import hutchinson_trace
        >>> g = torch.Generator().manual_seed(0)
        >>> q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
        >>> eigenvalues = torch.tensor([100.0, 80.0, 60.0] + [1.0] * 47, dtype=torch.float64)
        >>> h = q @ torch.diag(eigenvalues) @ q.T
        >>> loss_fn = lambda p: 0.5 * p["w"] @ h @ p["w"]
        >>> params = {"w": torch.zeros(50, dtype=torch.float64)}
        >>> est = hutchinson_trace(loss_fn, params, num_probes=30)
        >>> round(est.value, 2), round(est.stderr, 2), round(est.frobenius, 2)
        (279.92, 32.11, 135.23)
    """
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"Expected `num_probes` to be a positive int, got {num_probes!r}")
    op = HessianOperator(loss_fn, params, route=route, memory=memory)
    generator = _generator(generator, op.device)
    quad, sq_norm = [], []
    for k in _chunks(num_probes, op.rows_that_fit(chunk_size)):
        v = _rademacher(k, op.numel, generator, op)
        hv = op @ v
        quad.append((v * hv).sum(dim=1))
        sq_norm.append(hv.square().sum(dim=1))
    q = torch.cat(quad).double()
    frobenius_sq = torch.cat(sq_norm).double().mean().item()
    return Estimate(
        value=q.mean().item(),
        stderr=_stderr(q),
        num_probes=num_probes,
        frobenius=math.sqrt(max(frobenius_sq, 0.0)),
        route=op.route,
        product_error=op.finite_difference_error,
    )


def hutchpp_trace(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    *,
    num_probes: int = 100,
    generator: torch.Generator | None = None,
    route: Route = "auto",
    chunk_size: int = 16,
    memory: MemoryLimit | None = None,
) -> Estimate:
    """Hutch++ estimate of tr(H): exact trace on a sketched top subspace, Hutchinson on the rest.

    Meyer, R. A., Musco, C., Musco, C., & Woodruff, D. P. (2021). *Hutch++: Optimal Stochastic
    Trace Estimation.* SOSA 2021 (Algorithm 1).

    With a budget of m products and k = ⌊m/3⌋:

        S  = k Rademacher columns;  Q = orth(H S)      (k products; QR, Q has orthonormal columns)
        t₁ = tr(Qᵀ H Q)                                 (exact; k products)
        G  = m − 2k Rademacher columns; G' = (I − QQᵀ) G
        t₂ = (1/(m−2k)) Σ_i g'_iᵀ H g'_i                (Hutchinson on (I−QQᵀ)H(I−QQᵀ))
        tr(H) ≈ t₁ + t₂,   stderr = std_i(g'_iᵀ H g'_i) / √(m−2k)

    Unbiased: for *any* orthonormal Q, tr(H) = tr(QᵀHQ) + tr((I−QQᵀ)H(I−QQᵀ)), and conditional on
    Q the second term is estimated without bias; so E[t₁ + t₂ | Q] = tr(H) exactly, and the
    conditional variance (what ``stderr`` estimates) is also the unconditional one. When a few
    eigenvalues dominate, as the outliers of neural-network Hessians do, Q captures them and the
    variance is far below Hutchinson's at the same budget (for PSD H, relative error O(1/m)
    against Hutchinson's O(1/√m)). When n ≤ k the sketch spans ℝⁿ and the value is exact.
    ``frobenius`` is not estimated.

    Args:
        num_probes: m ≥ 3, Hessian-vector products to spend (min(k, n) fewer when n < k).
        generator, route, chunk_size, memory: as in :func:`hutchinson_trace`.

    Example (the H of :func:`hutchinson_trace`'s example, tr(H) = 287, same budget: the three
    outliers land in Q and the standard error drops from 32 to 1.4):
        >>> import torch
        >>> from dynlens.curvature import hutchpp_trace
        >>> g = torch.Generator().manual_seed(0)
        >>> q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
        >>> eigenvalues = torch.tensor([100.0, 80.0, 60.0] + [1.0] * 47, dtype=torch.float64)
        >>> h = q @ torch.diag(eigenvalues) @ q.T
        >>> loss_fn = lambda p: 0.5 * p["w"] @ h @ p["w"]
        >>> est = hutchpp_trace(loss_fn, {"w": torch.zeros(50, dtype=torch.float64)}, num_probes=30)
        >>> round(est.value, 2), round(est.stderr, 2)
        (285.36, 1.39)
    """
    if not isinstance(num_probes, int) or num_probes < 3:
        raise ValueError(
            f"Expected `num_probes` to be an int >= 3 (a third each for the sketch, its exact "
            f"trace and the deflated Hutchinson part), got {num_probes!r}"
        )
    op = HessianOperator(loss_fn, params, route=route, memory=memory)
    generator = _generator(generator, op.device)
    chunk_size = op.rows_that_fit(chunk_size)
    k = num_probes // 3
    m_rest = num_probes - 2 * k
    sketch = _rademacher(k, op.numel, generator, op)  # rows are the columns of S
    q = torch.linalg.qr(_apply_chunked(op, sketch, chunk_size).T).Q  # n × min(n, k)
    exact = (q.T * _apply_chunked(op, q.T, chunk_size)).sum()  # Σ_j q_jᵀ H q_j = tr(QᵀHQ)
    g = _rademacher(m_rest, op.numel, generator, op)
    g = g - (g @ q) @ q.T  # rows (I − QQᵀ) g_i
    quad = (g * _apply_chunked(op, g, chunk_size)).sum(dim=1).double()
    return Estimate(
        value=exact.item() + quad.mean().item(),
        stderr=_stderr(quad),
        num_probes=k + q.shape[1] + m_rest,
        route=op.route,
        product_error=op.finite_difference_error,
    )


# --------------------------------------------------------------------------------------------
# Top eigenvalue (sharpness)
# --------------------------------------------------------------------------------------------


def top_eigenvalue(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    *,
    init: Mapping[str, Tensor] | Tensor | None = None,
    max_iter: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    preconditioner: Mapping[str, Tensor] | None = None,
    route: Route = "auto",
    memory: MemoryLimit | None = None,
) -> Eigen:
    """Largest algebraic eigenvalue λ_max of H (sharpness) by Lanczos, optionally preconditioned.

    Lanczos, C. (1950), with full reorthogonalisation (Golub & Van Loan, *Matrix Computations*,
    §10.1). Cohen et al. (2021), *Gradient Descent on Neural Networks Typically Occurs at the Edge
    of Stability*, track sharpness with Lanczos the same way.

    After j steps the Krylov basis Q_j = [q_1 … q_j] gives the tridiagonal T_j = Q_jᵀ A Q_j; its
    largest eigenpair (θ, s) gives the Ritz pair (θ, x = Q_j s) whose residual is exactly
    ‖A x − θ x‖ = |β_{j+1} s_j|. The iteration stops when that is ≤ ``tol`` · |θ| (``converged``)
    or after ``max_iter`` products. Eigenvalue error ≤ residual (and ≈ residual²/gap). Lanczos
    converges to both ends of the spectrum, so a large negative eigenvalue does not mislead it as it
    does power iteration; it stores ``max_iter`` vectors of n entries.

    Warm start: pass the previous call's ``Eigen.vector`` as ``init``. When the top eigenvector has
    moved little, the first residual is already small and few products are needed. A residual test
    cannot tell that a *different* eigenvalue has overtaken the one ``init`` points at, so cold
    start (``init=None``) now and then when tracking over long runs.

    Preconditioned sharpness (Cohen et al. 2022, *Adaptive Gradient Methods at the Edge of
    Stability*): with ``preconditioner`` P (a dict of positive diagonals shaped like ``params``,
    e.g. from :func:`adam_preconditioner`), the operator is A = P^{-1/2} H P^{-1/2}, which has the
    same eigenvalues as P⁻¹H; ``vector`` is then the eigenvector u of A (P^{-1/2}u is that of P⁻¹H).

    Args:
        init: start vector (dict shaped like ``params`` or flat ``(n,)``); ``None`` draws a
            Rademacher vector from ``generator``.
        max_iter: Lanczos steps (Hessian-vector products) at most.
        tol: relative residual at which to stop.
        generator: as in :func:`hutchinson_trace` (only used when ``init`` is None).
        preconditioner: the diagonal P, or None for H itself.
        route: Hessian-vector-product route, see :class:`HessianOperator`.
        memory: a :class:`MemoryLimit` the products are planned under. The basis (one vector of
            n entries per step) counts against it: when a further product no longer fits, the
            iteration stops there and returns the Ritz pair so far (``converged`` False).

    Example (spectrum {-10, 1, 2, 3}: the top eigenvalue is 3, not -10):
        >>> import torch
        >>> from dynlens.curvature import top_eigenvalue
        >>> a = torch.tensor([-10.0, 1.0, 2.0, 3.0], dtype=torch.float64)
        >>> loss_fn = lambda p: 0.5 * (a * p["w"] ** 2).sum()
        >>> eig = top_eigenvalue(loss_fn, {"w": torch.zeros(4, dtype=torch.float64)})
        >>> round(eig.value, 6), eig.converged, eig.vector["w"].abs().argmax().item()
        (3.0, True, 3)
    """
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"Expected `max_iter` to be a positive int, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"Expected `tol` to be positive, got {tol!r}")
    op = HessianOperator(loss_fn, params, route=route, memory=memory)
    scale = None
    if preconditioner is not None:
        p_flat = op.flatten(preconditioner).to(device=op.device, dtype=op.dtype)
        if not bool((p_flat > 0).all()):
            raise ValueError("Expected every entry of `preconditioner` to be positive")
        scale = p_flat.rsqrt()

    def apply(x: Tensor) -> Tensor:
        return op @ x if scale is None else scale * (op @ (scale * x))

    if init is None:
        q = _rademacher(1, op.numel, _generator(generator, op.device), op)[0]
    else:
        q = init if isinstance(init, Tensor) else op.flatten(init)
        q = q.detach().reshape(-1).to(device=op.device, dtype=op.dtype).clone()
        if q.numel() != op.numel:
            raise ValueError(f"Expected `init` with {op.numel} entries, got {q.numel()}")
    norm = q.norm()
    if not bool(norm > 0) or not bool(torch.isfinite(norm)):
        raise ValueError("Expected `init` to be a finite, non-zero vector")
    q = q / norm

    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    eps = torch.finfo(op.dtype).eps
    theta, s, residual, converged = 0.0, torch.ones(1, dtype=torch.float64), math.inf, False
    for _ in range(max_iter):
        try:
            w = apply(basis[-1])
        except CurvatureMemoryError:
            if not alphas:
                raise
            basis.pop()  # its product did not fit: the Ritz pair of the steps so far stands
            break
        alphas.append(torch.dot(basis[-1], w).item())
        # Full reorthogonalisation ("twice is enough", Parlett, The Symmetric Eigenvalue Problem)
        # keeps the basis orthogonal in floating point: no spurious copies of converged Ritz values.
        b = torch.stack(basis)
        for _ in range(2):
            w = w - b.T @ (b @ w)
        beta = w.norm().item()
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        theta, s = evals[-1].item(), evecs[:, -1]
        residual = abs(beta * s[-1].item())
        spectrum_scale = max(evals.abs().max().item(), eps)
        if residual <= tol * abs(theta) or beta <= 10 * eps * spectrum_scale:
            # The second case is an invariant subspace: the Ritz values are exact eigenvalues.
            converged = True
            break
        if len(basis) == op.numel:
            break
        betas.append(beta)
        basis.append(w / beta)
    b = torch.stack(basis[: len(alphas)])
    vector = s.to(device=op.device, dtype=op.dtype) @ b
    vector = vector / vector.norm()
    return Eigen(
        value=theta,
        vector={k: v.clone() for k, v in op.unflatten(vector).items()},
        converged=converged,
        iterations=len(alphas),
        residual=residual,
        route=op.route,
        product_error=op.finite_difference_error,
    )


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params_by_name: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The diagonal preconditioner P = √v̂ + ε of Adam/AdamW, per named parameter.

    Cohen et al. (2022), *Adaptive Gradient Methods at the Edge of Stability*: Adam's step is
    θ ← θ − η P⁻¹ m̂ with P = diag(√v̂ + ε) and v̂ = v / (1 − β₂ᵗ), the bias-corrected second moment
    (``exp_avg_sq``, or ``max_exp_avg_sq`` with ``amsgrad``). The preconditioned sharpness is
    λ_max(P^{-1/2} H P^{-1/2}) = λ_max(P⁻¹H): pass the result as ``preconditioner=`` to
    :func:`top_eigenvalue` and compare it with :func:`adam_sharpness_threshold`.

    Args:
        optimizer: a ``torch.optim.Adam``/``AdamW`` (or anything with the same state layout) that
            has taken at least one step.
        params_by_name: the optimizer's own parameter tensors by name, e.g.
            ``dict(model.named_parameters())`` (looked up by identity).

    Returns:
        ``name -> P`` tensors (detached copies), shaped like the parameters.
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: dict[str, Tensor] = {}
    for name, p in params_by_name.items():
        group = groups.get(id(p))
        if group is None:
            raise ValueError(
                f"parameter {name!r} is not one of the optimizer's parameters: pass the model's "
                "own tensors, e.g. dict(model.named_parameters())"
            )
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state or "step" not in state:
            raise ValueError(
                f"no Adam state (`exp_avg_sq`, `step`) for parameter {name!r}: call after at least "
                "one optimizer step, with a torch Adam or AdamW optimizer"
            )
        step = float(state["step"])
        beta2 = float(group["betas"][1])
        second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        bias_correction = 1.0 - beta2**step
        out[name] = (second.detach() / bias_correction).sqrt() + float(group["eps"])
    return out


# --------------------------------------------------------------------------------------------
# Stability thresholds
# --------------------------------------------------------------------------------------------


def gd_sharpness_threshold(lr: float) -> float:
    """Edge of stability for gradient descent: λ_max(H) = 2/η.

    Cohen, J. M., Kaur, S., Li, Y., Kolter, J. Z., & Talwalkar, A. (2021). *Gradient Descent on
    Neural Networks Typically Occurs at the Edge of Stability.* ICLR 2021. On a quadratic, GD with
    step η diverges along any direction with curvature above 2/η; full-batch training drives
    λ_max up to about 2/η and hovers there.

        >>> gd_sharpness_threshold(0.01)
        200.0
    """
    return 2.0 / _check_lr(lr)


def momentum_sharpness_threshold(lr: float, momentum: float) -> float:
    """Stability threshold for heavy-ball (Polyak) momentum β: λ_max(H) = 2(1 + β)/η.

    Cohen et al. (2021), appendix on momentum: on a quadratic, heavy-ball momentum with step η and
    momentum β is stable iff every curvature is below (2 + 2β)/η. (Nesterov momentum has a
    different threshold, (2 + 2β)/((1 + 2β)η).)

        >>> momentum_sharpness_threshold(0.01, 0.9)
        380.0
    """
    return (2.0 + 2.0 * _check_beta(momentum, "momentum")) / _check_lr(lr)


def sgd_trace_threshold(lr: float) -> float:
    """Linear stability of SGD at a global minimum: tr(H) ≤ 2/η.

    Wu, L., & Su, W. J. (2023). *The Implicit Regularization of Dynamical Stability in Stochastic
    Gradient Descent.* ICML 2023: if a global minimum is linearly stable for SGD, the trace of its
    Hessian is at most 2/η (GD constrains only λ_max). Compare with the Hutchinson/Hutch++ trace.

        >>> sgd_trace_threshold(0.1)
        20.0
    """
    return 2.0 / _check_lr(lr)


def adam_sharpness_threshold(lr: float, beta1: float = 0.9) -> float:
    """Adaptive edge of stability: λ_max(P⁻¹H) = (2 + 2β₁)/((1 − β₁)η), i.e. 38/η at β₁ = 0.9.

    Cohen, J. M., Ghorbani, B., Krishnan, S., et al. (2022). *Adaptive Gradient Methods at the Edge
    of Stability.* arXiv:2207.14484. Adam's update is EMA momentum (coefficient β₁) in the
    geometry of its preconditioner P; on a quadratic it is stable iff λ_max(P⁻¹H) is below this
    value, and the preconditioned sharpness (see :func:`adam_preconditioner`) equilibrates there.

        >>> round(adam_sharpness_threshold(0.001), 6)
        38000.0
    """
    beta1 = _check_beta(beta1, "beta1")
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * _check_lr(lr))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _flat(
    grads: tuple[Tensor | None, ...], leaves: list[Tensor], rows: int | None = None
) -> Tensor:
    """Gradients w.r.t. ``leaves`` as one flat vector (``(rows, n)`` for a batch of ``rows``);
    a ``None`` gradient (the loss does not depend on that leaf) is zeros."""
    lead = () if rows is None else (rows,)
    return torch.cat(
        [
            g.reshape(*lead, -1) if g is not None else leaf.new_zeros(*lead, leaf.numel())
            for g, leaf in zip(grads, leaves, strict=True)
        ],
        dim=-1,
    )


def _candidate_routes(route: str, device: torch.device) -> list[str]:
    if route in ("auto", "tuned"):
        first = "vmap_forward_over_reverse" if device.type == "cuda" else "double_backward"
        return [first, *(r for r in ROUTES if r != first)]
    if route not in EXPLICIT_ROUTES:
        raise ValueError(
            f"Expected `route` to be 'auto', 'tuned' or one of {EXPLICIT_ROUTES}, got {route!r}"
        )
    return [route]


def _math_sdpa() -> contextlib.AbstractContextManager[None]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no per-backend selector; its default is then used
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _refuse_once_differentiable(loss: Tensor) -> None:
    """Raise if ``loss``'s graph holds a custom Function with a once-differentiable backward."""
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        fn_cls = getattr(node, "_forward_cls", None)
        backward = getattr(fn_cls, "backward", None)
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE:
            raise CurvatureError(
                f"the loss passes through the custom autograd.Function {fn_cls.__qualname__}, "
                "whose backward is @once_differentiable: no route can take second derivatives "
                "through it (double backward refuses, torch.func would silently return zeros). "
                "Give it a differentiable backward for the measurement"
            )
        stack.extend(next_fn for next_fn, _ in node.next_functions)


def _generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(0)


def _rademacher(k: int, n: int, generator: torch.Generator, op: HessianOperator) -> Tensor:
    bits = torch.randint(0, 2, (k, n), generator=generator, device=generator.device)
    return (2 * bits - 1).to(device=op.device, dtype=op.dtype)


def _chunks(total: int, size: int) -> Iterator[int]:
    if size < 1:
        raise ValueError(f"Expected `chunk_size` to be a positive int, got {size}")
    for start in range(0, total, size):
        yield min(size, total - start)


def _apply_chunked(op: HessianOperator, rows: Tensor, size: int) -> Tensor:
    return torch.cat([op @ chunk for chunk in rows.split(size)]) if len(rows) else rows


_MEMORY_FIX = (
    "Raise the limit (HessianMonitor(memory=...)), measure on a smaller probe_batch, or use "
    "route='finite_difference', whose memory is one gradient's"
)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _stderr(samples: Tensor) -> float:
    if samples.numel() < 2:
        return math.nan
    return (samples.std() / math.sqrt(samples.numel())).item()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _check_lr(lr: float) -> float:
    if not lr > 0:
        raise ValueError(f"Expected the learning rate to be positive, got {lr!r}")
    return float(lr)


def _check_beta(beta: float, name: str) -> float:
    if not 0 <= beta < 1:
        raise ValueError(f"Expected `{name}` in [0, 1), got {beta!r}")
    return float(beta)
