"""Continual-evaluation metrics: ACC, min-ACC, WC-ACC, windowed forgetting and plasticity, the
stability gap, its recovery, and the learning-curve area.

De Lange, van de Ven & Tuytelaars, *Continual evaluation for lifelong learning: identifying the
stability gap*, ICLR 2023 (arXiv:2205.13452); reference code Mattdl/ContinualEvaluation. Gap and
recovery per task as reported by Łapacz et al. 2025; learning-curve area from Chaudhry et al.,
*Efficient Lifelong Learning with A-GEM*, ICLR 2019.

Evaluating only at task boundaries hides the *stability gap*: right after a new task starts, the
accuracy of earlier tasks drops sharply and then partly recovers, so the end-of-task numbers look
fine. :class:`ContinualMetrics` is fed the per-task accuracies of every evaluation (ideally every
iteration) and keeps, incrementally and in bounded memory, the worst-case metrics that expose it.

Plain Python (no Lightning, no torch): ``dynlens.ContinualEvaluation`` measures the accuracies
and calls :meth:`ContinualMetrics.update`; the report replays logged accuracies through it.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

__all__ = ["ContinualMetrics", "ContinualSummary"]

_STATE_VERSION = 1
# Slack added to the recovery tolerance so that "within 0.01" is not lost to float rounding
# (0.8 - 0.79 evaluates to 0.010000000000000009).
_ROUNDING_SLACK = 1e-12


class ContinualSummary(TypedDict):
    """What :meth:`ContinualMetrics.summary` returns (a plain ``dict`` at run time).

    Task ids are the integers passed to :meth:`ContinualMetrics.start_task`. "Previous tasks"
    are the tasks started before the current one that have at least one evaluation after their
    end; a value that has nothing to average over is ``None``.
    """

    acc: float | None
    """ACC: mean over seen tasks of their latest accuracy."""
    min_acc: float | None
    """min-ACC: mean over previous tasks of the lowest accuracy seen after the task ended."""
    wc_acc: float | None
    """WC-ACC = (1/k)·A(current) + (1 − 1/k)·min-ACC."""
    wf: dict[int, float | None]
    """Windowed forgetting WF^w per window w, averaged over previous tasks."""
    wp: dict[int, float | None]
    """Windowed plasticity WP^w per window w, averaged over all evaluated tasks."""
    gap: dict[int, float]
    """Per previous task: end-of-own-training accuracy − later minimum (stability-gap depth)."""
    recovery: dict[int, float]
    """Per previous task: latest accuracy − later minimum."""
    recovery_steps: dict[int, int | None]
    """Per previous task: steps from the minimum until back within tolerance (None: not yet)."""
    lca: float | None
    """Learning-curve area: mean accuracy over each task's first β evaluations while trained."""
    task_acc: dict[int, float]
    """Per task: latest accuracy."""
    task_min_acc: dict[int, float]
    """Per previous task: lowest accuracy after the task ended (the terms of min-ACC)."""
    current_task: int | None
    """The task being trained (the last one started)."""
    num_tasks: int
    """Number of tasks started so far (k)."""
    skipped: int
    """Number of NaN accuracies received and ignored."""


@dataclass
class _TaskState:
    """Sufficient statistics of one task; everything bounded by the largest window."""

    ended: bool = False
    num_evals: int = 0
    num_nan: int = 0
    latest: float | None = None
    # Latest accuracy while the task itself was being trained: its end-of-task accuracy.
    end_acc: float | None = None
    # Running minimum after the task ended (never reset), the step it was first reached, and the
    # first step at or after it where the accuracy was back within tolerance of end_acc.
    min_after: float | None = None
    min_step: int | None = None
    recovered_step: int | None = None
    # The last max(windows) valid accuracies, oldest first.
    recent: deque[float] = field(default_factory=deque)
    max_drop: dict[int, float] = field(default_factory=dict)
    max_rise: dict[int, float] = field(default_factory=dict)
    lca_sum: float = 0.0
    lca_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ended": self.ended,
            "num_evals": self.num_evals,
            "num_nan": self.num_nan,
            "latest": self.latest,
            "end_acc": self.end_acc,
            "min_after": self.min_after,
            "min_step": self.min_step,
            "recovered_step": self.recovered_step,
            "recent": list(self.recent),
            "max_drop": dict(self.max_drop),
            "max_rise": dict(self.max_rise),
            "lca_sum": self.lca_sum,
            "lca_count": self.lca_count,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], windows: tuple[int, ...]) -> _TaskState:
        return cls(
            ended=bool(d["ended"]),
            num_evals=int(d["num_evals"]),
            num_nan=int(d.get("num_nan", 0)),
            latest=d["latest"],
            end_acc=d["end_acc"],
            min_after=d["min_after"],
            min_step=d["min_step"],
            recovered_step=d["recovered_step"],
            recent=deque((float(a) for a in d["recent"]), maxlen=max(windows)),
            max_drop={int(w): float(v) for w, v in d["max_drop"].items()},
            max_rise={int(w): float(v) for w, v in d["max_rise"].items()},
            lca_sum=float(d["lca_sum"]),
            lca_count=int(d["lca_count"]),
        )


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class ContinualMetrics:
    r"""Incremental continual-evaluation metrics over a sequence of tasks.

    Call :meth:`start_task` when training on a task begins, :meth:`update` after every
    evaluation with the accuracies (fractions in [0, 1]) of any subset of the tasks started so
    far, and :meth:`summary` whenever the numbers are wanted. Notation: tasks t = 1..k in the
    order started, task k is the current one; a_t(1), a_t(2), ... are task t's valid evaluations
    in order; "after t ended" means after ``start_task`` of a later task.

    - **ACC** = mean over seen tasks t of a_t(latest).
    - **min-ACC** = mean over previous tasks t < k of min{a_t(i) : i after t ended}. The running
      minimum is never reset, and evaluations made while t itself was trained never count. Only
      previous tasks with at least one such evaluation are averaged; ``None`` with one task.
    - **WC-ACC** = (1/k)·a_k(latest) + (1 − 1/k)·min-ACC, the worst-case accuracy; with one task
      it is a_k(latest). (If some previous task has no post-task evaluation yet, k counts the
      current task plus the previous tasks in min-ACC, as the reference code's plain mean does.)
    - **WF^w** (windowed forgetting): per task, max(0, max{a_t(i) − a_t(j) : i < j ≤ i + w, j
      after t ended}), the largest drop between two of its evaluations at most w evaluations
      apart whose later end falls after the task ended. The earlier end may lie in the task's own
      training, so the fall from the end-of-task accuracy into the stability gap counts. Averaged
      over the previous tasks. The reference code also counts drops whose both ends lie within
      the task's own training; that differs only when accuracy falls while a task is trained.
    - **WP^w** (windowed plasticity): per task, max(0, max{a_t(j) − a_t(i) : i < j ≤ i + w}) over
      all its evaluations (learning while trained, recovery afterwards), averaged over every
      task with an evaluation. Windows count a task's evaluations, not optimizer steps: with one
      evaluation every n steps, w evaluations span w·n steps. A window w compares evaluations up
      to w apart (w + 1 consecutive values); the reference code keeps w values (up to w − 1
      apart), so its F10 is this WF^9.
    - **gap[t]** = end_acc(t) − min-after(t), where end_acc(t) is t's last evaluation while it was
      the current task (the depth of the stability gap; negative if accuracy only rose later).
    - **recovery[t]** = a_t(latest) − min-after(t) (≥ 0).
    - **recovery_steps[t]**: the first step s ≥ the step of the minimum (its first occurrence)
      with end_acc(t) − a_t(s) ≤ ``recovery_tolerance``, minus the step of the minimum; ``None``
      while not recovered, and reset when a new, lower minimum appears. 0 means the minimum itself
      was within tolerance (no gap).
    - **LCA_β** (learning-curve area; Chaudhry et al. 2019): per task the mean of its first β
      evaluations made while it was trained, averaged over the tasks that have all β. A-GEM
      averages the accuracies after b = 0..β mini-batches (β + 1 points, b = 0 being before the
      first update); evaluating each task once before its first update and passing
      ``lca_beta=β + 1`` gives exactly that. This is the reference code's definition (β = 10).

    Args:
        windows: window sizes w for WF^w and WP^w, counted in evaluations (paper: 10 and 100).
        recovery_tolerance: how close (absolute accuracy, inclusive) to the end-of-task accuracy
            counts as recovered; 0.01 is one percentage point.
        lca_beta: number of evaluations β averaged for the learning-curve area.

    Steps are integers that must not decrease from one :meth:`update` to the next; several
    updates may share a step. With one Lightning ``Trainer`` per task ``trainer.global_step``
    restarts at 0, so pass a cumulative count instead.

    NaN accuracies (for instance 0/0 from an empty evaluation set) mean "no measurement": they
    are counted in ``summary()["skipped"]`` and otherwise ignored; they do not advance the
    windows, the latest value or any minimum. Any other value outside [0, 1] raises.

    Cost: :meth:`update` is O(max(windows)) per reported task; memory is O(max(windows)) per task,
    whatever the length of training; :meth:`summary` is O(number of tasks · number of windows).

    Example (the stability gap of task 0 while task 1 is learned):

    >>> m = ContinualMetrics(windows=(10,))
    >>> m.start_task(0)
    >>> for step, a in enumerate([0.5, 0.8, 1.0]):
    ...     m.update(step, {0: a})
    >>> m.start_task(1)
    >>> for step, a0, a1 in [(3, 0.6, 0.3), (4, 0.5, 0.6), (5, 0.8, 0.8), (6, 0.95, 0.9)]:
    ...     m.update(step, {0: a0, 1: a1})
    >>> s = m.summary()
    >>> round(s["acc"], 4), s["min_acc"], round(s["wc_acc"], 4), s["wf"], s["gap"]
    (0.925, 0.5, 0.7, {10: 0.5}, {0: 0.5})
    >>> round(s["recovery"][0], 4), s["recovery_steps"]
    (0.45, {0: None})
    """

    def __init__(
        self,
        windows: Sequence[int] = (10, 100),
        *,
        recovery_tolerance: float = 0.01,
        lca_beta: int = 10,
    ) -> None:
        self.windows = _check_windows(windows)
        if isinstance(recovery_tolerance, bool) or not isinstance(recovery_tolerance, numbers.Real):
            raise TypeError(
                f"Expected `recovery_tolerance` to be a float in [0, 1], got {recovery_tolerance!r}"
            )
        if not 0.0 <= float(recovery_tolerance) <= 1.0:
            raise ValueError(
                f"Expected `recovery_tolerance` in [0, 1] (an absolute accuracy, 0.01 = one "
                f"percentage point), got {recovery_tolerance!r}"
            )
        self.recovery_tolerance: float = float(recovery_tolerance)
        if isinstance(lca_beta, bool) or not isinstance(lca_beta, int) or lca_beta < 1:
            raise ValueError(f"Expected `lca_beta` to be a positive int, got {lca_beta!r}")
        self.lca_beta: int = lca_beta
        self._order: list[int] = []
        self._tasks: dict[int, _TaskState] = {}
        self._last_step: int | None = None

    @property
    def tasks(self) -> tuple[int, ...]:
        """The tasks started so far, in order."""
        return tuple(self._order)

    @property
    def current_task(self) -> int | None:
        """The task being trained: the last one started (``None`` before any)."""
        return self._order[-1] if self._order else None

    def start_task(self, task: int) -> None:
        """Begin training on ``task``; the previous current task ends here.

        Raises:
            ValueError: if ``task`` was started before (each task is trained once).
        """
        task = _check_task(task)
        if task in self._tasks:
            raise ValueError(
                f"task {task} was already started (tasks so far: {self._order}); each task is "
                f"trained once: give a revisited task a new id"
            )
        if self._order:
            self._tasks[self._order[-1]].ended = True
        self._order.append(task)
        self._tasks[task] = _TaskState(recent=deque(maxlen=max(self.windows)))

    def update(self, step: int, accuracies: Mapping[int, float]) -> None:
        """Record one evaluation: the accuracies of any subset of the started tasks at ``step``.

        Args:
            step: integer training step of the evaluation; never smaller than the previous one.
            accuracies: ``{task: accuracy}`` with accuracies as fractions in [0, 1] (NaN is
                skipped, see the class docstring).

        Raises:
            ValueError: for a task not started yet, an accuracy outside [0, 1] or a decreasing
                step; nothing is recorded then.
        """
        if isinstance(step, bool):
            raise TypeError(f"Expected `step` to be an int, got {step!r}")
        try:
            step = operator.index(step)
        except TypeError:
            raise TypeError(f"Expected `step` to be an int, got {step!r}") from None
        if self._last_step is not None and step < self._last_step:
            raise ValueError(
                f"step {step} is smaller than the previous step {self._last_step}: steps must not "
                f"decrease. With one Trainer per task `trainer.global_step` restarts at 0; pass a "
                f"cumulative step (e.g. your own counter) instead"
            )
        if not isinstance(accuracies, Mapping):
            raise TypeError(
                f"Expected `accuracies` to be a mapping {{task: accuracy}}, got "
                f"{type(accuracies).__name__}"
            )
        # Validate everything first so that a bad entry leaves the state untouched.
        checked: list[tuple[int, float]] = []
        for task, acc in accuracies.items():
            task = _check_task(task)
            if task not in self._tasks:
                if not self._order:
                    hint = f"call start_task({task}) before reporting its accuracy"
                else:
                    hint = (
                        f"tasks started so far: {self._order}; call start_task({task}) when its "
                        f"training begins, and report only started tasks"
                    )
                raise ValueError(
                    f"accuracy reported for task {task}, which was not started: {hint}"
                )
            checked.append((task, _check_accuracy(acc, task, step)))
        self._last_step = step
        current = self.current_task
        for task, acc in checked:
            self._record(self._tasks[task], step, acc, is_current=task == current)

    def _record(self, ts: _TaskState, step: int, acc: float, *, is_current: bool) -> None:
        if math.isnan(acc):
            ts.num_nan += 1
            return
        # Running max and min of the previous evaluations, by distance d = 1, 2, ...: the
        # largest drop into `acc` within window w is max(previous w values) − acc.
        highs: list[float] = []
        lows: list[float] = []
        hi, lo = -math.inf, math.inf
        for prev in reversed(ts.recent):
            hi, lo = max(hi, prev), min(lo, prev)
            highs.append(hi)
            lows.append(lo)
        for w in self.windows:
            drop = rise = 0.0
            if highs:
                d = min(w, len(highs)) - 1
                drop, rise = highs[d] - acc, acc - lows[d]
            # Forgetting is a drop observed once the task is no longer trained.
            if ts.ended:
                ts.max_drop[w] = max(ts.max_drop.get(w, 0.0), drop)
            ts.max_rise[w] = max(ts.max_rise.get(w, 0.0), rise)
        ts.recent.append(acc)
        ts.latest = acc
        ts.num_evals += 1
        if is_current:
            ts.end_acc = acc
            if ts.lca_count < self.lca_beta:
                ts.lca_sum += acc
                ts.lca_count += 1
            return
        # Strict `<`: the minimum's step is where it was first reached.
        if ts.min_after is None or acc < ts.min_after:
            ts.min_after, ts.min_step, ts.recovered_step = acc, step, None
        if (
            ts.recovered_step is None
            and ts.end_acc is not None
            and ts.end_acc - acc <= self.recovery_tolerance + _ROUNDING_SLACK
        ):
            ts.recovered_step = step

    def summary(self) -> ContinualSummary:
        """The metrics from all evaluations so far (see the class docstring for definitions)."""
        states = [(t, self._tasks[t]) for t in self._order]
        current = self.current_task
        # (task, state, latest accuracy) of the tasks evaluated; previous tasks = ended tasks
        # with an evaluation after their end: (task, state, latest, minimum after the end)
        evaluated = [(t, ts, ts.latest) for t, ts in states if ts.latest is not None]
        previous = [
            (t, ts, ts.latest, ts.min_after)
            for t, ts in states
            if ts.ended and ts.latest is not None and ts.min_after is not None
        ]

        min_acc = _mean([low for _, _, _, low in previous])
        current_acc = self._tasks[current].latest if current is not None else None
        if current_acc is None:
            wc_acc = None
        elif min_acc is None:
            wc_acc = current_acc
        else:
            k = 1 + len(previous)
            wc_acc = current_acc / k + (1.0 - 1.0 / k) * min_acc

        gap: dict[int, float] = {}
        recovery: dict[int, float] = {}
        recovery_steps: dict[int, int | None] = {}
        for t, ts, latest, low in previous:
            recovery[t] = latest - low
            if ts.end_acc is not None:
                gap[t] = ts.end_acc - low
                recovery_steps[t] = (
                    None
                    if ts.recovered_step is None or ts.min_step is None
                    else ts.recovered_step - ts.min_step
                )

        lca = _mean(
            [ts.lca_sum / ts.lca_count for _, ts in states if ts.lca_count >= self.lca_beta]
        )
        return ContinualSummary(
            acc=_mean([latest for _, _, latest in evaluated]),
            min_acc=min_acc,
            wc_acc=wc_acc,
            wf={
                w: _mean([ts.max_drop.get(w, 0.0) for _, ts, _, _ in previous])
                for w in self.windows
            },
            wp={
                w: _mean([ts.max_rise.get(w, 0.0) for _, ts, _ in evaluated]) for w in self.windows
            },
            gap=gap,
            recovery=recovery,
            recovery_steps=recovery_steps,
            lca=lca,
            task_acc={t: latest for t, _, latest in evaluated},
            task_min_acc={t: low for t, _, _, low in previous},
            current_task=current,
            num_tasks=len(self._order),
            skipped=sum(ts.num_nan for _, ts in states),
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as plain Python containers (safe for ``torch.save``)."""
        return {
            "version": _STATE_VERSION,
            "windows": list(self.windows),
            "recovery_tolerance": self.recovery_tolerance,
            "lca_beta": self.lca_beta,
            "last_step": self._last_step,
            "order": list(self._order),
            "tasks": {t: self._tasks[t].to_dict() for t in self._order},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the configuration must match this instance's.

        Raises:
            ValueError: if the state was saved with other windows, tolerance or β (the windowed
                statistics cannot be recomputed), or by a newer dynlens.
        """
        version = int(state.get("version", 1))
        if version > _STATE_VERSION:
            raise ValueError(
                f"ContinualMetrics state has version {version}, newer than this dynlens "
                f"understands ({_STATE_VERSION}): upgrade dynlens to load it"
            )
        saved = (
            tuple(int(w) for w in state["windows"]),
            float(state["recovery_tolerance"]),
            int(state["lca_beta"]),
        )
        mine = (self.windows, self.recovery_tolerance, self.lca_beta)
        if saved != mine:
            raise ValueError(
                f"ContinualMetrics state was saved with windows={saved[0]}, "
                f"recovery_tolerance={saved[1]}, lca_beta={saved[2]} but this instance has "
                f"windows={mine[0]}, recovery_tolerance={mine[1]}, lca_beta={mine[2]}: "
                f"construct it with the saved values to resume"
            )
        order = [int(t) for t in state["order"]]
        tasks = {int(t): _TaskState.from_dict(d, self.windows) for t, d in state["tasks"].items()}
        if set(order) != set(tasks):
            raise ValueError(
                f"corrupt ContinualMetrics state: task order {order} does not match the tasks "
                f"with statistics {sorted(tasks)}"
            )
        self._order = order
        self._tasks = tasks
        last = state["last_step"]
        self._last_step = None if last is None else int(last)


def _check_windows(windows: Sequence[int]) -> tuple[int, ...]:
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence) or not windows:
        raise ValueError(f"Expected `windows` to be a non-empty sequence of ints, got {windows!r}")
    for w in windows:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(
                f"Expected every window to be a positive int (a number of evaluations), got "
                f"{w!r} in windows={windows!r}"
            )
    return tuple(sorted(set(windows)))


def _check_task(task: Any) -> int:
    if isinstance(task, bool):
        raise TypeError(f"Expected a task id to be an int, got {task!r}")
    try:
        return operator.index(task)
    except TypeError:
        raise TypeError(f"Expected a task id to be an int, got {task!r}") from None


def _check_accuracy(acc: Any, task: int, step: int) -> float:
    try:
        value = float(acc)
    except (TypeError, ValueError):
        raise TypeError(
            f"Expected the accuracy of task {task} at step {step} to be a number in [0, 1], "
            f"got {acc!r}"
        ) from None
    if not math.isnan(value) and not 0.0 <= value <= 1.0:
        hint = " (percentages? divide by 100)" if 1.0 < value <= 100.0 else ""
        raise ValueError(
            f"accuracy of task {task} at step {step} is {value}, outside [0, 1]{hint}: pass "
            f"accuracies as fractions (NaN is allowed and skipped)"
        )
    return value
