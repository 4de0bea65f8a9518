"""Softmax Collapse measurements: the pure functions behind ``SoftmaxCollapseMonitor``.

Prieto, Barsbey, Mediano & Birdal 2025, *Grokking at the Edge of Numerical Stability*
(arXiv:2501.04697). Softmax is computed as ``exp(z_i - m) / S`` with ``m = max_j z_j`` and
``S = sum_j exp(z_j - m)``. The top term of ``S`` is exactly 1, so once every other term is below
half an ulp of 1 (``eps / 2``), ``S`` *rounds to exactly 1*: the top probability is exactly 1, the
loss of a correctly classified sample is exactly 0 and so is its gradient for the correct class.
Such samples stop contributing to learning (**Softmax Collapse**, SC), which the paper links to
the stalls of grokking. SC is a property of the precision the softmax is computed in.

The alignment of the gradient with naive loss minimisation, which ``SoftmaxCollapseMonitor``
logs alongside, is in :mod:`dynlens.alignment`.

Everything here is plain torch: statistics are device tensors (counts, not fractions, so they
reduce across processes by summing) and nothing synchronises with the host except the
convenience functions returning ``float``.

Threshold (two classes, logits ``[d, 0]``): ``S = 1 + exp(-d)`` rounds to 1 iff
``exp(-d) <= eps / 2`` (a tie rounds to the even neighbour, which is 1), i.e.
``d >= ln(2 / eps)``:

========  ==========  =============  ==================
dtype     eps         ln(2 / eps)    first integer gap
========  ==========  =============  ==================
float16   2^-10       7.62           8
bfloat16  2^-7        5.55           6
float32   2^-23       16.64          17
float64   2^-52       36.74          37
========  ==========  =============  ==================
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dynlens.nn import Activation, _check_activation, _log_s, _s, stablemax_cross_entropy

__all__ = [
    "CollapseIndicators",
    "CollapseStats",
    "collapse_indicators",
    "collapse_stats",
    "collapse_threshold",
    "collapsed_mask",
    "count_collapse",
    "runner_up_gap",
    "softmax_collapse_fraction",
    "stablemax_collapse_fraction",
]


def _resolve_dtype(logits: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        dtype = logits.dtype
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"Expected a floating dtype (e.g. torch.float32) or None for the logits' own, got "
            f"{dtype!r}; pass the precision the loss is computed in"
        )
    return dtype


def _rows(logits: Tensor) -> Tensor:
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"Expected logits of shape (..., C) with C >= 1 classes last, got {tuple(logits.shape)}"
        )
    return logits.detach().reshape(-1, logits.shape[-1])


def _softmax_collapsed(z: Tensor, log_probs: Tensor | None = None) -> Tensor:
    # PyTorch's log_softmax (the kernel F.cross_entropy uses) returns (z - max z) - log S, so its
    # largest entry is -log S: exactly 0 iff S rounds to 1, and never 0 otherwise (log(1 + eps)
    # is a normal float). NaN rows compare unequal and never count.
    if log_probs is None:
        log_probs = F.log_softmax(z, dim=-1)
    return log_probs.amax(dim=-1) == 0


def collapsed_mask(
    logits: Tensor, *, activation: Activation = "softmax", dtype: torch.dtype | None = None
) -> Tensor:
    """Per-sample Softmax Collapse indicator, shape ``logits.shape[:-1]``.

    Softmax: the normaliser ``S = sum_j exp(z_j - max z)`` rounds to exactly 1 in ``dtype``, as
    computed by ``F.log_softmax`` — the kernel ``F.cross_entropy`` runs, so the mask says exactly
    which samples have a zero loss (when correctly classified) and a zero correct-class gradient
    in that precision on that device. On the CPU the float16/bfloat16 kernels accumulate ``S`` in
    float32 and round it once to ``dtype``. StableMax: ``sum_j s(z_j) == s(max z)`` exactly in
    ``dtype``, i.e. the other terms are absorbed by the top one. Rows with non-finite logits
    never count as collapsed.

    Args:
        logits: ``(..., C)``, classes last.
        activation: ``"softmax"`` or ``"stablemax"``.
        dtype: precision of the sum (the loss's precision); default the logits' dtype.
    """
    _check_activation(activation)
    dtype = _resolve_dtype(logits, dtype)
    z = _rows(logits).to(dtype)
    if activation == "softmax":
        collapsed = _softmax_collapsed(z)
    else:
        s = _s(z)
        collapsed = s.sum(dim=-1) == s.amax(dim=-1)
    return collapsed.reshape(logits.shape[:-1])


def _fraction(mask: Tensor) -> float:
    if mask.numel() == 0:
        return math.nan
    return mask.sum().item() / mask.numel()


def softmax_collapse_fraction(logits: Tensor, dtype: torch.dtype | None = None) -> float:
    """Share of samples in Softmax Collapse: ``sum_j exp(z_j - max z)`` is exactly 1 in ``dtype``.

    The SC metric of Prieto et al. 2025 (their reference code's ``softmax_collapse``). Samples are
    all leading positions of ``(..., C)`` logits; ``dtype`` defaults to the logits' own (pass the
    precision your loss is computed in). Synchronises with the host once; ``nan`` for no samples.

    Example:
        >>> logits = torch.tensor([[16.0, 0.0], [17.0, 0.0], [40.0, 0.0], [1.0, 0.0]])
        >>> softmax_collapse_fraction(logits)  # float32: gaps >= 17 collapse
        0.5
        >>> softmax_collapse_fraction(logits, dtype=torch.float64)  # float64: from 37
        0.25
    """
    return _fraction(collapsed_mask(logits, activation="softmax", dtype=dtype))


def stablemax_collapse_fraction(logits: Tensor, dtype: torch.dtype | None = None) -> float:
    """Share of samples whose StableMax sum ``sum_j s(z_j)`` is exactly ``s(max z)`` in ``dtype``.

    The StableMax analogue of :func:`softmax_collapse_fraction`: the top term has absorbed the
    others. With ``s`` linear for positive logits this needs ``s(max z)`` around ``2 / eps`` times
    the rest (16.7 million in float32), which is why StableMax resists collapse.

    Example:
        >>> stablemax_collapse_fraction(torch.tensor([[2047.0, 0.0], [2046.0, 0.0]]), torch.float16)
        0.5
    """
    return _fraction(collapsed_mask(logits, activation="stablemax", dtype=dtype))


def collapse_threshold(
    dtype: torch.dtype, activation: Activation = "softmax", num_classes: int = 2
) -> float:
    """The top-minus-runner-up gap at which collapse sets in: ``ln(2 / eps) + ln(C - 1)``.

    The gap is measured in log-activation units: logits for softmax, ``log s(z)`` for StableMax
    (for which ``StableMax = softmax(log s(z))``). Derivation: the sum ``1 + r`` of the top term
    and the rest ``r`` rounds to 1 iff ``r <= eps / 2``. With two classes ``r = exp(-gap)``, so
    collapse starts at ``gap = ln(2 / eps)``: 16.64 in float32 (integer gaps collapse from 17),
    36.74 in float64 (37), 7.62 in float16 (8), 5.55 in bfloat16 (6).

    With ``C`` classes the rest depends on every logit, and for float32/float64 also on the
    summation order: a sum that adds the top term first absorbs each term below ``eps / 2`` on its
    own. Two bounds hold for any logits and order:

    * **no** sample whose runner-up gap is below ``collapse_threshold(dtype)`` (``C = 2``) is
      collapsed, since the runner-up term alone exceeds ``eps / 2``;
    * **every** sample whose runner-up gap is at least ``collapse_threshold(dtype, num_classes=C)``
      is, since then ``r <= (C - 1) exp(-gap) <= eps / 2``. This worst case is attained when the
      ``C - 1`` other logits tie and the sum is exact before rounding (float16 and bfloat16).

    dynlens reports headroom against the first bound (:attr:`CollapseStats.headroom`): positive
    headroom guarantees that a sample is not collapsed, whatever the other logits are, and the
    runner-up gap is a per-sample number that reads the same for every ``C``.

    For StableMax the top term ``s(max z)`` is not 1 but any float; its half-ulp lies between
    ``eps / 4`` and ``eps / 2`` of it, so the same thresholds are necessary bounds and collapse is
    certain ``ln 2`` later.

    Args:
        dtype: precision of the softmax sum.
        activation: ``"softmax"`` or ``"stablemax"`` (chooses the units, not the value).
        num_classes: ``C >= 2``.

    Example:
        >>> round(collapse_threshold(torch.float32), 4), round(collapse_threshold(torch.float64), 4)
        (16.6355, 36.7368)
    """
    _check_activation(activation)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"Expected a floating torch.dtype, got {dtype!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"Expected num_classes to be an int >= 2, got {num_classes!r}")
    return math.log(2 / torch.finfo(dtype).eps) + math.log(num_classes - 1)


class CollapseIndicators(NamedTuple):
    """Per-sample evidence of collapse for one batch, not yet counted (device tensors).

    Counting is left for later so that a monitor measuring every step keeps a step's cost to the
    passes over the logits and counts many steps at once (:func:`count_collapse`).

    Attributes:
        top: ``(N,)``, ``<= 0``, exactly 0 for the samples in collapse (:func:`collapsed_mask`):
            softmax, the largest log-probability ``-log S``; StableMax, ``s(max z) - sum_j s(z_j)``.
        target: ``(N,)``, exactly 0 for the samples whose per-sample loss is exactly 0 (the
            target's log-probability); ``None`` without targets.
        valid: ``(N,)`` bool, the target lies in ``[0, C)`` (others, such as the ``ignore_index``
            -100 of padding, have no loss and never count); ``None`` without targets.
    """

    top: Tensor
    target: Tensor | None
    valid: Tensor | None


def collapse_indicators(
    logits: Tensor,
    targets: Tensor | None = None,
    *,
    activation: Activation = "softmax",
    dtype: torch.dtype | None = None,
    log_probs: Tensor | None = None,
) -> CollapseIndicators:
    """Which samples are in collapse, and which have a loss of exactly 0, without counting them.

    Softmax: one ``F.log_softmax`` pass (the kernel ``F.cross_entropy`` runs) gives both: the
    largest log-probability is ``-log S``, exactly 0 iff ``S`` rounds to 1, and the per-sample loss
    is exactly ``-log_probs[target]``.

    Args:
        logits: ``(..., C)``, classes last.
        targets: class indices of shape ``logits.shape[:-1]``, or ``None``.
        activation: ``"softmax"`` or ``"stablemax"``.
        dtype: precision the loss is computed in; default the logits' dtype.
        log_probs: ``F.log_softmax(logits.to(dtype), dim=-1)`` when it is at hand already (as
            :meth:`dynlens.CrossEntropyLoss.register_log_probs_hook` gives it), so the pass is not
            run twice; softmax only, never modified.
    """
    _check_activation(activation)
    dtype = _resolve_dtype(logits, dtype)
    rows = _rows(logits)
    index = valid = None
    if targets is not None:
        if targets.shape != logits.shape[:-1] or targets.is_floating_point():
            raise ValueError(
                f"Expected targets as class indices of shape {tuple(logits.shape[:-1])}, got "
                f"{targets.dtype} of shape {tuple(targets.shape)}"
            )
        flat = targets.reshape(-1).to(device=rows.device, dtype=torch.long)
        index = flat.clamp(0, rows.shape[-1] - 1)  # a valid place to look up, for every target
        valid = index == flat
    if activation == "stablemax":
        if log_probs is not None:
            raise ValueError("log_probs are softmax log-probabilities; pass them for softmax only")
        z = rows.to(dtype)
        s = _s(z)
        top = s.amax(dim=-1) - s.sum(dim=-1)  # float subtraction: 0 exactly when equal
        target = None
        if index is not None:
            target = -stablemax_cross_entropy(z, index, reduction="none", dtype=dtype)
        return CollapseIndicators(top=top, target=target, valid=valid)
    log_probs = _log_probs(rows, dtype, log_probs, logits.shape)
    top = log_probs.amax(dim=-1)  # first: the lookup below then reads from the cache
    target = None
    if index is not None:
        # on the flat rows, index_select is several times faster than gather on CPUs
        offsets = _row_offsets(*log_probs.shape, device=log_probs.device)
        target = log_probs.reshape(-1).index_select(0, offsets + index)
    return CollapseIndicators(top=top, target=target, valid=valid)


def _log_probs(
    rows: Tensor, dtype: torch.dtype, log_probs: Tensor | None, shape: torch.Size
) -> Tensor:
    if log_probs is None:
        return F.log_softmax(rows.to(dtype), dim=-1)
    if log_probs.shape != shape or log_probs.dtype != dtype:
        raise ValueError(
            f"Expected log_probs in {dtype} of shape {tuple(shape)} (the logits'), got "
            f"{log_probs.dtype} of shape {tuple(log_probs.shape)}"
        )
    return log_probs.detach().reshape(rows.shape)


@functools.lru_cache(maxsize=8)
def _row_offsets(rows: int, cols: int, device: torch.device) -> Tensor:
    return torch.arange(0, rows * cols, cols, device=device)


def count_collapse(items: Sequence[CollapseIndicators]) -> Tensor:
    """Count :func:`collapse_indicators` of several batches: ``(len(items), 3)`` int64 rows of
    ``[samples, collapsed, zero-loss]`` (zero-loss 0 without targets), on the device, no host
    sync. Batches of one size and kind are counted together, with a few operations in all.

    Example:
        >>> a = collapse_indicators(torch.tensor([[20.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 1]))
        >>> count_collapse([a, a])
        tensor([[2, 1, 1],
                [2, 1, 1]])
    """
    if not items:
        raise ValueError("Expected at least one CollapseIndicators to count")
    first = items[0]

    def alike(item: CollapseIndicators) -> bool:
        if item.top.shape != first.top.shape or item.top.dtype != first.top.dtype:
            return False
        if item.target is None or first.target is None:
            return item.target is None and first.target is None
        return item.target.dtype == first.target.dtype

    if len(items) > 1 and not all(alike(item) for item in items):
        return torch.cat([count_collapse([item]) for item in items])
    top = torch.stack([item.top for item in items])
    collapsed = (top == 0).sum(dim=-1)
    if first.target is None:
        zero_loss = torch.zeros_like(collapsed)
    else:
        targets, valids = [], []
        for item in items:
            # every item has targets, as the first has (alike); valid comes with them
            assert item.target is not None and item.valid is not None
            targets.append(item.target)
            valids.append(item.valid)
        zero_loss = ((torch.stack(targets) == 0) & torch.stack(valids)).sum(dim=-1)
    samples = torch.full_like(collapsed, top.shape[-1])
    return torch.stack([samples, collapsed, zero_loss], dim=-1)


def runner_up_gap(
    logits: Tensor,
    *,
    activation: Activation = "softmax",
    dtype: torch.dtype | None = None,
    log_probs: Tensor | None = None,
) -> Tensor:
    """Per-sample top-minus-runner-up gap in log-activation units, shape ``(N,)``.

    Computed from the logits rounded to ``dtype`` (the values the loss sees), in at least float32;
    ``inf`` for a single class. :func:`collapse_threshold` minus the gap is the headroom. In
    float32/float64 softmax it comes from the log-probabilities (``log_probs`` when given), which
    differ by the logits' differences up to a few roundings at the size of ``log p`` (~1e-6 near
    float32's threshold).
    """
    _check_activation(activation)
    dtype = _resolve_dtype(logits, dtype)
    rows = _rows(logits)
    wide = torch.promote_types(dtype, torch.float32)
    if rows.shape[-1] == 1:
        return torch.full(rows.shape[:-1], math.inf, dtype=wide, device=rows.device)
    if activation == "softmax" and dtype == wide:
        fresh = log_probs is None
        scores = _log_probs(rows, dtype, log_probs, logits.shape)
    else:
        fresh = True
        scores = rows.to(dtype).to(wide)
        if activation == "stablemax":
            scores = _log_s(scores)
    # max + scatter + amax is several times faster than topk(2) on CPUs; a tensor of our own
    # takes the scatter in place
    top, where = scores.max(dim=-1, keepdim=True)
    others = scores.scatter_ if fresh else scores.scatter
    return top.squeeze(-1) - others(-1, where, -math.inf).amax(dim=-1)


@dataclass(frozen=True)
class CollapseStats:
    """Sufficient statistics of Softmax Collapse for one batch, as device tensors.

    Across processes, ``num_samples``, ``num_collapsed`` and ``num_zero_loss`` reduce by sum;
    ``gap`` is per sample (gather it, or reduce ``gap.max()`` by max for the worst sample).

    Attributes:
        num_samples: 0-dim int64, number of samples (all leading positions of the logits).
        num_collapsed: 0-dim int64, samples in collapse (:func:`collapsed_mask`).
        num_zero_loss: 0-dim int64, samples whose per-sample cross-entropy for the activation,
            computed in ``dtype``, is exactly 0; ``None`` when no targets were given.
        gap: ``(num_samples,)`` top minus runner-up in log-activation units (``inf`` for one
            class), computed from the logits rounded to ``dtype``, in at least float32;
            ``None`` when computed with ``with_gap=False``.
        threshold: :func:`collapse_threshold` for the dtype and activation.
    """

    num_samples: Tensor
    num_collapsed: Tensor
    num_zero_loss: Tensor | None
    gap: Tensor | None
    threshold: float

    @property
    def headroom(self) -> Tensor:
        """Per-sample ``threshold - gap``: positive means not collapsed (whatever ``C``)."""
        if self.gap is None:
            raise ValueError("these stats were computed with with_gap=False: no headroom")
        return self.threshold - self.gap


def collapse_stats(
    logits: Tensor,
    targets: Tensor | None = None,
    *,
    activation: Activation = "softmax",
    dtype: torch.dtype | None = None,
    with_gap: bool = True,
    log_probs: Tensor | None = None,
) -> CollapseStats:
    """Counts and per-sample headroom of Softmax (or StableMax) Collapse, without host sync.

    Prieto et al. 2025 track two shares on the training set: samples whose softmax sum is
    exactly 1 (:func:`collapsed_mask`) and samples whose loss is exactly 0. This returns both as
    counts (:func:`collapse_indicators`, counted), plus the top-minus-runner-up gap that says how
    far each sample is from collapse (:func:`runner_up_gap`; see :func:`collapse_threshold` for
    why the runner-up).

    Args:
        logits: ``(..., C)``, classes last.
        targets: class indices of shape ``logits.shape[:-1]``, or ``None``; entries outside
            ``[0, C)`` (such as the ``ignore_index`` -100 of padding) never count as zero-loss.
        activation: ``"softmax"`` or ``"stablemax"``.
        dtype: precision the loss is computed in; default the logits' dtype.
        with_gap: also compute the per-sample gap (``False``: the counts alone, cheaper).
        log_probs: softmax log-probabilities at hand already, as for
            :func:`collapse_indicators`.

    Example:
        >>> stats = collapse_stats(torch.tensor([[20.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0]))
        >>> stats.num_collapsed, stats.num_zero_loss
        (tensor(1), tensor(1))
        >>> stats.headroom
        tensor([-3.3645, 13.6355])
    """
    dtype = _resolve_dtype(logits, dtype)
    if activation == "softmax" and log_probs is None and (with_gap or targets is not None):
        log_probs = F.log_softmax(_rows(logits).to(dtype), dim=-1).reshape(logits.shape)
    found = collapse_indicators(
        logits, targets, activation=activation, dtype=dtype, log_probs=log_probs
    )
    samples, collapsed, zero_loss = count_collapse([found])[0].unbind()
    gap = None
    if with_gap:
        gap = runner_up_gap(logits, activation=activation, dtype=dtype, log_probs=log_probs)
    return CollapseStats(
        num_samples=samples,
        num_collapsed=collapsed,
        num_zero_loss=None if targets is None else zero_loss,
        gap=gap,
        threshold=collapse_threshold(dtype, activation),
    )
