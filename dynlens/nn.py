"""Numerically stable output activations and losses: StableMax, its cross-entropy, z-loss.

Remedies for the output-layer instabilities that dynlens monitors:

* **StableMax** (Prieto, Barsbey, Mediano & Birdal 2025, *Grokking at the Edge of Numerical
  Stability*, arXiv:2501.04697) replaces ``exp`` in the softmax by

  .. code-block:: text

      s(x) = x + 1        for x >= 0
      s(x) = 1 / (1 - x)  for x <  0
      StableMax(x)_i = s(x_i) / sum_j s(x_j)

  ``s`` grows linearly instead of exponentially, so the top class needs an astronomically larger
  logit before the other terms are absorbed by floating-point rounding (*Softmax Collapse*, see
  :mod:`dynlens.collapse`). The paper trains with StableMax cross-entropy computed in float64.
* **z-loss** (Wortsman et al. 2023, *Small-scale proxies for large-scale Transformer training
  instabilities*, arXiv:2309.14322): a penalty ``1e-4 * (log Z)^2`` that keeps the softmax
  normaliser near 1 and stops output logits from drifting.

Nothing here imports Lightning; every function works in a plain PyTorch loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import _reduction
from torch.utils.hooks import RemovableHandle

__all__ = [
    "CrossEntropyLoss",
    "StableMax",
    "log_stablemax",
    "stablemax",
    "stablemax_cross_entropy",
    "z_loss",
]

Activation = Literal["softmax", "stablemax"]
#: ``hook(module, input, target, log_probs)`` of :meth:`CrossEntropyLoss.register_log_probs_hook`
LogProbsHook = Callable[[nn.Module, Tensor, Tensor, Tensor], None]
Reduction = Literal["none", "mean", "sum"]

_HALF_TYPES = (torch.float16, torch.bfloat16)


def _log_s(x: Tensor) -> Tensor:
    """``log s(x)``: ``log1p(x)`` for ``x >= 0`` and ``-log1p(-x)`` for ``x < 0``.

    Working with ``log s`` instead of ``s`` keeps StableMax free of overflow: ``s(x)`` of a float16
    logit near 65504 is finite but a sum of two such terms is not, whereas ``log s`` never exceeds
    ``log1p(finfo.max)`` (about 11 in float16, 710 in float64).

    ``torch.where`` evaluates (and differentiates) both branches. Each branch's argument is clamped
    to its own half-line so that the branch *not* selected stays finite: unclamped, ``1/(1-x)`` at
    ``x = 1`` is ``1/0`` and its gradient ``inf * 0 = NaN`` poisons the selected branch's gradient.
    The clamps also keep the derivative ``1/(1+|x|)`` correct at ``x = 0`` (clamp passes the
    gradient at its boundary), where ``sign(x) * log1p(|x|)`` would give 0.
    """
    positive = torch.log1p(x.clamp(min=0))
    negative = -torch.log1p((-x).clamp(min=0))
    return torch.where(x >= 0, positive, negative)


def _s(x: Tensor) -> Tensor:
    """``s(x)`` itself, rounded in ``x``'s dtype: forward only, for measuring sums of terms.

    No gradient may flow through it: the branch of ``torch.where`` not selected may be ``inf``
    (``1/(1-x)`` at ``x = 1``), harmless in the forward pass but ``NaN`` in the backward pass.
    Losses and activations use :func:`_log_s`.
    """
    return torch.where(x >= 0, x + 1, 1 / (1 - x))


def _check_activation(activation: str) -> None:
    if activation not in get_args(Activation):
        raise ValueError(f"Expected activation in {get_args(Activation)}, got {activation!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Like PyTorch's own softmax kernels, compute reduced-precision inputs in float32 and round the
    # result once: the log-domain rounding of float16 would otherwise cost ~10 ulps of accuracy.
    return torch.float32 if dtype in _HALF_TYPES else dtype


def log_stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """Log-StableMax along ``dim``: ``log s(x_i) - log sum_j s(x_j)``.

    Prieto et al. 2025, eq. (4). Computed as ``log_softmax(log s(x))`` (identical in exact
    arithmetic, since ``softmax(log s) = s / sum s``), which cannot overflow and has finite
    gradients for every finite input, including logits of exactly 1.0 and of ±65504 in float16.
    float16/bfloat16 inputs are computed in float32 and returned in their own dtype.

    Args:
        x: logits, any shape.
        dim: the class dimension.

    Returns:
        Log-probabilities, same shape and dtype as ``x``.

    Example:
        >>> log_stablemax(torch.tensor([1.0, 0.0, -1.0])).exp()
        tensor([0.5714, 0.2857, 0.1429])
    """
    compute = _compute_dtype(x.dtype)
    return F.log_softmax(_log_s(x.to(compute)), dim=dim).to(x.dtype)


def stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """StableMax along ``dim``: ``s(x_i) / sum_j s(x_j)`` with ``s`` as in :mod:`dynlens.nn`.

    Prieto et al. 2025, eq. (3). A drop-in for :func:`torch.softmax` whose outputs sum to 1, are
    monotone in the logits and never overflow. Unlike softmax it is *not* shift invariant:
    ``stablemax(x + c) != stablemax(x)``.

    Example (``s = [2, 1, 0.5]``, sum 3.5):
        >>> stablemax(torch.tensor([1.0, 0.0, -1.0]))
        tensor([0.5714, 0.2857, 0.1429])
    """
    compute = _compute_dtype(x.dtype)
    return F.softmax(_log_s(x.to(compute)), dim=dim).to(x.dtype)


class StableMax(nn.Module):
    """Module form of :func:`stablemax`, a drop-in for :class:`torch.nn.Softmax`.

    Example:
        >>> StableMax(dim=-1)(torch.tensor([[3.0, 0.0]]))
        tensor([[0.8000, 0.2000]])
    """

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return stablemax(x, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _cross_entropy_from_log_probs(
    log_probs: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Tensor:
    """``F.cross_entropy``'s semantics applied to log-probabilities instead of logits.

    A line-by-line port of ATen's ``cross_entropy_loss`` (class-index, label-smoothing and
    class-probability paths) with the ``log_softmax`` removed. Re-applying ``log_softmax`` to
    log-probabilities is the identity only up to rounding (``logsumexp`` of them is ``log(1 + δ)``),
    which would turn an exactly-zero loss into ``±eps``; hence the explicit port.
    """
    class_dim = 0 if log_probs.dim() == 1 else 1
    n_classes = log_probs.shape[class_dim]
    weight = None if weight is None else weight.to(log_probs.dtype)
    # the class weights broadcast along the class dimension
    weight_shape = [1] * log_probs.dim()
    weight_shape[class_dim] = n_classes
    w = None if weight is None else weight.view(weight_shape)

    if target.shape == log_probs.shape:
        # Class-probability targets: ignore_index does not apply; "mean" averages over samples.
        if not target.is_floating_point():
            raise ValueError(
                "Expected a floating-point target for class probabilities (target has the "
                f"input's shape {tuple(log_probs.shape)}), got {target.dtype}; pass class "
                "indices of shape (N, d1, ...) or probabilities as floats."
            )
        probs = target.to(log_probs.dtype)
        if label_smoothing > 0:
            probs = probs * (1 - label_smoothing) + label_smoothing / n_classes
        terms = log_probs * probs if w is None else log_probs * probs * w
        if reduction == "none":
            return -terms.sum(class_dim)
        if reduction == "sum":
            return -terms.sum()
        return -terms.sum() / (log_probs.numel() / n_classes)

    nll = F.nll_loss(
        log_probs,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    if label_smoothing == 0:
        return nll
    # Uniform part of the smoothed target: -sum_c w_c log p_c, zero at ignored positions, and for
    # "mean" normalised by the same sum of target weights as the nll part.
    ignore_mask = target == ignore_index
    smooth = -(log_probs if w is None else log_probs * w).sum(class_dim)
    smooth = smooth.masked_fill(ignore_mask, 0.0)
    if reduction == "mean":
        if weight is None:
            smooth = smooth.sum() / (~ignore_mask).sum()
        else:
            kept = target.masked_select(~ignore_mask)
            smooth = smooth.sum() / weight.gather(0, kept).sum()
    elif reduction == "sum":
        smooth = smooth.sum()
    return (1 - label_smoothing) * nll + smooth * (label_smoothing / n_classes)


def _check_reduction(reduction: str) -> None:
    if reduction not in get_args(Reduction):
        raise ValueError(f"Expected reduction in {get_args(Reduction)}, got {reduction!r}")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"Expected label_smoothing in [0, 1], got {label_smoothing}")


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"Expected dtype to be a floating torch.dtype (e.g. torch.float64) or None for the "
            f"input's dtype, got {dtype!r}"
        )


def stablemax_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    dtype: torch.dtype | None = torch.float64,
) -> Tensor:
    """Cross-entropy with StableMax instead of softmax; a drop-in for :func:`F.cross_entropy`.

    Prieto et al. 2025: ``loss = -log StableMax(x)_y``. Every argument, shape and reduction
    behaves as in :func:`torch.nn.functional.cross_entropy`: ``(N, C)``, unbatched ``(C,)`` and
    ``(N, C, d1, ...)`` inputs; class-index or class-probability targets; ``weight``,
    ``ignore_index``, ``reduction`` and ``label_smoothing`` with PyTorch's exact normalisation.

    Args:
        input: logits, class dimension 1 (or 0 when unbatched).
        target: class indices or class probabilities (same shape as ``input``).
        weight, size_average, ignore_index, reduce, reduction, label_smoothing: as in
            :func:`F.cross_entropy`.
        dtype: precision of the loss computation. The default float64 matches the paper's
            reference code and pushes collapse out furthest, but float64 is slow on GPUs
            (1/2 to 1/64 of float32 throughput); the cost is small when only the ``(N, C)``
            logits are cast. ``None`` computes in the input's dtype.

    Returns:
        The loss in ``input``'s dtype.

    Example:
        >>> logits = torch.tensor([[1.0, 0.0, -1.0]])
        >>> stablemax_cross_entropy(logits, torch.tensor([0]))  # -log(2 / 3.5)
        tensor(0.5596)
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    _check_dtype(dtype)
    if input.dim() == 0:
        raise ValueError("Expected input of shape (C,), (N, C) or (N, C, d1, ...), got a scalar")
    compute = input.dtype if dtype is None else dtype
    class_dim = 0 if input.dim() == 1 else 1
    log_probs = log_stablemax(input.to(compute), dim=class_dim)
    loss = _cross_entropy_from_log_probs(
        log_probs, target, weight, ignore_index, reduction, label_smoothing
    )
    return loss.to(input.dtype)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` with a switchable activation and compute precision.

    With the defaults (``activation="softmax"``, ``dtype=None``) it is exactly
    ``nn.CrossEntropyLoss``. ``activation="stablemax"`` uses :func:`stablemax_cross_entropy`
    (Prieto et al. 2025); ``dtype`` computes the loss in that precision (e.g. ``torch.float64``,
    as the paper's reference does) and returns it in the input's dtype.

    ``activation`` and ``dtype`` are plain attributes read at every call, so a monitor (or you) can
    switch them mid-run, e.g. to StableMax or float64 at the onset of Softmax Collapse::

        loss_fn = CrossEntropyLoss()
        ...
        loss_fn.activation = "stablemax"  # from the next step on

    The softmax log-probabilities the loss computes can be observed without computing them
    again (see :meth:`register_log_probs_hook`); ``SoftmaxCollapseMonitor`` reads them this way.

    Args:
        weight, size_average, ignore_index, reduce, reduction, label_smoothing: as in
            :class:`torch.nn.CrossEntropyLoss`.
        activation: ``"softmax"`` or ``"stablemax"``.
        dtype: compute precision; ``None`` for the input's dtype (note: *not* the float64 default
            of :func:`stablemax_cross_entropy`, so that switching ``activation`` alone never
            changes the precision).

    Example:
        >>> loss_fn = CrossEntropyLoss(activation="stablemax")
        >>> loss_fn(torch.tensor([[3.0, 0.0]]), torch.tensor([0]))  # -log(4 / 5)
        tensor(0.2231)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        activation: Activation = "softmax",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        _check_reduction(self.reduction)
        _check_label_smoothing(label_smoothing)
        _check_activation(activation)
        _check_dtype(dtype)
        self.activation = activation
        self.dtype = dtype
        # an OrderedDict, as RemovableHandle keeps a weak reference to it (a dict cannot have one)
        self._log_probs_hooks: OrderedDict[int, LogProbsHook] = OrderedDict()

    def register_log_probs_hook(self, hook: LogProbsHook) -> RemovableHandle:
        """Call ``hook(module, input, target, log_probs)`` with each forward's log-probabilities.

        ``F.cross_entropy`` with class-index targets and no label smoothing is
        ``F.nll_loss(F.log_softmax(input, class_dim), ...)``. While a hook is registered, the
        loss runs these two steps itself, so the same kernels give the same loss and gradients to
        the last bit, and hands the intermediate ``log_probs`` (detached, in the compute
        ``dtype``, classes in dimension 1, or 0 for an unbatched input) to the hook. Other calls
        (StableMax, label smoothing, class-probability targets, autocast regions, whose casting
        rules differ between the whole and its steps) do not call the hook.

        ``log_probs`` is saved for the backward pass: the hook must not modify it in place, and
        should not keep it. Read what you need in the hook: kept until after the backward pass, a
        tensor as large as the logits stops the allocator from reusing its memory there (on a
        CPU that cost more than computing ``log_softmax`` again).

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._log_probs_hooks)
        self._log_probs_hooks[handle.id] = hook
        return handle

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if self.activation == "stablemax":
            return stablemax_cross_entropy(
                input,
                target,
                self.weight,
                ignore_index=self.ignore_index,
                reduction=self.reduction,
                label_smoothing=self.label_smoothing,
                dtype=self.dtype,
            )
        _check_activation(self.activation)  # the attribute may have been set to anything
        if (
            self._log_probs_hooks
            and self.label_smoothing == 0
            and not target.is_floating_point()
            and input.dim() > 0
            # autocast casts F.cross_entropy as a whole, unlike its two steps
            and not _autocast_enabled(input.device.type)
        ):
            return self._observed_forward(input, target)
        if self.dtype is None or self.dtype == input.dtype:
            return super().forward(input, target)
        _check_dtype(self.dtype)
        weight = None if self.weight is None else self.weight.to(self.dtype)
        target = target.to(self.dtype) if target.is_floating_point() else target
        loss = F.cross_entropy(
            input.to(self.dtype),
            target,
            weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
        return loss.to(input.dtype)

    def _observed_forward(self, input: Tensor, target: Tensor) -> Tensor:
        # F.cross_entropy's own decomposition for class-index targets without label smoothing
        # (aten's cross_entropy_loss: nll_loss_nd(log_softmax(input, class_dim), ...))
        _check_dtype(self.dtype)
        compute = input.dtype if self.dtype is None else self.dtype
        weight = self.weight
        if weight is not None and compute != input.dtype:  # as the unobserved forward casts it
            weight = weight.to(compute)
        log_probs = F.log_softmax(input.to(compute), dim=0 if input.dim() == 1 else 1)
        for hook in tuple(self._log_probs_hooks.values()):
            hook(self, input, target, log_probs.detach())
        loss = F.nll_loss(
            log_probs, target, weight, ignore_index=self.ignore_index, reduction=self.reduction
        )
        return loss.to(input.dtype)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, dtype={self.dtype}"


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def z_loss(logits: Tensor, dim: int = -1) -> Tensor:
    """Auxiliary z-loss: the mean over positions of ``(log Z)^2``, ``log Z = logsumexp(logits)``.

    Wortsman et al. 2023, *Small-scale proxies for large-scale Transformer training
    instabilities* (after PaLM, Chowdhery et al. 2022): adding ``1e-4 * z_loss(logits)`` to the
    loss (1e-4 is their recommended coefficient) keeps ``log Z`` near 0, which stops the output
    logits drifting to magnitudes where softmax loses precision. The coefficient is left to the
    caller so the term's weight is visible in the training code.

    Args:
        logits: any shape; ``dim`` is the class dimension.
        dim: the dimension to normalise over.

    Returns:
        A 0-dim tensor in ``logits``' dtype.

    Example:
        >>> z_loss(torch.zeros(2, 4))  # log Z = log 4 for every row
        tensor(1.9218)
    """
    return torch.logsumexp(logits, dim=dim).square().mean()
