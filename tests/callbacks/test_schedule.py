"""BudgetSchedule against hand-computed schedules, with a fake clock and stub trainers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dynlens.callbacks.schedule import BudgetSchedule

CPU = torch.device("cpu")
STEP_TIME, MEASURE_TIME, BUDGET = 1.0, 4.0, 0.25


class FakeClock:
    """Seconds advance only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Rank:
    """The parts of a Trainer the schedule uses, for one rank. Rank 0 records what it
    broadcasts; another rank receives those decisions in order (``decisions``)."""

    def __init__(self, rank=0, decisions=()):
        self.is_global_zero = rank == 0
        self.sent: list = []
        self.received = list(decisions)
        self.strategy = SimpleNamespace(broadcast=self._broadcast)

    def _broadcast(self, obj, src):
        assert src == 0
        if self.is_global_zero:
            self.sent.append(obj)
            return obj
        assert obj is None  # only rank 0 decides
        return self.received.pop(0)


def train(schedule, trainer, clock, steps, *, after, measure_time=MEASURE_TIME):
    """Train ``steps`` (first, last) at 1 s a step, measuring (4 s) where the schedule says:
    after a step (as ContinualEvaluation does) or before it (as HessianMonitor does). Returns
    ``(step, measure time, training time)`` after every measurement."""
    first, last = steps
    measured = []

    def maybe_measure(step):
        if schedule.due(trainer, step):
            start = schedule.measure_start(step, CPU)
            clock.now += measure_time
            schedule.measured(trainer, step, start, CPU)
            measured.append((step, schedule.measure_time, schedule.train_time))

    for step in range(first, last):
        if not after:
            maybe_measure(step)
        clock.now += STEP_TIME
        if after:
            maybe_measure(step + 1)
    return measured


def whole_run(*, after, steps=100):
    clock = FakeClock()
    schedule, trainer = BudgetSchedule(BUDGET, clock), Rank()
    schedule.train_start(0)
    measured = train(schedule, trainer, clock, (0, steps), after=after)
    schedule.train_end(steps)
    return schedule, trainer, measured


# Measuring after a step: step 1 pays 4 s for 1 s of training; the next measurement comes once
# training pays for it and the next one at 25%: (4 + 4)/0.25 = 32 s, step 32; then every
# 4/(0.25·1) = 16 steps. Before a step: step 0 has no training to time, step 1 times one step and
# decides the same first gap, to step 32.
SCHEDULES = {True: [1, 32, 48, 64, 80, 96], False: [0, 32, 48, 64, 80, 96]}


@pytest.mark.parametrize("after", [True, False], ids=["after_step", "before_step"])
def test_the_schedule_measures_at_the_hand_computed_steps_within_budget(after):
    schedule, trainer, measured = whole_run(after=after)
    assert [step for step, _, _ in measured] == SCHEDULES[after]
    for _, measure_time, train_time in measured[1:]:
        assert measure_time <= BUDGET * train_time
    assert [(m, t) for _, m, t in measured[1:4]] == [(8.0, 32.0), (12.0, 48.0), (16.0, 64.0)]
    # each training step charged once, measurements never charged to training
    assert (schedule.train_time, schedule.train_steps) == (100.0, 100)
    assert (schedule.measure_time, schedule.measure_count) == (24.0, 6)
    assert schedule.overhead == pytest.approx(0.24)
    # one decision per measurement, and the calibration step before a step: 1 → 32
    expected = [*SCHEDULES[after][1:], 112]
    assert trainer.sent == (expected if after else [None, *expected])


def test_the_first_overhead_is_that_of_one_step_and_before_any_training_none():
    clock = FakeClock()
    schedule = BudgetSchedule(BUDGET, clock)
    schedule.train_start(0)
    assert schedule.overhead is None
    train(schedule, Rank(), clock, (0, 1), after=True)
    assert schedule.overhead == 4.0  # measurement time ÷ training time: 4 s ÷ 1 s


def test_every_rank_follows_rank_0_whatever_its_own_clock():
    _, rank0, measured0 = whole_run(after=False)
    clock = FakeClock()
    schedule, rank1 = BudgetSchedule(BUDGET, clock), Rank(1, rank0.sent)
    schedule.train_start(0)
    # ten times dearer measurements on rank 1: alone it would measure far less often
    measured1 = train(schedule, rank1, clock, (0, 100), after=False, measure_time=40.0)
    assert [s for s, _, _ in measured1] == [s for s, _, _ in measured0]
    assert rank1.received == []  # rank 1 took part in every broadcast rank 0 made


@pytest.mark.parametrize("after", [True, False], ids=["after_step", "before_step"])
@pytest.mark.parametrize("saved_at", [1, 40])
def test_state_saved_mid_run_continues_the_same_schedule(after, saved_at):
    _, _, whole = whole_run(after=after)
    clock = FakeClock()
    first = BudgetSchedule(BUDGET, clock)
    first.train_start(0)
    head = train(first, Rank(), clock, (0, saved_at), after=after)
    first.charge(saved_at)  # a checkpoint mid-run: the training so far counts
    state = first.state_dict()

    clock = FakeClock()
    clock.now = 1000.0  # a new process: another clock origin
    resumed = BudgetSchedule(BUDGET, clock)
    resumed.load_state_dict(state)
    resumed.train_start(saved_at)
    tail = train(resumed, Rank(), clock, (saved_at, 100), after=after)
    assert head + tail == whole


def test_state_dict_round_trip_and_older_checkpoints():
    schedule, _, _ = whole_run(after=True)
    other = BudgetSchedule(BUDGET)
    other.load_state_dict(schedule.state_dict())
    assert other.state_dict() == schedule.state_dict()
    assert other.state_dict()["next_step"] == 112
    other.load_state_dict({})  # a checkpoint from before a schedule was kept: a fresh one
    assert other.state_dict() == BudgetSchedule(BUDGET).state_dict()
    assert other.state_dict() == {
        "next_step": 0,
        "calibrating": False,
        "train_time": 0.0,
        "train_steps": 0,
        "measure_time": 0.0,
        "measure_count": 0,
    }


def test_reset_starts_a_fresh_schedule_at_the_given_step():
    schedule, _, _ = whole_run(after=True)
    schedule.reset(3)
    assert schedule.state_dict() == {**BudgetSchedule(BUDGET).state_dict(), "next_step": 3}
    assert schedule.overhead is None


def test_without_a_budget_it_only_times_and_never_communicates():
    clock = FakeClock()
    schedule, trainer = BudgetSchedule(None, clock), Rank()
    schedule.train_start(0)
    for step in range(0, 10, 2):  # the monitor's own cadence: every other step
        start = schedule.measure_start(step, CPU)
        clock.now += 0.5
        schedule.measured(trainer, step, start, CPU)
        clock.now += 2 * STEP_TIME
    schedule.train_end(10)
    assert trainer.sent == []
    assert (schedule.train_time, schedule.train_steps, schedule.measure_time) == (10.0, 10, 2.5)
    assert schedule.overhead == 0.25


def test_time_outside_a_fit_is_not_training():
    clock = FakeClock()
    schedule = BudgetSchedule(BUDGET, clock)
    schedule.train_start(0)
    clock.now += 3.0
    schedule.train_end(3)
    clock.now += 100.0  # between fits
    schedule.charge(3)  # nothing to charge outside a fit
    schedule.train_start(3)
    clock.now += 2.0
    schedule.train_end(5)
    assert (schedule.train_time, schedule.train_steps) == (5.0, 5)
