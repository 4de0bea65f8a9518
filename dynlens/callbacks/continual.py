"""ContinualEvaluation: per-iteration evaluation on every seen task, live (the stability gap).

De Lange, van de Ven & Tuytelaars, *Continual evaluation for lifelong learning: identifying the
stability gap*, ICLR 2023 (arXiv:2205.13452). Evaluating only when a task ends hides what happens
in between: as soon as training on a new task starts, accuracy on the earlier tasks collapses and
then partly recovers (the *stability gap*), so the end-of-task numbers look fine. The remedy is
*continual evaluation*: evaluate every seen task every few iterations (the paper: every
iteration, on a fresh random subset of 1,000 test samples per task) and report worst-case
metrics (min-ACC, WC-ACC, windowed forgetting) next to the usual average accuracy.

This callback only schedules, measures, syncs and logs. Every number comes from
:class:`dynlens.continual.ContinualMetrics` (one definition per quantity), which the post-hoc
report can replay from the logged per-task accuracies.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset

from ..continual import ContinualMetrics, ContinualSummary
from .base import (
    Chart,
    ConfigurationError,
    Monitor,
    check_non_negative_int,
    check_positive_int,
    fail_soft,
    own_forward,
    sharding_strategy,
)
from .schedule import BudgetSchedule, check_cadence

__all__ = ["ContinualEvaluation", "accuracy_counts"]

SubsetMode = Literal["random", "fixed"]
#: ``metric(outputs, targets) -> (correct, total)``: tensors or numbers, summed over batches.
Metric = Callable[[Any, Any], tuple[Any, Any]]
#: ``forward_fn(pl_module, batch, task) -> (outputs, targets)``.
ForwardFn = Callable[[Any, Any, int], tuple[Any, Any]]


def accuracy_counts(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Top-1 accuracy as sufficient statistics: ``(number correct, number of samples)``.

    ``outputs`` are logits (or any scores) of shape ``(N, C)``, ``targets`` class indices of
    shape ``(N,)``; correct means ``outputs.argmax(-1) == targets``. The count stays on the
    device (no host sync); the total is known on the host. This is the default ``metric`` of
    :class:`ContinualEvaluation`; a custom metric returns the same pair, e.g. top-5 accuracy::

        def top5(outputs, targets):
            hit = (outputs.topk(5, dim=-1).indices == targets[:, None]).any(-1)
            return hit.sum(), targets.numel()

    >>> accuracy_counts(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
    (tensor(2), 3)
    """
    return (outputs.argmax(dim=-1) == targets).sum(), targets.numel()


def _default_forward(pl_module: Any, batch: Any, task: int) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ConfigurationError(
            f"ContinualEvaluation calls `pl_module(batch[0])` and compares with `batch[1]`, but "
            f"the evaluation batches of task {task} are {type(batch).__name__}, not an (inputs, "
            f"targets) pair. Pass `forward_fn=lambda module, batch, task: (module(inputs), "
            f"targets)` that says how to run your model on one batch."
        )
    return pl_module(batch[0]), batch[1]


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other objects pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class _IndexSampler(Sampler[int]):
    """Yields the indices chosen for the current evaluation (set before each pass)."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _EvalSource:
    """One task's evaluation data, built once: a user loader re-sampled, or tensors on the device.

    A ``TensorDataset`` is moved to the model's device once and batched by indexing (no
    DataLoader, no collate: the fast path). Any other map-style dataset, or a ``DataLoader``, is
    served by a ``DataLoader`` that keeps the user's batching (batch size, ``collate_fn``,
    workers) and takes its indices from this source, so each evaluation can use a new subset.
    """

    def __init__(self, data: Dataset | DataLoader, batch_size: int) -> None:
        self.data = data
        self.batch_size = batch_size
        self.tensors: tuple[torch.Tensor, ...] | None = None
        self.loader: DataLoader | None = None
        self.sampler: _IndexSampler | None = None
        self.device: torch.device | None = None

    def __len__(self) -> int:
        dataset = self.data.dataset if isinstance(self.data, DataLoader) else self.data
        return len(dataset)  # type: ignore[arg-type]

    def batches(self, indices: torch.Tensor | None, device: torch.device) -> Iterator[Any]:
        """Batches of the samples at ``indices`` (``None``: all, in order), on ``device``."""
        if isinstance(self.data, TensorDataset):
            if self.tensors is None or self.device != device:
                self.tensors = tuple(t.to(device) for t in self.data.tensors)
                self.device = device
            n = len(self.tensors[0])
            if indices is None:
                for start in range(0, n, self.batch_size):
                    yield tuple(t[start : start + self.batch_size] for t in self.tensors)
                return
            if device.type == "cuda":
                # A copy from pageable memory waits for the GPU; from pinned memory it does not.
                indices = indices.pin_memory()
            indices = indices.to(device, non_blocking=True)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                yield tuple(t[chunk] for t in self.tensors)
            return
        if self.loader is None:
            self.sampler = _IndexSampler()
            self.loader = self._build_loader(self.sampler)
        assert self.sampler is not None
        self.sampler.indices = (
            list(range(len(self))) if indices is None else indices.tolist()  # CPU indices
        )
        for batch in self.loader:
            yield _to_device(batch, device)

    def _build_loader(self, sampler: _IndexSampler) -> DataLoader:
        # Each pass over a DataLoader draws its workers' base seed from the loader's generator,
        # by default the global RNG: an own generator leaves training's random streams untouched
        generator = torch.Generator().manual_seed(0)
        if not isinstance(self.data, DataLoader):
            return DataLoader(
                self.data, batch_size=self.batch_size, sampler=sampler, generator=generator
            )
        user = self.data
        return DataLoader(
            user.dataset,
            batch_size=user.batch_size or self.batch_size,
            sampler=sampler,
            collate_fn=user.collate_fn,
            num_workers=user.num_workers,
            pin_memory=user.pin_memory,
            worker_init_fn=user.worker_init_fn,
            persistent_workers=user.persistent_workers,
            multiprocessing_context=user.multiprocessing_context,
            generator=generator,
        )


class ContinualEvaluation(Monitor):
    """Evaluate every seen task during training and log the continual-evaluation metrics.

    De Lange et al. 2023 (*Continual evaluation for lifelong learning: identifying the stability
    gap*, ICLR): after every ``every_n_steps``-th optimizer step, every task trained so far
    (the current one included) is evaluated on a subset of its evaluation set, and
    :class:`dynlens.continual.ContinualMetrics` turns the accuracies into ACC, min-ACC, WC-ACC,
    windowed forgetting WF^w and plasticity WP^w, per-task gap and recovery and
    the learning-curve area. The paper's defaults: every iteration (``every_n_steps=1``, the
    default here too), a fresh random subset of 1,000 samples per task (``subset_size=1000``),
    windows 10 and 100.

    **Within a compute budget.** Evaluating every iteration is the paper's protocol, and it can
    cost more than training itself. With ``budget`` (say 0.03) the callback chooses the steps:
    it times training and each evaluation with ``clock`` and evaluates again once the training
    time can pay for the evaluations so far and the next one, so that after every evaluation but
    the first (after the first step), evaluation time is at most ``budget`` × training time, as
    long as evaluations cost about what they have cost so far — the schedule
    :class:`~dynlens.HessianMonitor` uses (:func:`~dynlens.callbacks.schedule.budget_schedule`).
    End-of-fit evaluations are made whatever the budget, and paid back by a longer gap after
    them. Rank 0 decides the steps and
    broadcasts them, so every rank evaluates at the same steps; the schedule is kept in
    checkpoints, so a resumed run continues it. The windows of WF^w, WP^w and the LCA still
    count evaluations, which are then further apart than one step.

    **Task boundaries.** Which task is being trained is decided, in this order of precedence:

    1. :meth:`start_task` — called between fits, the next fit trains that task; called during a
       fit (e.g. from your own callback), it takes effect at the next evaluation;
    2. the datamodule's ``current_task`` attribute (as :class:`dynlens.data.SplitDigits` has),
       read when a fit starts and before every evaluation: a new value starts that task;
    3. otherwise every new ``trainer.fit`` starts the next task of ``eval_sets`` (in its order),
       whether it is a new ``Trainer`` or another ``fit`` of the same one — except a fit resumed
       from a checkpoint (``ckpt_path=...``), which continues the checkpoint's task.

    The same callback object follows the whole sequence of fits: it keeps its own cumulative
    step counter (``trainer.global_step`` restarts at 0 with each new ``Trainer``), so charts
    and metrics run on one axis across tasks. Steps follow Lightning's logging convention: the
    evaluation after the optimizer step of batch ``b`` is logged at step ``b``, where your
    ``validation_step`` metrics would be. Evaluations fall after every ``every_n_steps``-th
    optimizer step (like ``val_check_interval``), so ``every_n_steps`` equal to the steps per
    task evaluates exactly at task ends; with ``evaluate_on_train_end`` the end of every fit is
    evaluated as well (each task's end-of-task accuracy, whatever the cadence).

    **How the model is evaluated.** Each evaluation puts the LightningModule in eval mode, runs
    under ``torch.inference_mode()`` (and the trainer's precision context), then restores every
    submodule's own train/eval mode. For each batch, ``forward_fn(pl_module, batch, task)``
    returns ``(outputs, targets)`` — by default ``(pl_module(batch[0]), batch[1])`` — and
    ``metric(outputs, targets)`` returns ``(correct, total)`` (tensors or numbers); a task's
    accuracy is Σ correct / Σ total over its subset (and over DDP ranks). The default metric,
    :func:`accuracy_counts`, is top-1 accuracy of logits ``(N, C)`` against class indices, and
    checks that every label is a valid output index: a target ≥ C (say, digit labels 0–9 with a
    2-way head) raises :class:`ConfigurationError` naming the task at its first evaluation.

    **Subsets.** ``subset="random"`` draws a fresh random subset of ``subset_size`` samples per
    task and evaluation (as in the paper) from the callback's own ``torch.Generator`` (seeded
    by ``seed``; the global RNG streams are never touched); ``subset="fixed"`` draws one subset
    per task once and reuses it (less noise between evaluations, fewer samples seen).
    ``subset_size=None``, or a set smaller than it, evaluates the whole set.
    A ``TensorDataset`` is moved to the model's device once and batched by indexing (fast); any
    other map-style dataset or a ``DataLoader`` (whose batch size, ``collate_fn`` and workers
    are kept; its sampler is replaced) is loaded through a ``DataLoader`` built once (on a GPU,
    give it ``pin_memory=True`` so batches reach the device without waiting).

    **Cost and correctness.** Counts stay on the device until one host transfer per evaluation
    (for all tasks together). Under DDP every rank evaluates its shard of the same subset
    (the generators stay in lockstep) and the counts are summed with
    ``trainer.strategy.reduce(..., "sum")`` on every rank at the same steps; logging happens on
    rank 0. The callback never changes parameters, gradients, buffers, modes, optimizer state
    or the global RNG: the trained weights are bit-identical with and without it.

    Logged under ``<prefix>/continual/`` at each evaluation: ``acc_task_<t>`` for every seen
    task, ``acc``, ``min_acc`` and ``wf_<w>`` (once a task has ended), ``wc_acc``, ``wp_<w>``,
    ``gap_task_<t>`` and ``recovery_task_<t>`` for every previous task, ``lca`` (once a task
    has 10 evaluations while trained), ``task`` (the task being trained) and, with a ``budget``,
    ``overhead`` (evaluation time ÷ training time so far). Text events: a task
    starts (``task_start``), a previous task falls ``gap_threshold`` below its end-of-task
    accuracy (``gap``), regains ``gap_threshold`` from its minimum (``recovery``), and a
    ``summary`` at the end of every fit.

    Args:
        eval_sets: ``{task id: Dataset or DataLoader}`` (task ids: non-negative ints), or a
            sequence of them for tasks 0, 1, …; e.g. ``SplitDigits().test_sets()``.
        every_n_steps: evaluate after every this many optimizer steps (exclusive with
            ``budget``); 1 when neither is given, every iteration as in the paper.
        budget: fraction of training time to spend evaluating, in (0, 1), instead of a fixed
            ``every_n_steps``; see above.
        subset_size: samples per task and evaluation (paper: 1000); ``None`` for all.
        subset: ``"random"`` (a new subset every evaluation) or ``"fixed"`` (one per task).
        windows: window sizes w of WF^w and WP^w, in evaluations (paper: 10 and 100).
        metric: ``metric(outputs, targets) -> (correct, total)``; default
            :func:`accuracy_counts` (top-1 accuracy, with the label check).
        forward_fn: ``forward_fn(pl_module, batch, task) -> (outputs, targets)``; default
            ``(pl_module(batch[0]), batch[1])``. Use it for dict batches or one head per task.
        batch_size: evaluation batch size for datasets given without a ``DataLoader``.
        seed: seeds the subset generator.
        gap_threshold: accuracy drop (fraction) that counts as a stability gap in the events.
        evaluate_on_train_end: also evaluate when a fit ends, unless that step was evaluated.
        clock: a ``() -> seconds`` function timing training and evaluations under a ``budget``;
            inject a fake one for deterministic tests.
        prefix: first part of the metric keys.
        verbose: print event lines to the console (rank 0).

    Example::

        dm = SplitDigits()
        evaluation = ContinualEvaluation(dm.test_sets())
        for task in range(dm.num_tasks):
            dm.current_task = task  # or evaluation.start_task(task), or nothing: one fit = one task
            Trainer(max_steps=300, callbacks=[evaluation]).fit(model, datamodule=dm)
        print(evaluation.summary()["min_acc"])
    """

    name = "continual"

    def __init__(
        self,
        eval_sets: Mapping[int, Dataset | DataLoader] | Sequence[Dataset | DataLoader],
        *,
        every_n_steps: int | None = None,
        budget: float | None = None,
        subset_size: int | None = 1000,
        subset: SubsetMode = "random",
        windows: Sequence[int] = (10, 100),
        metric: Metric | None = None,
        forward_fn: ForwardFn | None = None,
        batch_size: int = 256,
        seed: int = 0,
        gap_threshold: float = 0.1,
        evaluate_on_train_end: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        prefix: str = "dynlens",
        verbose: bool = True,
    ) -> None:
        super().__init__(prefix=prefix, verbose=verbose)
        check_cadence(every_n_steps, budget)
        if not callable(clock):
            raise ConfigurationError(f"Expected `clock` to be a callable, got {clock!r}.")
        self.eval_sets = _check_eval_sets(eval_sets)
        if subset_size is not None:
            check_positive_int("subset_size", subset_size)
        if subset not in ("random", "fixed"):
            raise ConfigurationError(
                f"Expected `subset` to be 'random' (a new subset every evaluation, as in the "
                f"paper) or 'fixed' (one subset per task), got {subset!r}."
            )
        for arg, fn in (("metric", metric), ("forward_fn", forward_fn)):
            if fn is not None and not callable(fn):
                raise ConfigurationError(f"Expected `{arg}` to be callable, got {fn!r}.")
        check_positive_int("batch_size", batch_size)
        check_non_negative_int("seed", seed)
        if (
            isinstance(gap_threshold, bool)
            or not isinstance(gap_threshold, numbers.Real)
            or not 0.0 < gap_threshold <= 1.0
        ):
            raise ConfigurationError(
                f"Expected `gap_threshold` in (0, 1] (a fraction: 0.1 is ten points), got "
                f"{gap_threshold!r}."
            )
        try:
            self.metrics = ContinualMetrics(windows)
        except (TypeError, ValueError) as err:
            raise ConfigurationError(str(err)) from None
        self.subset_size = subset_size
        self.subset: SubsetMode = subset
        self.windows = self.metrics.windows
        self.metric: Metric = metric if metric is not None else accuracy_counts
        self.check_labels = metric is None
        self.forward_fn: ForwardFn = forward_fn if forward_fn is not None else _default_forward
        self.batch_size = batch_size
        self.seed = seed
        self.gap_threshold = float(gap_threshold)
        self.evaluate_on_train_end = evaluate_on_train_end
        if every_n_steps is None and budget is None:
            every_n_steps = 1  # the paper's protocol: every iteration
        self.every_n_steps: int | None = every_n_steps  # type: ignore[assignment]
        self.budget = None if budget is None else float(budget)
        # with a budget: the evaluations' schedule, in total_steps
        self._schedule = None if self.budget is None else BudgetSchedule(self.budget, clock)

        self.generator = torch.Generator().manual_seed(seed)
        #: Optimizer steps taken under this callback, over every fit so far.
        self.total_steps = 0
        self._sources = {
            task: _EvalSource(data, batch_size) for task, data in self.eval_sets.items()
        }
        self._fixed: dict[int, torch.Tensor] = {}
        self._labels_checked: set[int] = set()
        self._pending_task: int | None = None
        self._datamodule_task: int | None = None
        self._last_eval_steps: int | None = None  # total_steps at the last evaluation
        self._gap_announced: set[int] = set()
        self._recovery_announced: set[int] = set()
        self._restored = False
        # total_steps when this fit's training began, and trainer.global_step at the last batch:
        # a batch after which global_step moved is one step, however many optimizers stepped
        # (Lightning's logging step counts the same way), and global_step restarts with every
        # new Trainer.
        self._fit_base_total = 0
        self._seen_global_step = 0

    # ----------------------------------------------------------------------------- identity
    def state_key_fields(self) -> dict[str, Any]:
        return {
            **super().state_key_fields(),
            "tasks": list(self.eval_sets),
            "every_n_steps": self.every_n_steps,
            "subset_size": self.subset_size,
            "subset": self.subset,
            "windows": list(self.windows),
            # only when set, so the key of every_n_steps runs is what it always was
            **({"budget": self.budget} if self.budget is not None else {}),
        }

    def summary(self) -> ContinualSummary:
        """The metrics over every evaluation so far (:meth:`ContinualMetrics.summary`)."""
        return self.metrics.summary()

    # ----------------------------------------------------------------------------- tasks
    def start_task(self, task: int) -> None:
        """Declare that training on ``task`` begins (highest precedence; see the class doc).

        Called between fits, the task starts when the next fit starts (after any checkpoint
        restore); called during a fit, it starts at the next evaluation, which covers it.
        """
        task = self._check_task_id(task, "start_task()")
        self._check_not_trained(task)
        self._pending_task = task

    def _check_not_trained(self, task: int) -> None:
        if task in self.metrics.tasks:
            raise ConfigurationError(
                f"task {task} was already trained (tasks so far: {list(self.metrics.tasks)}); "
                f"each task is trained once: give a revisited task its own id and eval set."
            )

    def _check_task_id(self, task: Any, source: str) -> int:
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)):
            raise ConfigurationError(f"Expected a task id (int) from {source}, got {task!r}.")
        task = int(task)
        if task not in self.eval_sets:
            raise ConfigurationError(
                f"{source} names task {task}, but `eval_sets` has tasks {list(self.eval_sets)}: "
                f"add its evaluation set, e.g. ContinualEvaluation(dm.test_sets())."
            )
        return task

    def _begin_task(self, trainer: Any, task: int, step: int) -> None:
        self._check_not_trained(task)
        self.metrics.start_task(task)
        self.log_event(
            trainer,
            step,
            "task_start",
            f"task {task} started; evaluating tasks {list(self.metrics.tasks)}",
        )

    def _datamodule_current_task(self, trainer: Any) -> int | None:
        datamodule = getattr(trainer, "datamodule", None)
        task = getattr(datamodule, "current_task", None)
        if task is None:
            return None
        return self._check_task_id(task, "the datamodule's `current_task`")

    def _next_task(self) -> int:
        for task in self.eval_sets:
            if task not in self.metrics.tasks:
                return task
        raise ConfigurationError(
            f"a new fit started but every task of `eval_sets` {list(self.eval_sets)} was trained "
            f"already. Add the new task's evaluation set, call `start_task(task)`, or give the "
            f"datamodule a `current_task` attribute."
        )

    # ----------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_start(trainer)

    @fail_soft
    def _fit_start(self, trainer: Any) -> None:
        # After any checkpoint restore, so global_step and this callback's state are current.
        self._fit_base_total, self._seen_global_step = self.total_steps, trainer.global_step
        restored, self._restored = self._restored, False
        pending, self._pending_task = self._pending_task, None
        dm_task = self._datamodule_current_task(trainer)
        self._datamodule_task = dm_task
        # The task starts with the fit's first batch, whose step is the steps taken so far.
        if pending is not None:
            self._begin_task(trainer, pending, self.total_steps)
        elif dm_task is not None:
            if dm_task != self.metrics.current_task:
                self._begin_task(trainer, dm_task, self.total_steps)
        elif not restored or self.metrics.current_task is None:
            self._begin_task(trainer, self._next_task(), self.total_steps)
        if self._schedule is not None:
            self._schedule.train_start(self.total_steps)

    def _follow_task_changes(self, trainer: Any, step: int) -> None:
        """Apply a start_task() made during the fit, or a change of the datamodule's task.

        Both were made after the previous evaluation, so the task counts as trained from the
        batch just evaluated (``step``): its evaluation already treats it as the current task.
        """
        if self._pending_task is not None:
            task, self._pending_task = self._pending_task, None
            self._begin_task(trainer, task, step)
        # Only a *change* of the attribute starts a task, so start_task() calls made during
        # the fit are not undone by a datamodule that still names the previous task.
        dm_task = self._datamodule_current_task(trainer)
        if dm_task is not None and dm_task != self._datamodule_task:
            self._datamodule_task = dm_task
            if dm_task != self.metrics.current_task:
                self._begin_task(trainer, dm_task, step)

    def is_due(self, trainer: Any) -> bool:
        """True after every ``every_n_steps``-th optimizer step, or where the ``budget``'s
        schedule says (the same steps on every rank); never in the sanity check."""
        if trainer.sanity_checking or not trainer.training:
            return False
        if self._schedule is not None:
            return self._schedule.due(trainer, self.total_steps)
        return self.total_steps > 0 and self.total_steps % self.every_n_steps == 0

    @fail_soft
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._seen_global_step:
            return  # gradient accumulation: no optimizer step on this batch
        self._seen_global_step = trainer.global_step
        self.total_steps += 1
        if self.is_due(trainer):
            self._evaluate_and_log(trainer, pl_module)

    @fail_soft
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if (
            self.evaluate_on_train_end
            and self.total_steps > self._fit_base_total
            and self._last_eval_steps != self.total_steps
        ):
            self._evaluate_and_log(trainer, pl_module)
        self._summarise(trainer)
        if self._schedule is not None:
            self._schedule.train_end(self.total_steps)

    # ----------------------------------------------------------------------------- measuring
    def _subset_indices(
        self, task: int, world_size: int, rank: int, sharded: bool = False
    ) -> torch.Tensor | None:
        """This rank's sample indices of ``task`` for one evaluation (``None``: the whole set).

        With ``sharded`` parameters (FSDP) every forward pass is a collective, so every rank must
        run as many batches: the subset is cut to a multiple of ``world_size`` (at most
        ``world_size - 1`` samples fewer) so that the ranks' strides are equally long.
        """
        n = len(self._sources[task])
        if self.subset_size is None or self.subset_size >= n:
            indices = None if world_size == 1 else torch.arange(n)
        elif self.subset == "fixed":
            if task not in self._fixed:
                # Its own seed per task: the subset does not depend on when the task appears.
                seed = int(np.random.SeedSequence([self.seed, task]).generate_state(1)[0])
                generator = torch.Generator().manual_seed(seed)
                self._fixed[task] = torch.randperm(n, generator=generator)[: self.subset_size]
            indices = self._fixed[task]
        else:
            indices = torch.randperm(n, generator=self.generator)[: self.subset_size]
        # Every rank drew the same subset (same generator state); each evaluates a stride.
        if indices is None or world_size == 1:
            return indices
        if sharded:
            indices = indices[: len(indices) - len(indices) % world_size]
        return indices[rank::world_size]

    def measure(self, trainer: Any, pl_module: Any) -> dict[int, float]:
        """Evaluate every seen task once; ``{task: accuracy}`` (identical on every rank).

        Runs on every rank: it draws the subsets, evaluates this rank's shard, sums the counts
        over ranks (one collective) and moves them to the host once. A task with no samples
        has accuracy NaN (skipped by :class:`ContinualMetrics`).
        """
        tasks = list(self.metrics.tasks)
        device = pl_module.device
        world_size, rank = int(trainer.world_size), int(trainer.global_rank)
        sharded = sharding_strategy(trainer) is not None
        # Sufficient statistics per task: correct, total, labels outside the outputs. Tensors a
        # metric returns stay on the device (with their flat position task·3 + column); numbers
        # it returns (the default metric's totals) are known on the host and stay there.
        values: list[torch.Tensor] = []
        positions: list[int] = []
        host = [0.0] * (3 * len(tasks))
        modes = [(module, module.training) for module in pl_module.modules()]
        precision = getattr(trainer, "precision_plugin", None)
        context = precision.val_step_context() if precision else contextlib.nullcontext()
        try:
            pl_module.eval()
            with torch.inference_mode(), context, own_forward():
                for i, task in enumerate(tasks):
                    indices = self._subset_indices(task, world_size, rank, sharded)
                    for column, value in self._task_values(pl_module, task, indices, device):
                        if isinstance(value, torch.Tensor):
                            values.append(value.reshape(()).to(device))
                            positions.append(3 * i + column)
                        else:
                            host[3 * i + column] += float(value)
        finally:
            for module, training in modes:
                module.training = training
        if world_size == 1:
            table = host
            if values:
                # The one host sync of this evaluation.
                for position, value in zip(positions, torch.stack(values).tolist(), strict=True):
                    table[position] += value
        else:
            # float64 keeps counts exact up to 2**53; MPS has no float64.
            dtype = torch.float32 if device.type == "mps" else torch.float64
            local = torch.tensor(host, dtype=dtype).to(device)
            if values:
                where = torch.tensor(positions, device=device)
                local = local.index_add(0, where, torch.stack(values).to(dtype))
            table = self.reduce(trainer, local, "sum").cpu().tolist()  # the one host sync
        accuracies: dict[int, float] = {}
        for i, task in enumerate(tasks):
            correct, total, bad = table[3 * i : 3 * i + 3]
            if bad:
                raise ConfigurationError(
                    f"task {task} has {int(bad)} evaluation labels outside the model's outputs "
                    f"(targets must be class indices 0..C-1 for C logits). For class-incremental "
                    f"tasks with one shared head, give the head one output per class over all "
                    f"tasks (e.g. SplitDigits(labels='global') with a 10-way head); for one head "
                    f"per task, use task-local labels and pass `forward_fn` to pick the head; or "
                    f"pass your own `metric`."
                )
            accuracies[task] = correct / total if total > 0 else math.nan
        return accuracies

    def _task_values(
        self, pl_module: Any, task: int, indices: torch.Tensor | None, device: torch.device
    ) -> Iterator[tuple[int, Any]]:
        """``(column, value)`` pairs of this rank's samples of ``task``, batch by batch."""
        if indices is not None and len(indices) == 0:
            return
        # Labels are checked at a task's first evaluation, so a mismatch is found before any
        # of its numbers is trusted; later evaluations skip the extra work.
        check = self.check_labels and task not in self._labels_checked
        for batch in self._sources[task].batches(indices, device):
            outputs, targets = self.forward_fn(pl_module, batch, task)
            if check:  # first, so bad outputs fail with what to pass, not inside the metric
                yield 2, self._check_outputs(outputs, targets, task)
            result = self.metric(outputs, targets)
            if not isinstance(result, (tuple, list)) or len(result) != 2:
                raise ConfigurationError(
                    f"`metric(outputs, targets)` must return a pair (correct, total), got "
                    f"{result!r}."
                )
            yield 0, result[0]
            yield 1, result[1]
        if check:
            self._labels_checked.add(task)

    @staticmethod
    def _check_outputs(outputs: Any, targets: Any, task: int) -> torch.Tensor:
        """Count labels outside ``0..C-1`` (on the device); shape errors raise at once."""
        if (
            not isinstance(outputs, torch.Tensor)
            or not isinstance(targets, torch.Tensor)
            or outputs.ndim < 2
            or outputs.shape[:-1] != targets.shape
            or targets.is_floating_point()
        ):
            got = (
                f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
                if isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)
                else f"{type(outputs).__name__} outputs and {type(targets).__name__} targets"
            )
            raise ConfigurationError(
                f"the default metric (top-1 accuracy) needs logits (N, C) and integer class "
                f"targets (N,), but task {task} gave {got}. Return them from `forward_fn`, or pass "
                f"`metric(outputs, targets) -> (correct, total)` for other outputs."
            )
        return ((targets < 0) | (targets >= outputs.shape[-1])).sum()

    # ----------------------------------------------------------------------------- logging
    def _evaluate_and_log(self, trainer: Any, pl_module: Any) -> None:
        step = self.total_steps - 1  # Lightning's step of the batch just trained
        self._follow_task_changes(trainer, step)
        if self._schedule is None:
            accuracies = self.measure(trainer, pl_module)
        else:  # timed: the schedule keeps evaluation time within the budget
            start = self._schedule.measure_start(self.total_steps, pl_module.device)
            accuracies = self.measure(trainer, pl_module)
            self._schedule.measured(trainer, self.total_steps, start, pl_module.device)
        self.metrics.update(step, accuracies)
        self._last_eval_steps = self.total_steps
        summary = self.metrics.summary()
        scalars = self._scalars(accuracies, summary)
        overhead = self._schedule.overhead if self._schedule is not None else None
        if overhead is not None:
            scalars["overhead"] = overhead
        self.log_metrics(trainer, scalars, step=step)
        self._announce(trainer, step, summary)

    def _scalars(self, accuracies: Mapping[int, float], s: ContinualSummary) -> dict[str, float]:
        scalars = {f"acc_task_{t}": a for t, a in accuracies.items() if not math.isnan(a)}
        for name in ("acc", "min_acc", "wc_acc", "lca"):
            if s[name] is not None:
                scalars[name] = s[name]
        for kind in ("wf", "wp"):
            for w, value in s[kind].items():
                if value is not None:
                    scalars[f"{kind}_{w}"] = value
        for t, value in s["gap"].items():
            scalars[f"gap_task_{t}"] = value
        for t, value in s["recovery"].items():
            scalars[f"recovery_task_{t}"] = value
        if s["current_task"] is not None:
            scalars["task"] = s["current_task"]
        return scalars

    def _announce(self, trainer: Any, step: int, now: ContinualSummary) -> None:
        current = now["current_task"]
        for t, gap in now["gap"].items():
            low, latest = now["task_min_acc"][t], now["task_acc"][t]
            if t not in self._gap_announced and gap >= self.gap_threshold:
                self._gap_announced.add(t)
                self.log_event(
                    trainer,
                    step,
                    "gap",
                    f"stability gap on task {t} while training task {current}: accuracy fell "
                    f"{100 * gap:.1f} points below its end-of-task {100 * (low + gap):.1f}% "
                    f"(to {100 * low:.1f}%)",
                )
            recovery = now["recovery"].get(t, 0.0)
            if (
                t in self._gap_announced
                and t not in self._recovery_announced
                and recovery >= self.gap_threshold
            ):
                self._recovery_announced.add(t)
                self.log_event(
                    trainer,
                    step,
                    "recovery",
                    f"task {t} recovered {100 * recovery:.1f} points from its minimum "
                    f"{100 * low:.1f}% (now {100 * latest:.1f}%) while training task {current}",
                )

    def _summarise(self, trainer: Any) -> None:
        s = self.metrics.summary()
        if s["acc"] is None or self._last_eval_steps is None:
            return
        parts = [f"ACC {100 * s['acc']:.1f}%"]
        if s["min_acc"] is not None:
            parts.append(f"min-ACC {100 * s['min_acc']:.1f}%")
        if s["wc_acc"] is not None:
            parts.append(f"WC-ACC {100 * s['wc_acc']:.1f}%")
        gaps = [
            f"task {t} gap {100 * g:.1f}, recovery {100 * s['recovery'][t]:.1f}"
            for t, g in s["gap"].items()
        ]
        detail = f"; {', '.join(gaps)} points" if gaps else ""
        self.log_event(
            trainer,
            self._last_eval_steps - 1,
            "summary",
            f"after training task {s['current_task']}: {', '.join(parts)}{detail}",
        )

    def panel(self) -> dict[str, Chart]:
        def family(stem: str) -> str:
            # Tasks appear over time, so one anchored pattern covers every task's tag.
            return "^" + re.escape(self.key(stem)) + r"\d+$"

        windows = [f"wf_{w}" for w in self.windows] + [f"wp_{w}" for w in self.windows]
        charts = {
            "accuracy per task": ["Multiline", [family("acc_task_")]],
            "ACC, min-ACC, WC-ACC": self.multiline("acc", "min_acc", "wc_acc"),
            "windowed forgetting WF and plasticity WP": self.multiline(*windows),
            "stability gap and recovery per task": [
                "Multiline",
                [family("gap_task_"), family("recovery_task_")],
            ],
            "learning-curve area LCA": self.multiline("lca"),
            "task being trained": self.multiline("task"),
        }
        if self._schedule is not None:
            charts["evaluation time ÷ training time"] = self.multiline("overhead")
        return charts

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state = {
            **super().state_dict(),
            "metrics": self.metrics.state_dict(),
            "total_steps": self.total_steps,
            "generator": self.generator.get_state(),
            "pending_task": self._pending_task,
            "last_eval_steps": self._last_eval_steps,
            "gap_announced": sorted(self._gap_announced),
            "recovery_announced": sorted(self._recovery_announced),
        }
        if self._schedule is not None:
            self._schedule.charge(self.total_steps)  # mid-run, the training so far counts
            state["schedule"] = self._schedule.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "metrics" in state_dict:
            try:
                self.metrics.load_state_dict(state_dict["metrics"])
            except ValueError as err:
                raise ConfigurationError(str(err)) from None
        self.total_steps = int(state_dict.get("total_steps", 0))
        if "generator" in state_dict:
            self.generator.set_state(torch.as_tensor(state_dict["generator"], dtype=torch.uint8))
        if self._pending_task is None:  # a start_task() made before this fit wins
            self._pending_task = state_dict.get("pending_task")
        self._last_eval_steps = state_dict.get("last_eval_steps")
        self._gap_announced = set(state_dict.get("gap_announced", []))
        self._recovery_announced = set(state_dict.get("recovery_announced", []))
        if self._schedule is not None:
            self._schedule.load_state_dict(state_dict.get("schedule", {}))
        self._restored = True


def _check_eval_sets(
    eval_sets: Mapping[int, Dataset | DataLoader] | Sequence[Dataset | DataLoader],
) -> dict[int, Dataset | DataLoader]:
    how = (
        "pass `eval_sets={task: dataset}` with one held-out set per task, e.g. "
        "`ContinualEvaluation(SplitDigits().test_sets())`"
    )
    if isinstance(eval_sets, Mapping):
        items = list(eval_sets.items())
    elif isinstance(eval_sets, Sequence) and not isinstance(eval_sets, (str, bytes)):
        items = list(enumerate(eval_sets))
    else:
        raise ConfigurationError(f"Expected `eval_sets` to be a mapping, got {eval_sets!r}: {how}.")
    if not items:
        raise ConfigurationError(f"`eval_sets` is empty, so there is nothing to evaluate: {how}.")
    checked: dict[int, Dataset | DataLoader] = {}
    for task, data in items:
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or task < 0:
            raise ConfigurationError(
                f"Expected every task id in `eval_sets` to be a non-negative int, got {task!r}: "
                f"{how}."
            )
        dataset = data.dataset if isinstance(data, DataLoader) else data
        if not isinstance(data, (Dataset, DataLoader)):
            raise ConfigurationError(
                f"`eval_sets[{task}]` is a {type(data).__name__}; expected a torch Dataset or "
                f"DataLoader: {how}."
            )
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ConfigurationError(
                f"`eval_sets[{task}]` is an iterable-style dataset; continual evaluation draws "
                f"subsets by index, so it needs a map-style dataset (with __len__ and "
                f"__getitem__), e.g. a TensorDataset of the task's held-out samples."
            )
        if len(dataset) == 0:
            raise ConfigurationError(f"`eval_sets[{task}]` is empty: {how}.")
        checked[int(task)] = data
    return checked
