"""The targets a monitor reads for a step's logits, as :class:`LogitsCapture` decided their
alignment (:mod:`.agreement`), or as the monitor's arguments decide by hand."""

from __future__ import annotations

from typing import Any, Literal

import torch

from .agreement import Alignment, fit_targets
from .logits import LogitsCapture
from .targets import TargetsArg, batch_targets


def shifts(capture: LogitsCapture, shift_targets: bool | Literal["auto"]) -> bool:
    """Whether the targets are shifted (a causal LM's logits at position t are scored against
    ``labels[t + 1]``): by hand, else as the agreement with the loss decided, else as the model's
    class says."""
    if shift_targets != "auto":
        return shift_targets
    alignment = capture.alignment
    return alignment.shift if alignment is not None else capture.causal_lm


def targets_of(
    capture: LogitsCapture,
    batch: Any,
    taken: list[torch.Tensor],
    targets: TargetsArg,
    shift_targets: bool | Literal["auto"],
) -> list[torch.Tensor | None]:
    """The targets of each of a step's logits (chunks): the alignment that reproduced the loss;
    none where nothing did (unless the shift is decided by hand); else read as
    :func:`batch_targets` reads them."""
    shift, by_hand = shifts(capture, shift_targets), shift_targets != "auto"
    if targets == "auto" and capture.alignment is not None:
        found = Alignment(capture.alignment.key, shift).targets(batch, taken)
        if found is not None:
            return list(found)
    if targets == "auto" and capture.disagreement is not None and not by_hand:
        return [None] * len(taken)  # nothing reproduced the loss: the logits alone
    if len(taken) == 1:
        return [batch_targets(batch, targets, taken[0], shift)]
    whole = targets(batch) if callable(targets) else None
    fitted = fit_targets(whole, taken, shift) if isinstance(whole, torch.Tensor) else None
    return list(fitted) if fitted is not None else [None] * len(taken)


def targets_said(
    capture: LogitsCapture, targets: TargetsArg, shift_targets: bool | Literal["auto"]
) -> str | None:
    """How the targets were aligned, once decided, for the monitor's ``targets`` event
    (``None``: nothing to say)."""
    if targets != "auto" or not capture.aligned:
        return None
    by_hand = shift_targets != "auto"
    miss = capture.disagreement
    if capture.alignment is not None and miss is not None and not by_hand:
        return (
            f"no alignment of the batch's targets reproduces the loss training_step returned "
            f"({miss.loss:.6g}; their mean cross-entropy is {miss.value:.6g}, so the loss has "
            f"other terms): {capture.alignment.describe()}, the only alignment their shape allows"
        )
    if capture.alignment is not None:
        how = Alignment(capture.alignment.key, shifts(capture, shift_targets)).describe()
        if by_hand:
            return f"{how} (shift_targets={shift_targets}, by hand)"
        return f"{how}: its mean cross-entropy reproduces the loss training_step returned"
    if miss is None:
        return None
    return (
        f"no alignment of the batch's targets reproduces the loss training_step returned "
        f"({miss.loss:.6g}): the closest, {miss.alignment.describe()}, gives a mean "
        f"cross-entropy of {miss.value:.6g}"
        + (
            f"; shift_targets={shift_targets} decides by hand"
            if by_hand
            else "; Softmax Collapse is counted from the logits alone and the keys that need "
            "targets are left out (decide by hand with shift_targets= or targets=)"
        )
    )
