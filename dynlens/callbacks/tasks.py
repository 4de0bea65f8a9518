"""Task boundaries of continual evaluation: which task is being trained, and when a new one starts.

In this order of precedence (the class docstring of
:class:`~dynlens.callbacks.continual.ContinualEvaluation` says it for users):

1. ``start_task(task)``: between fits, the next fit trains that task; during a fit, it starts
   at the next evaluation;
2. the datamodule's ``current_task`` attribute, read when a fit starts and before every
   evaluation: a new value starts that task;
3. otherwise every new fit starts the next task of ``eval_sets`` (in its order), except a fit
   resumed from a checkpoint, which continues the checkpoint's task.

:class:`TaskBoundaries` decides; the callback starts the tasks it yields (in
:class:`~dynlens.continual.ContinualMetrics`, with a ``task_start`` event).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ..continual import ContinualMetrics
from .validate import ConfigurationError


class TaskBoundaries:
    """Which task is being trained, over a sequence of fits (see the module docstring).

    Args:
        task_ids: the tasks of ``eval_sets``, in their order.
    """

    def __init__(self, task_ids: Iterable[int]) -> None:
        self.task_ids = list(task_ids)
        #: A ``start_task()`` not applied yet (kept in checkpoints as ``pending_task``).
        self.pending: int | None = None
        #: The datamodule's ``current_task`` when it was last read.
        self.datamodule_task: int | None = None

    def request(self, task: Any, trained: Sequence[int]) -> None:
        """``start_task(task)``: applied when the next fit starts or at the next evaluation."""
        task = self.check_task_id(task, "start_task()")
        self.check_not_trained(task, trained)
        self.pending = task

    def check_not_trained(self, task: int, trained: Sequence[int]) -> None:
        if task in trained:
            raise ConfigurationError(
                f"task {task} was already trained (tasks so far: {list(trained)}); "
                f"each task is trained once: give a revisited task its own id and eval set."
            )

    def check_task_id(self, task: Any, source: str) -> int:
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)):
            raise ConfigurationError(f"Expected a task id (int) from {source}, got {task!r}.")
        task = int(task)
        if task not in self.task_ids:
            raise ConfigurationError(
                f"{source} names task {task}, but `eval_sets` has tasks {self.task_ids}: "
                f"add its evaluation set, e.g. ContinualEvaluation(dm.test_sets())."
            )
        return task

    def read_datamodule(self, trainer: Any) -> int | None:
        """The datamodule's ``current_task``, checked; ``None`` when it has none."""
        datamodule = getattr(trainer, "datamodule", None)
        task = getattr(datamodule, "current_task", None)
        if task is None:
            return None
        return self.check_task_id(task, "the datamodule's `current_task`")

    def next_task(self, trained: Sequence[int]) -> int:
        for task in self.task_ids:
            if task not in trained:
                return task
        raise ConfigurationError(
            f"a new fit started but every task of `eval_sets` {self.task_ids} was trained "
            f"already. Add the new task's evaluation set, call `start_task(task)`, or give the "
            f"datamodule a `current_task` attribute."
        )

    def at_fit_start(
        self, trainer: Any, metrics: ContinualMetrics, *, restored: bool
    ) -> Iterator[int]:
        """The task a fit starts, if any (``restored``: the fit resumed from a checkpoint)."""
        pending, self.pending = self.pending, None
        dm_task = self.datamodule_task = self.read_datamodule(trainer)
        if pending is not None:
            yield pending
        elif dm_task is not None:
            if dm_task != metrics.current_task:
                yield dm_task
        elif not restored or metrics.current_task is None:
            yield self.next_task(metrics.tasks)

    def during_fit(self, trainer: Any, metrics: ContinualMetrics) -> Iterator[int]:
        """The tasks started since the previous evaluation: a ``start_task()`` made during the
        fit, then a change of the datamodule's task. The caller starts each task as it is
        yielded, so the second check sees the first task started."""
        if self.pending is not None:
            task, self.pending = self.pending, None
            yield task
        # Only a *change* of the attribute starts a task, so start_task() calls made during
        # the fit are not undone by a datamodule that still names the previous task.
        dm_task = self.read_datamodule(trainer)
        if dm_task is not None and dm_task != self.datamodule_task:
            self.datamodule_task = dm_task
            if dm_task != metrics.current_task:
                yield dm_task
