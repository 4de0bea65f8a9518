"""Logit growth measurements: the pure functions behind ``LogitGrowthMonitor``.

Wortsman, Liu, Xiao, Everett, Alemi, Adlam, Co-Reyes, Gur, Kumar, Novak, Pennington,
Sohl-Dickstein, Xu, Lee, Gilmer & Kornblith 2023, *Small-scale proxies for large-scale Transformer
training instabilities* (arXiv:2309.14322), name two instabilities that small models reproduce at
high learning rates:

* **Attention logit growth.** The attention logits ``z_ij = q_i · k_j / sqrt(d_h)`` grow until the
  softmax over ``j`` is one-hot and its entropy collapses (Dehghani et al. 2023 saw it at 8B
  parameters). In their runs the maximum attention logit (largest in the first layer) passing
  about 1e4 went with divergence. *qk-layernorm* (LayerNorm on ``q`` and ``k`` per head before the
  product) keeps the logits bounded.
* **Output logit divergence.** Cross-entropy is invariant to adding a constant to every output
  logit, so nothing stops the normaliser ``log Z = logsumexp_c z_c`` from drifting (the logits
  become very negative late in training) until the softmax loses precision. *z-loss*
  ``1e-4 · (log Z)²`` (:func:`dynlens.z_loss`, after PaLM) keeps ``log Z`` near 0.

This module holds the output-logit statistics (:class:`OutputLogitSums`,
:func:`output_logit_sums`, :func:`output_logit_stats`) and :func:`log_growth_rate`. The
attention-logit statistics (:class:`~dynlens.attention.AttentionLogitSums`,
:func:`~dynlens.attention.attention_logit_sums`,
:func:`~dynlens.attention.multi_head_attention_logit_sums`,
:func:`~dynlens.attention.softmax_logit_sums`, :func:`~dynlens.attention.masked_below`,
:data:`~dynlens.attention.DEFAULT_CHUNK_ELEMENTS`) live in :mod:`dynlens.attention`.

Everything here is plain torch and works in a plain PyTorch loop. Statistics come as *sufficient
statistics* (sums, counts and maxima as device tensors, each with a declared cross-process
reduction) so that they pool over micro-batches and processes exactly; nothing synchronises with
the host except the convenience functions that return ``float``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import _compute_dtype

__all__ = [
    "OutputLogitStats",
    "OutputLogitSums",
    "log_growth_rate",
    "output_logit_stats",
    "output_logit_sums",
]


# --------------------------------------------------------------------------------- output logits
@dataclass(frozen=True)
class OutputLogitStats:
    """Output-logit statistics of a set of samples (see :func:`output_logit_sums`)."""

    rms: float
    max_abs: float
    logz_mean: float
    logz_max: float
    spread: float


@dataclass(frozen=True)
class OutputLogitSums:
    """Sufficient statistics of output logits ``z`` of shape ``(..., C)``: 0-dim device tensors
    (or floats once moved to the host).

    Every leading position is a sample ``n``; ``log Z_n = logsumexp_c z_nc``. Fields named in
    :attr:`SUMS` pool across batches and processes by adding, those in :attr:`MAXIMA` by taking
    the maximum; :meth:`compute` turns them into the logged statistics.
    """

    samples: float  #: number of samples N (a float: known without touching the device)
    entries: float  #: number of logits N·C
    sum_squares: Tensor | float  #: Σ z²
    logz_sum: Tensor | float  #: Σ_n log Z_n
    spread_sum: Tensor | float  #: Σ_n std_c(z_nc)
    max_abs: Tensor | float  #: max |z|
    logz_max: Tensor | float  #: max_n log Z_n

    SUMS: ClassVar[tuple[str, ...]] = (
        "samples",
        "entries",
        "sum_squares",
        "logz_sum",
        "spread_sum",
    )
    MAXIMA: ClassVar[tuple[str, ...]] = ("max_abs", "logz_max")

    def merge(self, other: OutputLogitSums) -> OutputLogitSums:
        """The statistics of both sets of samples together."""
        # keyed by field name: each value's type is its field's, which a dict cannot say
        fields: dict[str, Any] = {f: getattr(self, f) + getattr(other, f) for f in self.SUMS}
        fields.update({f: torch.maximum(getattr(self, f), getattr(other, f)) for f in self.MAXIMA})
        return OutputLogitSums(**fields)

    @classmethod
    def pool(cls, items: Sequence[OutputLogitSums]) -> OutputLogitSums:
        """The statistics of all ``items``' samples together, as :meth:`merge` one by one would
        give them, with one stack and one reduction per field (for many items at once)."""
        if not items:
            raise ValueError("Expected at least one OutputLogitSums to pool")
        if len(items) == 1:
            return items[0]
        fields: dict[str, Any] = {}
        for names, on_device, on_host in (
            (cls.SUMS, Tensor.sum, sum),
            (cls.MAXIMA, Tensor.amax, max),
        ):
            for name in names:
                values = [getattr(item, name) for item in items]
                tensors = isinstance(values[0], Tensor)
                fields[name] = on_device(torch.stack(values)) if tensors else on_host(values)
        return cls(**fields)

    def compute(self) -> dict[str, Tensor | float]:
        """``rms``, ``max_abs``, ``logz_mean``, ``logz_max`` and ``spread``: 0-dim tensors, or
        floats when the fields are floats (as after one transfer of all of them to the host)."""
        return {
            "rms": (self.sum_squares / self.entries) ** 0.5,
            "max_abs": self.max_abs,
            "logz_mean": self.logz_sum / self.samples,
            "logz_max": self.logz_max,
            "spread": self.spread_sum / self.samples,
        }


def output_logit_sums(logits: Tensor) -> OutputLogitSums:
    """Sufficient statistics of output logits ``z`` of shape ``(..., C)``, classes last.

    With ``N`` samples (all leading positions) and ``C`` classes:

    .. code-block:: text

        rms       = sqrt( Σ_nc z_nc² / (N·C) )
        max_abs   = max_nc |z_nc|
        log Z_n   = logsumexp_c z_nc                  (the softmax normaliser)
        logz_mean = (1/N) Σ_n log Z_n,   logz_max = max_n log Z_n
        spread    = (1/N) Σ_n std_c(z_nc),   std with 1/C (population)

    ``spread`` is shift invariant (it measures how far apart the classes are, which the loss
    sees); ``logz_mean`` is the shift the loss does *not* see and z-loss pins to 0. With logits
    near 0 at initialisation, ``log Z ≈ log C``. float16/bfloat16 logits are measured in float32.

    Args:
        logits: ``(..., C)`` with ``C ≥ 1``; detached here, never modified.

    Returns:
        :class:`OutputLogitSums` of 0-dim tensors on the logits' device.
    """
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"Expected logits of shape (..., C) with C >= 1 classes last, got {tuple(logits.shape)}"
        )
    z = logits.detach().reshape(-1, logits.shape[-1])
    if z.dtype != _compute_dtype(z.dtype):
        z = z.to(_compute_dtype(z.dtype))
    n, c = z.shape
    if n == 0:
        raise ValueError("Expected at least one sample of logits, got an empty batch")
    low, high = torch.aminmax(z)  # no |z| copy of the logits
    # log Z = m + log S (m the row maximum, S = Σ exp(z - m)): log_softmax, one fused pass,
    # returns (z - m) - log S, whose largest entry is -log S; logsumexp takes several passes
    row_max = z.amax(dim=-1)
    # -log S is NaN only for a row whose maximum is ±inf (or NaN): there log Z = m, as logsumexp
    logz = row_max - F.log_softmax(z, dim=-1).amax(dim=-1).nan_to_num_(nan=0.0)
    # the population std per row, written out: Tensor.std(dim) is ~15x slower on CPU here
    centred = z - z.mean(dim=-1, keepdim=True)
    spread = centred.square_().mean(dim=-1).sqrt_()
    return OutputLogitSums(
        samples=float(n),
        entries=float(n * c),
        sum_squares=torch.linalg.vector_norm(z).square(),
        logz_sum=logz.sum(),
        spread_sum=spread.sum(),
        max_abs=torch.maximum(high, -low),
        logz_max=logz.max(),
    )


def output_logit_stats(logits: Tensor) -> OutputLogitStats:
    """:func:`output_logit_sums` as floats (one host synchronisation).

    Example (row 1: log Z = log(e + e² + e³) = 3.4076; row 2: log 3):
        >>> s = output_logit_stats(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
        >>> round(s.rms, 4), s.max_abs, round(s.logz_mean, 4), round(s.logz_max, 4)
        (1.5275, 3.0, 2.2531, 3.4076)
        >>> round(s.spread, 4)  # (std of [1, 2, 3] = sqrt(2/3), std of [0, 0, 0] = 0) / 2
        0.4082
    """
    stats = output_logit_sums(logits).compute()
    # fresh sums hold tensors, so every statistic is one (as_tensor returns it as it is)
    values = torch.stack([torch.as_tensor(v) for v in stats.values()]).cpu().tolist()
    return OutputLogitStats(**dict(zip(stats, values, strict=True)))


def log_growth_rate(steps: Sequence[float], values: Sequence[float], per: float = 1000.0) -> float:
    """Growth rate of positive ``values``: least-squares slope of ``ln(value)`` per ``per`` steps.

    .. code-block:: text

        x = steps, y = ln(values)
        slope = Σ (x - x̄)(y - ȳ) / Σ (x - x̄)²,   rate = per · slope

    A quantity growing like ``a · exp(r · step / per)`` has rate ``r`` exactly, whatever ``a``:
    the rate counts e-folds per ``per`` steps (0.69 is doubling every ``per`` steps, negative is
    shrinking). The least-squares fit over a window averages out step-to-step noise that a
    two-point difference would not.

    Args:
        steps: steps of the measurements (at least two distinct ones).
        values: the measurements, all > 0.
        per: the step unit of the rate (default 1000 steps).

    Returns:
        The rate, or ``nan`` with fewer than two distinct steps.

    Example:
        >>> steps = [0, 10, 20, 30]
        >>> round(log_growth_rate(steps, [5 * math.exp(0.002 * s) for s in steps]), 6)
        2.0
    """
    if len(steps) != len(values):
        raise ValueError(f"Expected as many steps as values, got {len(steps)} and {len(values)}")
    if any(not v > 0 for v in values):
        raise ValueError(f"Expected positive values (the logarithm is fitted), got {list(values)}")
    if len(set(steps)) < 2:
        return math.nan
    x = [float(s) for s in steps]
    y = [math.log(v) for v in values]
    x_mean, y_mean = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - x_mean) * (b - y_mean) for a, b in zip(x, y, strict=True))
    sxx = sum((a - x_mean) ** 2 for a in x)
    return per * sxy / sxx
