"""The training loss as micro-batches: what lets ``HessianMonitor`` take exact products of a
batch whose whole graph does not fit (:class:`dynlens.curvature.MicroBatchLoss`).

A batch is split along the sample dimension that its tensors share (tensors, and those inside
dicts, lists, tuples and named tuples, e.g. a Hugging Face ``BatchEncoding``; other objects are
passed whole). The split is used only where the batch's loss is the mean of its micro-batches'
losses, which is what makes the Hessian the weighted sum of theirs:

* not with BatchNorm in training mode, whose statistics couple the samples;
* not where the losses of the two halves, weighted by their samples, do not add up to the loss
  of the batch (to float tolerance): a loss normalised by a count that differs between the
  halves (the non-padding tokens of each), an auxiliary loss over the batch (MoE balancing),
  in-batch negatives. The check runs with dropout off (every module's ``training`` flag is
  lowered for its two forwards and restored), because dropout would draw other masks for a
  micro-batch than for the batch. With dropout on in the measurement itself, each micro-batch
  draws its own fixed masks: the products are exact for the loss under those masks, as the
  whole batch's are for its own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import curvature
from .replay import map_tensors

#: Relative difference between the batch's loss and its halves' weighted sum below which the loss
#: counts as their mean (float32 sums in another order differ by about 1e-7).
TOLERANCE = 1e-5


def batch_samples(batch: Any) -> int | None:
    """The length of the first dimension that every tensor of ``batch`` shares, ``None`` where
    they disagree or there is none."""
    sizes: set[int] = set()
    map_tensors(batch, lambda t: sizes.add(t.shape[0]) if t.ndim >= 1 else None)
    return sizes.pop() if len(sizes) == 1 else None


def batch_rows(batch: Any, start: int, stop: int) -> Any:
    """The samples ``start:stop`` of ``batch`` (every tensor sliced along its first dimension)."""
    return map_tensors(batch, lambda t: t[start:stop] if t.ndim >= 1 else t)


def micro_batched(
    module: nn.Module,
    batch: Any,
    params: dict[str, Tensor],
    loss_on: Callable[[dict[str, Tensor], Any], Tensor],
) -> tuple[curvature.MicroBatchLoss | None, str | None]:
    """The loss on ``batch`` as a :class:`~dynlens.curvature.MicroBatchLoss`, and why it is not
    the mean of its micro-batches' where it is not (then ``exact=False``: sliced only to meter
    memory; ``None`` where the batch has no sample dimension). ``loss_on(params, batch)`` is the
    replayed loss on any batch (module docstring)."""
    samples = batch_samples(batch)
    if samples is None or samples < 2:
        return None, "the batch has no sample dimension that all its tensors share"

    def rows(p: dict[str, Tensor], start: int, stop: int) -> Tensor:
        return loss_on(p, batch_rows(batch, start, stop))

    why = _why_not_the_mean(module, batch, samples, params, loss_on)
    return curvature.MicroBatchLoss(rows, samples, exact=why is None, why_not=why or ""), why


def _why_not_the_mean(
    module: nn.Module,
    batch: Any,
    samples: int,
    params: dict[str, Tensor],
    loss_on: Callable[[dict[str, Tensor], Any], Tensor],
) -> str | None:
    if any(isinstance(m, _BatchNorm) and m.training for m in module.modules()):
        return "BatchNorm in training mode couples the samples of a batch"
    half = (samples + 1) // 2
    with torch.no_grad(), _training_off(module):
        whole = float(loss_on(params, batch))
        parts = [
            (stop - start) / samples * float(loss_on(params, batch_rows(batch, start, stop)))
            for start, stop in ((0, half), (half, samples))
        ]
    added = math.fsum(parts)
    if not math.isclose(added, whole, rel_tol=TOLERANCE, abs_tol=1e-12):
        return (
            f"the loss is not the mean of its samples' losses: its halves give {added:.7g} where "
            f"the batch gives {whole:.7g} (a loss normalised by a count that differs per "
            "micro-batch, e.g. of non-padding tokens, or a term over the whole batch)"
        )
    return None


@contextlib.contextmanager
def _training_off(module: nn.Module) -> Iterator[None]:
    """Every module's ``training`` flag lowered inside the block (dropout off), then restored."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in modes:
            m.training = False
        yield
    finally:
        for m, mode in modes:
            m.training = mode
