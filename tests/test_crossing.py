"""The scheduled learning rate against the fitted stability limit, on schedules whose crossing
is known in closed form."""

from __future__ import annotations

import math

import pytest

from dynlens.crossing import SUSTAINED, limit_crossing


def test_a_geometric_ramp_meets_a_steady_limit_where_the_logarithms_say():
    # η_c = 2 steady; η(s) = 0.02 · 1.005^s from the last measurement: ln(100) / ln(1.005) on
    rates = [0.02 * 1.005**k for k in range(2000)]
    crossing = limit_crossing([0, 50, 100, 150], [2.0] * 4, rates)
    steps = math.ceil(math.log(100) / math.log(1.005))  # 924
    assert crossing.expected_step == 150 + steps and crossing.steps_to == steps
    assert crossing.lower == crossing.upper == crossing.expected_step  # no spread: exact points
    assert crossing.confident and crossing.surely_within(steps) and not crossing.surely_within(900)
    assert crossing.threshold == pytest.approx(rates[steps])
    assert crossing.range_text() == f"{150 + steps}–∞"


def test_a_falling_limit_meets_a_constant_rate():
    # progressive sharpening: η_c halves every 100 steps from 1 at step 300; η = 0.25 constant:
    # η_c reaches 0.25 two halvings after step 300, at step 500
    steps = [0, 100, 200, 300]
    limits = [8.0, 4.0, 2.0, 1.0]
    crossing = limit_crossing(steps, limits, [0.25] * 1000)
    assert crossing.expected_step == 500


def test_no_crossing_within_the_schedule_read_and_too_few_points():
    assert limit_crossing([0, 10, 20], [1.0, 1.0, 1.0], [0.5] * 100).expected_step is None
    assert limit_crossing([0, 0], [1.0, 1.0], [0.5]) is None  # one distinct step
    two = limit_crossing([0, 10], [1.0, 1.0], [0.5 * 1.1**k for k in range(50)])
    assert two.expected_step == 10 + 8 and not two.confident  # 0.5 · 1.1^8 > 1, no spread known
    assert not two.surely_within(1000)


def test_noisy_limits_give_a_range_about_the_fit():
    limits = [1.0 * (1.1 if i % 2 else 0.9) for i in range(8)]
    rates = [0.1 * 1.01**k for k in range(1000)]
    crossing = limit_crossing(range(0, 80, 10), limits, rates)
    assert crossing.lower < crossing.expected_step < crossing.upper
    assert crossing.cleared(horizon=50, z=2.0)  # the fast end is beyond twice 50 steps


def test_at_a_constant_rate_only_a_limit_surely_below_it_is_a_sure_crossing():
    # the edge of stability: η_c hovers about η = 0.5 (the ratio about 1) and does not fall; the
    # fit's level now may sit below the rate, but within its standard error: no sure crossing
    limits = [0.5 * (0.97 if i % 2 else 1.01) for i in range(16)]
    crossing = limit_crossing(range(0, 160, 10), limits, [0.5] * 1000)
    assert crossing.expected_step == 150  # the fitted level is below the rate: crossed "now"
    assert crossing.lower == 150 and crossing.upper is math.inf and not crossing.confident
    assert not crossing.surely_within(1000)
    # the same noise about a limit that halves every 100 steps (to 0.177 now)
    steps = range(0, 160, 10)
    falling = [v * 2.0 ** (-s / 100) for v, s in zip(limits, steps, strict=True)]
    # to a rate that does not rise, 0.1 ahead: the edge of stability, no sure crossing
    edge = limit_crossing(steps, falling, [0.1] * 1000)
    here = edge.trend.intercept + edge.trend.slope * 150  # the fitted ln η_c now
    assert edge.expected_step == 150 + math.ceil((math.log(0.1) - here) / edge.trend.slope)
    assert 150 + 75 < edge.expected_step < 150 + 90 and not edge.confident  # 100·log2(1.77)
    # already below the rate by more than its standard error (the ratio sustained above 1): now
    past = limit_crossing(steps, falling, [0.25] * 1000)
    assert past.confident and past.upper == past.expected_step == 150
    # to a rate that rises: sure, a little after the fit says
    rising = limit_crossing(steps, falling, [0.1 * 1.001**k for k in range(1000)])
    assert rising.confident and 150 < rising.expected_step < rising.upper < 150 + 100


def test_the_range_widens_by_the_standard_error_of_the_level_now():
    # a steady limit with noise; the slow end is where the ramp passes the fit's level now
    # plus z standard errors of it (slope + z·se as well), checked against numpy's own fit
    import numpy as np

    steps = np.arange(0, 80, 10.0)
    limits = np.array([1.0 * (1.1 if i % 2 else 0.9) for i in range(8)])
    rates = [0.1 * 1.01**k for k in range(2000)]
    crossing = limit_crossing(steps, limits, rates)
    (slope, intercept), cov = np.polyfit(steps, np.log(limits), 1, cov="unscaled")
    residual = np.log(limits) - (intercept + slope * steps)
    s2 = residual @ residual / (len(steps) - 2)
    x = np.array([70.0, 1.0])  # the level now: [last step, 1] · (slope, intercept)
    level_se = math.sqrt(s2 * x @ cov @ x)
    slope_se = math.sqrt(s2 * cov[0, 0])
    here = intercept + slope * 70
    k = np.arange(2000)
    slow = np.flatnonzero(np.log(rates) >= here + 2 * level_se + (slope + 2 * slope_se) * k)[0]
    fast = np.flatnonzero(np.log(rates) >= here - 2 * level_se + (slope - 2 * slope_se) * k)[0]
    assert (crossing.lower, crossing.upper) == (70 + fast, 70 + slow)


def test_at_a_constant_rate_the_limit_must_be_measured_below_it_sustained_times_in_a_row():
    # a limit falling by half every 100 steps, well below a rate of 0.25 for its last points
    steps = list(range(0, 160, 10))
    falling = [2.0 ** (-s / 100) for s in steps]  # 0.35 now: the rate 0.5 is above it
    sure = limit_crossing(steps, falling, [0.5] * 1000)
    assert sum(v < 0.5 for v in falling) >= SUSTAINED and sure.confident
    assert sure.upper == sure.expected_step == 150
    # one of the last SUSTAINED measurements above the rate: no sure crossing yet
    bumped = [*falling[:-2], 0.55, *falling[-1:]]
    crossing = limit_crossing(steps, bumped, [0.5] * 1000)
    assert crossing.expected_step == 150 and not crossing.confident


def test_a_rate_that_stops_rising_before_the_limit_is_met_makes_no_sure_crossing():
    # a steady limit of 1; a ramp ×1.01 per step from 0.5 reaches it at step 70 ahead
    steps, limits = [0, 10, 20, 30], [1.0, 1.0, 1.0, 1.0]
    ramp = [0.5 * 1.01**k for k in range(300)]
    assert limit_crossing(steps, limits, ramp).confident
    # the same ramp held from 80 steps ahead at 1.1: it still rises where it meets the limit
    held_after = [min(r, 1.1) for r in ramp]
    assert limit_crossing(steps, limits, held_after).confident
    # held at 1.0 exactly: it meets the limit where it stops rising, the edge of stability
    held_at = [min(r, 1.0) for r in ramp]
    crossing = limit_crossing(steps, limits, held_at)
    assert crossing.expected_step is not None and not crossing.confident
