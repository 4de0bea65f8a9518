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

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from ..continual import ContinualMetrics, ContinualSummary
from ..events import ContinualReason
from .base import Monitor, fail_soft
from .eval_data import (
    EvalSets,
    ForwardFn,
    Metric,
    SubsetMode,
    TaskEvaluator,
    accuracies,
    accuracy_counts,
    check_eval_sets,
    default_forward,
)
from .layout import Chart
from .tasks import TaskBoundaries
from .validate import (
    ConfigurationError,
    check_choice,
    check_fraction,
    check_non_negative_int,
    check_positive_int,
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
    :func:`~dynlens.callbacks.eval_data.accuracy_counts`, is top-1 accuracy of logits ``(N, C)``
    against class indices, and checks that every label is a valid output index: a target ≥ C
    (say, digit labels 0–9 with a 2-way head) raises :class:`ConfigurationError` naming the task
    at its first evaluation.

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
            :func:`~dynlens.callbacks.eval_data.accuracy_counts` (top-1 accuracy, with the label
            check).
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
    reasons = ContinualReason

    def __init__(
        self,
        eval_sets: EvalSets,
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
        if every_n_steps is None and budget is None:
            every_n_steps = 1  # the paper's protocol: every iteration
        super().__init__(
            every_n_steps=every_n_steps, budget=budget, clock=clock, prefix=prefix, verbose=verbose
        )
        self.eval_sets = check_eval_sets(eval_sets)
        if subset_size is not None:
            check_positive_int("subset_size", subset_size)
        hint = "'random': a new subset every evaluation, as in the paper; 'fixed': one per task"
        self.subset: SubsetMode = check_choice("subset", subset, ("random", "fixed"), hint=hint)
        for arg, fn in (("metric", metric), ("forward_fn", forward_fn)):
            if fn is not None and not callable(fn):
                raise ConfigurationError(f"Expected `{arg}` to be callable, got {fn!r}.")
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = check_non_negative_int("seed", seed)
        self.gap_threshold = check_fraction(
            "gap_threshold", gap_threshold, hint="a fraction: 0.1 is ten points"
        )
        try:
            self.windows = ContinualMetrics(windows).windows
        except (TypeError, ValueError) as err:
            raise ConfigurationError(str(err)) from None
        self.subset_size = subset_size
        self.metric: Metric = metric if metric is not None else accuracy_counts
        self.check_labels = metric is None
        self.forward_fn: ForwardFn = forward_fn if forward_fn is not None else default_forward
        self.evaluate_on_train_end = evaluate_on_train_end
        self._evaluator = TaskEvaluator(
            self.eval_sets,
            batch_size=batch_size,
            subset_size=subset_size,
            subset=subset,
            seed=seed,
            metric=self.metric,
            forward_fn=self.forward_fn,
            check_labels=self.check_labels,
        )
        # which task is trained; its start_task() not applied yet is kept as "pending_task"
        self._tasks = TaskBoundaries(self.eval_sets)

        self.metrics: ContinualMetrics = self.add_state(
            "metrics",
            lambda: ContinualMetrics(self.windows),
            save=ContinualMetrics.state_dict,
            load=self._restore_metrics,
        )
        #: Optimizer steps taken under this callback, over every fit so far.
        self.total_steps: int = self.add_state("total_steps", 0, load=int)
        #: Draws the random subsets (its own stream: the global RNG is never touched).
        self.generator: torch.Generator = self.add_state(
            "generator",
            lambda: torch.Generator().manual_seed(self.seed),
            save=torch.Generator.get_state,
            load=self._restore_generator,
        )
        # total_steps at the last evaluation
        self._last_eval_steps: int | None = self.add_state("_last_eval_steps", None)
        self._gap_announced: set[int] = self.add_state("_gap_announced", set, save=sorted, load=set)
        self._recovery_announced: set[int] = self.add_state(
            "_recovery_announced", set, save=sorted, load=set
        )
        # an evaluation's sufficient statistics, summed over ranks (TaskEvaluator.measure)
        self._counts: torch.Tensor | None = self.add_state(
            "_counts", None, persistent=False, reduce="sum"
        )
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
        self._tasks.request(task, self.metrics.tasks)

    def _begin_task(self, trainer: Any, task: int, step: int) -> None:
        self._tasks.check_not_trained(task, self.metrics.tasks)
        self.metrics.start_task(task)
        self.log_event(
            trainer,
            step,
            ContinualReason.TASK_START,
            f"task {task} started; evaluating tasks {list(self.metrics.tasks)}",
        )

    # ----------------------------------------------------------------------------- hooks
    @override
    def cadence_step(self, trainer: Any) -> int:
        """This callback's own step count, ``total_steps``, cumulative over fits."""
        return self.total_steps

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_start(trainer)

    @fail_soft
    def _fit_start(self, trainer: Any) -> None:
        # After any checkpoint restore, so global_step and this callback's state are current.
        self._fit_base_total, self._seen_global_step = self.total_steps, trainer.global_step
        restored, self._restored = self._restored, False
        # The task starts with the fit's first batch, whose step is the steps taken so far.
        for task in self._tasks.at_fit_start(trainer, self.metrics, restored=restored):
            self._begin_task(trainer, task, self.total_steps)

    @override
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

    @override
    @fail_soft
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if (
            self.evaluate_on_train_end
            and self.total_steps > self._fit_base_total
            and self._last_eval_steps != self.total_steps
        ):
            self._evaluate_and_log(trainer, pl_module)
        self._summarise(trainer)
        super().on_train_end(trainer, pl_module)

    # ----------------------------------------------------------------------------- measuring
    def measure(self, trainer: Any, pl_module: Any) -> dict[int, float]:
        """Evaluate every seen task once; ``{task: accuracy}`` (identical on every rank).

        Runs on every rank: it draws the subsets, evaluates this rank's shard, sums the counts
        over ranks (one collective) and moves them to the host once. A task with no samples
        has accuracy NaN (skipped by :class:`ContinualMetrics`).
        """
        tasks = self.metrics.tasks
        self._counts = self._evaluator.measure(trainer, pl_module, tasks, self.generator)
        return accuracies(tasks, self.sync(trainer)["_counts"])

    def _subset_indices(
        self, task: int, world_size: int, rank: int, sharded: bool = False
    ) -> torch.Tensor | None:
        """This rank's sample indices of ``task`` (:meth:`TaskEvaluator.subset_indices`)."""
        return self._evaluator.subset_indices(task, self.generator, world_size, rank, sharded)

    # ----------------------------------------------------------------------------- logging
    def _evaluate_and_log(self, trainer: Any, pl_module: Any) -> None:
        step = self.total_steps - 1  # Lightning's step of the batch just trained
        for task in self._tasks.during_fit(trainer, self.metrics):
            self._begin_task(trainer, task, step)
        with self.measuring(trainer, pl_module.device):  # within the budget, if there is one
            measured = self.measure(trainer, pl_module)
        self.metrics.update(step, measured)
        self._last_eval_steps = self.total_steps
        summary = self.metrics.summary()
        scalars = self._scalars(measured, summary)
        overhead = self.overhead
        if overhead is not None:
            scalars["overhead"] = overhead
        self.log_metrics(trainer, scalars, step=step)
        self._announce(trainer, step, summary)

    def _scalars(self, accuracies: Mapping[int, float], s: ContinualSummary) -> dict[str, float]:
        scalars = {f"acc_task_{t}": a for t, a in accuracies.items() if not math.isnan(a)}
        for name in ("acc", "min_acc", "wc_acc", "lca"):
            value = s[name]
            if value is not None:
                scalars[name] = value
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
                    ContinualReason.GAP,
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
                    ContinualReason.RECOVERY,
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
            ContinualReason.SUMMARY,
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
        if self.schedule is not None:
            charts["evaluation time ÷ training time"] = self.multiline("overhead")
        return charts

    # ----------------------------------------------------------------------------- state
    # Declared in __init__; what cannot be declared: the pending task (a start_task() made
    # before this fit wins over the checkpoint's), the restore flag.
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pending_task": self._tasks.pending}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._tasks.pending is None:  # a start_task() made before this fit wins
            self._tasks.pending = state_dict.get("pending_task")
        self._restored = True

    def _restore_metrics(self, saved: Mapping[str, Any]) -> ContinualMetrics:
        try:
            self.metrics.load_state_dict(saved)
        except ValueError as err:
            raise ConfigurationError(str(err)) from None
        return self.metrics

    def _restore_generator(self, saved: Any) -> torch.Generator:
        self.generator.set_state(torch.as_tensor(saved, dtype=torch.uint8))
        return self.generator
