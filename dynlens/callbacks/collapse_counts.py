"""Collapse counts of the steps measured since the last log, pooled on the device, bounded.

``SoftmaxCollapseMonitor`` measures a step's micro-batches into
:class:`~dynlens.collapse.CollapseIndicators` (per-sample tensors) and logs the share of collapsed
samples once per logging interval. :class:`PendingCounts` keeps each measured step's indicators
and counts them all at once at the log (one pass, no host sync in between); once more than
:data:`PENDING_SAMPLES` samples wait, it counts them ahead of the log and keeps only the counts,
so memory stays bounded for any batch size and interval. A checkpoint holds the counts, one row
per step (:meth:`PendingCounts.rows`, :func:`counted_from_rows`).
"""

from __future__ import annotations

import torch

from ..collapse import CollapseIndicators, count_collapse

#: Samples whose per-sample indicators are kept before counting them ahead of the log (about
#: 9 MB): small batches are counted many steps at a time, large ones bound the memory.
PENDING_SAMPLES = 2**20

Counted = list[tuple[list[int], torch.Tensor]]


class PendingCounts:
    """Per-step ``[samples, collapsed, zero-loss]`` counts of the steps measured since the last
    log (module docstring). Its fields are state the monitor declares (``owner=``)."""

    def __init__(self) -> None:
        #: The indicators of the step being measured, one per micro-batch.
        self.found: list[CollapseIndicators] = []
        #: Measured steps not counted yet: (logging step, its indicators).
        self.pending: list[tuple[int, list[CollapseIndicators]]] = []
        #: Samples in ``pending``.
        self.samples = 0
        #: Steps counted ahead of the log: blocks of (logging steps, counts per step).
        self.counted: Counted = []

    @property
    def empty(self) -> bool:
        """Nothing measured since the last log."""
        return not (self.pending or self.counted)

    def add(self, found: CollapseIndicators) -> None:
        """A micro-batch of the step being measured."""
        self.found.append(found)

    def end_step(self, step: int) -> bool:
        """The step being measured is whole (its optimizer stepped); whether it had samples."""
        if not self.found:
            return False
        self.pending.append((step, self.found))
        self.samples += sum(found.top.numel() for found in self.found)
        self.found = []
        if self.samples > PENDING_SAMPLES:  # count now, keep the counts
            self.counted = [self.counts()]
            self.pending, self.samples = [], 0
        return True

    def counts(self) -> tuple[list[int], torch.Tensor]:
        """Logging steps and ``[samples, collapsed, zero-loss]`` counts of every step measured
        since the last log, one row per step; the indicators kept are counted all at once."""
        steps = [step for block, _ in self.counted for step in block]
        blocks = [counts for _, counts in self.counted]
        if self.pending:
            items = [found for _, step_found in self.pending for found in step_found]
            counts = count_collapse(items)
            if len(items) > len(self.pending):  # several micro-batches per step: add them up
                owner = [k for k, (_, step_found) in enumerate(self.pending) for _ in step_found]
                counts = counts.new_zeros(len(self.pending), 3).index_add_(
                    0, torch.tensor(owner, device=counts.device), counts
                )
            steps += [step for step, _ in self.pending]
            blocks.append(counts)
        return steps, torch.cat(blocks) if len(blocks) > 1 else blocks[0]

    def take(self, keep: bool = False) -> tuple[list[int], torch.Tensor]:
        """:meth:`counts`, for a log: forgotten after it, or kept counted with ``keep`` (a run
        ending inside a logging interval keeps them for its checkpoint)."""
        steps, per_step = self.counts()
        self.pending, self.samples = [], 0
        self.counted = [(steps, per_step)] if keep else []
        return steps, per_step

    def rows(self) -> list[tuple[int, list[int]]]:
        """The counts as a checkpoint holds them: ``(step, [samples, collapsed, zero-loss])``."""
        if self.empty:
            return []
        steps, counts = self.counts()
        return list(zip(steps, counts.tolist(), strict=True))


def counted_from_rows(rows: list[tuple[int, list[int]]]) -> Counted:
    """Counted steps restored from a checkpoint's :meth:`PendingCounts.rows`."""
    if not rows:
        return []
    return [([int(s) for s, _ in rows], torch.tensor([c for _, c in rows], dtype=torch.int64))]
