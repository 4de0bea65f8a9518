"""Cadence: when a monitor measures, and the compute budget every budgeted monitor shares.

The cadence rule itself is :meth:`dynlens.callbacks.base.Monitor.is_due` (every n steps, or a
:class:`BudgetSchedule`'s decision); :class:`StepWindow` follows one optimizer step across the
micro-batches of gradient accumulation.

A monitor with a ``budget`` (DESIGN.md, the monitor contract: cadence) times the training and
its own measurements with an injectable clock, and measures again once the training time can
pay for the measurements so far and the next one. :func:`budget_schedule` is that rule, a pure
function; :class:`BudgetSchedule` holds the timing totals, decides on rank 0, broadcasts the
decision to every rank and keeps it all in the monitor's state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .validate import ConfigurationError, check_positive_int


def check_cadence(every_n_steps: object, budget: object) -> None:
    """Validate a monitor's ``every_n_steps`` and ``budget``: at most one, each well-formed."""
    if every_n_steps is not None and budget is not None:
        raise ConfigurationError(
            f"Pass either `every_n_steps` or `budget`, not both (got every_n_steps="
            f"{every_n_steps!r}, budget={budget!r}): `every_n_steps` fixes the cadence, "
            "`budget` lets the monitor choose it."
        )
    if every_n_steps is not None:
        check_positive_int("every_n_steps", every_n_steps)
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget < 1.0
    ):
        raise ConfigurationError(
            f"Expected `budget` to be a fraction of training time in (0, 1), e.g. 0.05, "
            f"got {budget!r}."
        )


def dense_cadence(step: int, every: int, points: int) -> int:
    """The cadence at ``step`` of a monitor that measures densely early on: every step, then
    every 2, 4, 8, … steps (the largest power of two up to ``step / points``), never sparser
    than every ``every`` steps. So about ``points`` measurements fall in each doubling of the
    run, and the last half of the steps so far holds about that many at any step: a trend can
    be fitted as early in a run whose event comes at step 300 as, in share of its run, in one
    whose event comes at step 30,000.

        >>> [dense_cadence(t, 10, 8) for t in (0, 15, 16, 40, 100, 200, 5000)]
        [1, 1, 2, 4, 8, 10, 10]
    """
    if step < 2 * points:
        return 1
    return min(every, 1 << ((step // points).bit_length() - 1))


def budget_schedule(
    step: int,
    *,
    train_time: float,
    train_steps: int,
    measure_time: float,
    measure_count: int,
    budget: float,
    measured: bool,
    last_measure_time: float | None = None,
) -> int | None:
    """The next step to measure at so that measuring takes at most ``budget`` × training time.

    With T = ``train_time`` / ``train_steps`` the mean time of a training step so far and
    M = ``measure_time`` / ``measure_count`` the mean time of a measurement, the next measurement
    comes once the training time has grown enough to pay for it as well:

        (measure_time + M) / budget ≤ train_time + gap · T
        next = step + max(⌈((measure_time + M) / budget − train_time) / T⌉, 1 if measured else 0)

    So, as long as measurements cost about what they have cost so far, measurement time stays
    within ``budget`` × training time after every measurement but the very first (which has no
    training to amortise it yet). Totals are cumulative: a measurement dearer than predicted is
    paid back by a longer gap. After a measurement that took ``last_measure_time`` L, the gap is
    also at least ⌈L / (budget · T)⌉, the training that pays for that measurement alone: budget
    left over while earlier measurements were dearer (the first ones carry warm-up) is spread
    out rather than spent in a burst of back-to-back measurements. ``None`` when no training step
    has been timed yet.

        >>> budget_schedule(16, train_time=16.0, train_steps=16, measure_time=4.0,
        ...                 measure_count=2, budget=0.25, measured=True)
        24
    """
    if train_steps <= 0:
        return None
    step_time = max(train_time / train_steps, 1e-12)
    expected = measure_time / max(measure_count, 1)
    owed = (measure_time + expected) / budget - train_time
    # The small slack keeps an exact multiple (8.0 step times) from rounding up through float error.
    gap = max(0, math.ceil(owed / step_time - 1e-9))
    if measured and last_measure_time is not None:
        gap = max(gap, math.ceil(last_measure_time / budget / step_time - 1e-9))
    return step + max(gap, 1 if measured else 0)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work, so the clock sees the work it is charged for."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BudgetSchedule:
    """Times training and measurements; with a ``budget``, decides the steps to measure at.

    A *step* here is the number of optimizer steps trained so far, in the monitor's own count:
    a monitor measuring before a step (at ``trainer.global_step`` s) and one measuring after it
    (once s steps are done) both pass s. The clock runs between :meth:`train_start` and
    :meth:`train_end`: the time between two clock marks is charged to training, the time
    between :meth:`measure_start` and :meth:`measured` to measuring, and ``overhead`` is the one
    over the other. With a ``budget`` the next step is :func:`budget_schedule`'s, decided after
    every measurement; after a measurement that no training was timed before (step 0 of a
    monitor measuring before the step), the schedule measures the next step's training first
    and decides then. Rank 0 decides and ``trainer.strategy.broadcast`` gives its decision to
    every rank, so the calls that decide (:meth:`due` at that calibration step, and
    :meth:`measured` with a budget) must run on every rank at the same steps; nothing else
    communicates. Without a budget the monitor keeps its own cadence and the schedule only times.

    Args:
        budget: fraction of training time to spend measuring, in (0, 1), or ``None`` (timing
            only, for ``overhead``).
        clock: a ``() -> seconds`` function; inject a fake one for deterministic tests.
    """

    def __init__(
        self, budget: float | None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.budget = budget
        self.clock = clock
        self.next_step = 0
        #: True after a measurement that no timed training preceded: the next step decides.
        self.calibrating = False
        self.train_time = 0.0
        self.train_steps = 0
        self.measure_time = 0.0
        self.measure_count = 0
        self.last_measure_time = 0.0
        # The clock reading and step up to which training has been charged; None outside a fit.
        self._mark: float | None = None
        self._mark_step = 0

    @property
    def overhead(self) -> float | None:
        """Measurement time ÷ training time so far; ``None`` before any training was timed."""
        if self.train_steps > 0 and self.train_time > 0:
            return self.measure_time / self.train_time
        return None

    # ----------------------------------------------------------------------------- a fit
    def reset(self, step: int) -> None:
        """Start a fresh schedule and budget: measure at ``step`` next, nothing timed yet."""
        self.next_step, self.calibrating = step, False
        self.train_time = self.measure_time = 0.0
        self.train_steps = self.measure_count = 0

    def train_start(self, step: int) -> None:
        """Training starts (or resumes) at ``step``: time it from now."""
        self._mark, self._mark_step = self.clock(), step

    def charge(self, step: int) -> None:
        """Charge the training up to ``step`` now; call it before saving state mid-run, or a
        resumed run would never count that training and measure too seldom."""
        if self._mark is not None:
            self._mark, self._mark_step = self._tick(step), step

    def train_end(self, step: int) -> None:
        """Training stopped at ``step``: the steps since the last measurement count too."""
        if self._mark is not None:
            self._tick(step)
            self._mark = None

    def _tick(self, step: int) -> float:
        """Clock reading now; charges the time since the last mark to training."""
        now = self.clock()
        if self._mark is not None:
            self.train_time += now - self._mark
            self.train_steps += step - self._mark_step
        return now

    # ----------------------------------------------------------------------------- cadence
    def due(self, trainer: Any, step: int) -> bool:
        """Whether to measure at ``step`` (with a budget; call it at every step that could be
        measured, on every rank)."""
        if self.calibrating and step >= self.next_step:
            # One training step has run since the first measurement: its time sets the first gap.
            self._mark, self._mark_step = self._tick(step), step
            nxt = self._proposal(trainer, step, measured=False)
            self._adopt(step, trainer.strategy.broadcast(nxt, src=0))
        return step >= self.next_step

    def measure_start(self, step: int, device: torch.device) -> float:
        """A measurement at ``step`` begins: charges training up to now; returns the start
        reading for :meth:`measured`."""
        synchronize(device)
        return self._tick(step)

    def measured(self, trainer: Any, step: int, start: float, device: torch.device) -> None:
        """The measurement begun at ``start`` ended: adds its time and, with a budget, decides
        the next step (on every rank)."""
        synchronize(device)
        end = self.clock()
        self.measure_time += end - start
        self.last_measure_time = end - start
        self.measure_count += 1
        self._mark, self._mark_step = end, step
        if self.budget is not None:
            nxt = self._proposal(trainer, step, measured=True)
            self._adopt(step, trainer.strategy.broadcast(nxt, src=0))

    def _proposal(self, trainer: Any, step: int, *, measured: bool) -> int | None:
        """Rank 0's next step (``None`` on the other ranks, and before any training was timed)."""
        if not trainer.is_global_zero:
            return None
        return budget_schedule(
            step,
            train_time=self.train_time,
            train_steps=self.train_steps,
            measure_time=self.measure_time,
            measure_count=self.measure_count,
            budget=self.budget,  # type: ignore[arg-type]
            measured=measured,
            last_measure_time=self.last_measure_time if measured else None,
        )

    def _adopt(self, step: int, nxt: int | None) -> None:
        """Follow rank 0's decision; ``None``: time the next step's training, then decide."""
        if nxt is None:
            self.next_step, self.calibrating = step + 1, True
        else:
            self.next_step, self.calibrating = int(nxt), False

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "next_step": self.next_step,
            "calibrating": self.calibrating,
            "train_time": self.train_time,
            "train_steps": self.train_steps,
            "measure_time": self.measure_time,
            "measure_count": self.measure_count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Tolerant of older or partial checkpoints: missing entries keep a fresh schedule's.
        self.next_step = int(state_dict.get("next_step", 0))
        self.calibrating = bool(state_dict.get("calibrating", False))
        self.train_time = float(state_dict.get("train_time", 0.0))
        self.train_steps = int(state_dict.get("train_steps", 0))
        self.measure_time = float(state_dict.get("measure_time", 0.0))
        self.measure_count = int(state_dict.get("measure_count", 0))


class StepWindow:
    """The optimizer step being measured: opened at a due micro-batch's start, closed at the end
    of the micro-batch after which ``trainer.global_step`` has advanced."""

    def __init__(self) -> None:
        self._start: int | None = None

    @property
    def is_open(self) -> bool:
        return self._start is not None

    def open(self, trainer: Any) -> None:
        """Call at the start of a due micro-batch (idempotent within one optimizer step)."""
        self._start = trainer.global_step

    def close_if_stepped(self, trainer: Any) -> bool:
        """True (and closed) once the optimizer stepped since :meth:`open`."""
        if self._start is not None and trainer.global_step > self._start:
            self._start = None
            return True
        return False

    def close(self) -> None:
        self._start = None
