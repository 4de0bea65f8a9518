"""Logits and their targets, decided by agreement with the loss the training step returned.

A step's logits are a tensor whose mean cross-entropy against the batch's targets reproduces the
loss ``training_step`` returned; the targets' alignment is the one that reproduces it: as given,
or shifted by one position (a causal LM scores its logits at position t against ``labels[t + 1]``).
Where both alignments reproduce it (e.g. targets that repeat one token), the model's class decides
(:func:`dynlens.callbacks.capture.is_causal_lm`): a hint, never the judge. Negative targets are
ignored, as ``ignore_index`` ignores them (-100 in PyTorch and Hugging Face, -1 in nanoGPT).

Logits may come in chunks along the token axis (a list of ``(B, Tᵢ, C)`` tensors, or a head that
runs once per chunk, as LitGPT's chunked cross-entropy does): the targets are split as they are.

The checks run once, at the first measured step (they read values on the host); a decision is
then kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .targets import TARGET_KEYS, shift_targets_left


@dataclass(frozen=True)
class Alignment:
    """Where a step's targets are in its batch (a dict key or a tuple index) and whether they
    are shifted by one position."""

    key: str | int | None  # None: the batch is one tensor (LitGPT's pretraining layout)
    shift: bool

    def describe(self) -> str:
        where = "the batch" if self.key is None else f"batch[{self.key!r}]"
        how = "shifted by one position (the logits at t score target t + 1)" if self.shift else ""
        return f"targets: {where}" + (f", {how}" if how else ", as given")

    def targets(self, batch: Any, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """The targets of ``chunks`` from ``batch``, aligned and split as the chunks are."""
        try:
            found = batch if self.key is None else batch[self.key]
        except (KeyError, IndexError, TypeError):
            return None
        if not _is_index_tensor(found):
            return None
        return fit_targets(found, chunks, self.shift)


def _is_index_tensor(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
        and value.numel() > 0
    )


def integer_tensors(batch: Any) -> list[tuple[str | int | None, torch.Tensor]]:
    """The batch's tensors that can be class indices, the likely targets first: a dict's
    ``labels``/``targets``/``y``… entries, then its other keys; a tuple's second element onward,
    then its first; a batch that is one tensor itself (key ``None``)."""
    if isinstance(batch, torch.Tensor):
        return [(None, batch)] if _is_index_tensor(batch) else []
    if isinstance(batch, Mapping):
        keys = [k for k in TARGET_KEYS if k in batch] + [k for k in batch if k not in TARGET_KEYS]
        return [(k, batch[k]) for k in keys if isinstance(k, str) and _is_index_tensor(batch[k])]
    if isinstance(batch, (tuple, list)):
        order = [*range(1, len(batch)), 0] if batch else []
        return [(i, batch[i]) for i in order if _is_index_tensor(batch[i])]
    return []


def fit_targets(
    targets: torch.Tensor, chunks: Sequence[torch.Tensor], shift: bool
) -> list[torch.Tensor] | None:
    """``targets`` aligned with the logits ``chunks`` (shifted when ``shift``) and split along
    the token axis as they are; ``None`` when the shapes do not fit."""
    if not chunks:
        return None
    if shift:
        if targets.dim() < 2:  # a vector of samples has no positions to shift along
            return None
        positions = sum(c.shape[-2] for c in chunks) if chunks[0].dim() >= 3 else -1
        # one more position than the logits (the inputs are its first T, as LitGPT's
        # pretraining reads a (B, T + 1) batch): position t scores target t + 1, all of them
        if targets.shape[-1] == positions + 1:
            targets = targets[..., 1:]
        else:
            targets = shift_targets_left(targets)
    if len(chunks) == 1:
        rows = chunks[0].shape[:-1]
        return [targets.reshape(rows)] if rows.numel() == targets.numel() else None
    if all(c.dim() == targets.dim() + 1 and c.shape[:-2] == targets.shape[:-1] for c in chunks):
        sizes = [c.shape[-2] for c in chunks]
        if sum(sizes) == targets.shape[-1]:
            return list(targets.split(sizes, dim=-1))
    return None


def mean_cross_entropy(chunks: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """Mean cross-entropy (in float32 at least) of the logits ``chunks`` against ``targets``,
    negative targets ignored; NaN where no target counts or an index is out of range."""
    total, count = 0.0, 0
    for logits, target in zip(chunks, targets, strict=True):
        classes = logits.shape[-1]
        flat = target.reshape(-1).to(logits.device)
        valid = flat >= 0
        if classes < 2 or int(flat.max()) >= classes:
            return float("nan")
        rows = logits.detach().reshape(-1, classes)
        rows = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows
        loss = F.cross_entropy(rows, flat.clamp(min=0), reduction="none")
        total += float(torch.where(valid, loss, 0.0).sum())
        count += int(valid.sum())
    return total / count if count else float("nan")


def tolerance(*dtypes: torch.dtype) -> float:
    """Relative agreement expected between two computations of one mean cross-entropy: the
    float32 sums' rounding (1e-5), or two units in the last place of the coarsest dtype."""
    return max([1e-5] + [2 * torch.finfo(d).eps for d in dtypes if d.is_floating_point])


@dataclass(frozen=True)
class Reading:
    """One candidate's mean cross-entropy under one alignment, against the step's loss."""

    alignment: Alignment
    value: float
    loss: float

    @property
    def discrepancy(self) -> float:
        return abs(self.value - self.loss) / max(abs(self.loss), 1e-12)


def readings(chunks: Sequence[torch.Tensor], batch: Any, loss: float) -> list[Reading]:
    """Every alignment of the batch's targets that fits ``chunks``, with its mean cross-entropy,
    closest to ``loss`` first."""
    found = []
    for key, targets in integer_tensors(batch):
        for shift in (False, True):
            fitted = fit_targets(targets, chunks, shift)
            if fitted is None:
                continue
            value = mean_cross_entropy(chunks, fitted)
            if value == value:  # not NaN
                found.append(Reading(Alignment(key, shift), value, loss))
    return sorted(found, key=lambda r: r.discrepancy)


def choose(found: Sequence[Reading], tol: float, hint_shift: bool) -> Reading | None:
    """The alignment that reproduces the loss (within ``tol``), or ``None``. Where the two
    alignments of the best-agreeing targets both reproduce it, ``hint_shift`` (the model's class
    says causal LM) decides."""
    matching = [r for r in found if r.discrepancy <= tol]
    if not matching:
        return None
    best = matching[0]
    twin = [r for r in matching if r.alignment.key == best.alignment.key]
    if len({r.alignment.shift for r in twin}) == 2:
        return next(r for r in twin if r.alignment.shift is hint_shift)
    return best
