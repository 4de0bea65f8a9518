"""Spikes and divergence from a stream of losses, against brute force on fixed series."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from dynlens.loss_events import (
    DIVERGENCE_STEPS,
    MIN_NOISE_POINTS,
    NOISE_WINDOW,
    SPIKE_SIGMAS,
    START_STEPS,
    LossWatch,
)


def spikes_brute_force(losses: list[float]) -> list[int]:
    """The steps whose loss is above the mean of the previous (up to) 128 finite losses by more
    than 6 population standard deviations of them, once 16 are known."""
    found, seen = [], []
    for step, loss in enumerate(losses):
        window = seen[-NOISE_WINDOW:]
        if len(window) >= MIN_NOISE_POINTS:
            mean, std = statistics.fmean(window), statistics.pstdev(window)
            if loss > mean + SPIKE_SIGMAS * std:
                found.append(step)
        if math.isfinite(loss):
            seen.append(loss)
    return found


def run(losses: list[float]) -> tuple[LossWatch, list]:
    watch = LossWatch()
    return watch, [e for step, loss in enumerate(losses) for e in watch.observe(step, loss)]


def test_spikes_are_the_brute_force_rule_on_a_noisy_falling_loss():
    rng = random.Random(0)
    losses = [2.0 * math.exp(-step / 3000) + rng.gauss(0, 0.02) for step in range(600)]
    for step, size in ((40, 0.05), (200, 0.5), (201, 0.5), (450, 0.3)):  # two in a row
        losses[step] += size
    watch, events = run(losses)
    spikes = [e.step for e in events if e.kind == "spike"]
    assert spikes == spikes_brute_force(losses)
    assert 200 in spikes and 450 in spikes and watch.spikes == len(spikes)
    assert watch.spike_rate == pytest.approx(len(spikes) / 600)
    assert not [e for e in events if e.kind == "divergence"]  # each spike came back down


def test_a_run_that_trains_to_zero_loss_has_no_divergence_however_its_tiny_loss_moves():
    # from 2.3 down to about 1e-9, then a loss ten times its lowest (7e-3 against 5.6e-4 in a
    # run at 100% accuracy; 2.9e-8 against 2.3e-9 in a collapsed one): nothing given back
    losses = [2.3 * 0.9**step for step in range(200)] + [1e-8] * 30 + [2.934e-8] * 30
    watch, events = run(losses)
    assert not [e for e in events if e.kind == "divergence"]
    start = statistics.fmean(losses[:START_STEPS])  # 1.50
    assert watch.divergence_threshold == pytest.approx(watch.loss_min + 0.5 * (start - 1e-8))


def test_a_loss_that_gives_back_half_its_ground_and_stays_there_is_a_divergence_at_its_start():
    rng = random.Random(1)
    falling = [2.0 - 1.5 * step / 100 + rng.gauss(0, 0.01) for step in range(100)]  # to 0.5
    away = [1.4 + rng.gauss(0, 0.01) for _ in range(DIVERGENCE_STEPS)]
    _, events = run([*falling, *away])
    (divergence,) = [e for e in events if e.kind == "divergence"]
    start = statistics.fmean(falling[:START_STEPS])
    low = min(falling)
    assert divergence.step == 100  # the first step away, known ten steps later
    steps = [b - a for a, b in itertools.pairwise(falling)]
    mad = statistics.median(abs(d - statistics.median(steps)) for d in steps)
    noise = 1.4826 * mad / math.sqrt(2)  # about the trend: 0.01
    assert noise == pytest.approx(0.01, rel=0.3)
    assert divergence.threshold == pytest.approx(
        low + max(6 * noise, 0.5 * (start - low), 0.1 * start)
    )
    # a loss just as high that comes back before ten steps is not a divergence
    _, events = run([*falling, *away[: DIVERGENCE_STEPS - 1], 0.5, 0.5])
    assert not [e for e in events if e.kind == "divergence"]


def test_a_non_finite_loss_is_a_divergence_at_once_and_leaves_the_statistics_alone():
    watch, events = run([1.0, 0.9, float("nan"), 0.8, math.inf])
    assert [(e.step, e.kind) for e in events] == [(2, "divergence"), (4, "divergence")]
    assert watch.loss_min == 0.8 and list(watch.recent) == [1.0, 0.9, 0.8]
    assert "nan" in events[0].describe()


def test_a_loss_that_never_fell_must_rise_by_a_tenth_of_its_start_to_diverge():
    flat = [1.0] * 50  # noiseless, no ground covered: the floor decides
    watch, events = run([*flat, *[1.09] * 20])
    assert not [e for e in events if e.kind == "divergence"]
    assert watch.divergence_threshold == pytest.approx(1.1)
    _, events = run([*flat, *[1.11] * DIVERGENCE_STEPS])
    assert [e.step for e in events if e.kind == "divergence"] == [50]


def test_no_rule_before_the_noise_is_known():
    watch, events = run([1.0] * (MIN_NOISE_POINTS - 1) + [100.0])
    assert events == [] and math.isfinite(watch.divergence_threshold)
    assert math.isinf(LossWatch().divergence_threshold) and math.isinf(LossWatch().spike_threshold)
