"""The targets of a training step's logits, read from its batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from ..validate import ConfigurationError

TargetsArg = Literal["auto"] | Callable[[Any], torch.Tensor] | None
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def shift_targets_left(targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Targets of a causal LM aligned with its logits: position t gets ``targets[..., t + 1]``
    and the last position, which predicts nothing in the sequence, gets ``ignore_index``."""
    shifted = torch.full_like(targets, ignore_index)
    shifted[..., :-1] = targets[..., 1:]
    return shifted


def batch_targets(
    batch: Any, targets: TargetsArg, logits: torch.Tensor, shift: bool = False
) -> torch.Tensor | None:
    """Class-index targets for ``logits`` from the batch, or ``None`` when there are none.

    ``"auto"`` takes the second element of a tuple/list batch or a ``labels``/``targets``/``y``
    entry of a dict batch, when it is an integer tensor shaped like ``logits.shape[:-1]`` (or
    with as many elements, as ``(B, T)`` labels for logits flattened to ``(B·T, C)``); a callable
    receives the batch and returns the targets. ``shift``: the logits are a causal LM's, scored
    at position t against ``targets[..., t + 1]`` (:func:`shift_targets_left`).
    """
    if targets is None:
        return None
    found: Any
    if callable(targets):
        found = targets(batch)
    elif isinstance(batch, Mapping):
        found = next((batch[k] for k in TARGET_KEYS if k in batch), None)
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        found = batch[1]
    else:
        found = None
    usable = (
        isinstance(found, torch.Tensor)
        and not found.is_floating_point()
        and found.numel() == logits.shape[:-1].numel()
        and (found.shape == logits.shape[:-1] or not shift)
    )
    if usable:
        if shift:
            found = shift_targets_left(found)
        return found.to(logits.device).reshape(logits.shape[:-1])
    if callable(targets):
        shape = tuple(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
        raise ConfigurationError(
            f"The `targets` function returned {shape}; expected integer class indices of shape "
            f"{tuple(logits.shape[:-1])} (the logits' shape without the class dimension)."
        )
    return None
