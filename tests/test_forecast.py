"""Tests for dynlens.forecast: trends, steps to a threshold, curvature along the update."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from dynlens.forecast import (
    critical_step_size,
    decelerating,
    fit_trend,
    optimizer_update,
    steps_to_threshold,
    update_curvature,
    update_ratio,
)

# ----------------------------------------------------------------------------------- trends


def test_exact_line_has_its_slope_intercept_and_no_error():
    trend = fit_trend([10, 20, 30, 40], [5.0, 4.0, 3.0, 2.0])
    assert trend.slope == pytest.approx(-0.1) and trend.intercept == pytest.approx(6.0)
    assert trend.slope_stderr == pytest.approx(0.0, abs=1e-12)
    assert trend.last_step == 40 and trend.points == 4
    assert trend.value_at(60) == pytest.approx(0.0)


def test_noisy_line_matches_the_textbook_least_squares_by_hand():
    rng = np.random.default_rng(0)
    t = np.arange(12.0) * 5
    y = 0.3 * t + 2 + rng.normal(0, 1.5, t.size)
    trend = fit_trend(t.tolist(), y.tolist())
    n, tm, ym = len(t), sum(t) / len(t), sum(y) / len(y)
    sxx = sum((a - tm) ** 2 for a in t)
    slope = sum((a - tm) * (b - ym) for a, b in zip(t, y, strict=True)) / sxx
    intercept = ym - slope * tm
    rss = sum((b - intercept - slope * a) ** 2 for a, b in zip(t, y, strict=True))
    assert trend.slope == pytest.approx(slope, rel=1e-12)
    assert trend.intercept == pytest.approx(intercept, rel=1e-12)
    assert trend.slope_stderr == pytest.approx(math.sqrt(rss / (n - 2) / sxx), rel=1e-12)


def test_slope_standard_error_matches_the_spread_of_slopes_over_noise():
    rng = np.random.default_rng(1)
    t = np.arange(20.0)
    slopes, errors = [], []
    for _ in range(2000):
        trend = fit_trend(t.tolist(), (0.5 * t + rng.normal(0, 2.0, t.size)).tolist())
        slopes.append(trend.slope)
        errors.append(trend.slope_stderr)
    exact = 2.0 / math.sqrt(((t - t.mean()) ** 2).sum())  # σ / sqrt(Sxx)
    assert np.std(slopes) == pytest.approx(exact, rel=0.05)
    assert np.mean(errors) == pytest.approx(exact, rel=0.05)


def test_exponential_trend_fits_the_logarithms():
    t = [0, 100, 200, 300]
    trend = fit_trend(t, [3 * math.exp(0.01 * s) for s in t], kind="exponential")
    assert trend.slope == pytest.approx(0.01) and trend.intercept == pytest.approx(math.log(3))
    assert trend.value_at(500) == pytest.approx(3 * math.exp(5))


def test_power_trend_fits_both_logarithms():
    t = [10, 20, 40, 80]
    trend = fit_trend(t, [3 * s**2.5 for s in t], kind="power")
    assert trend.slope == pytest.approx(2.5) and trend.intercept == pytest.approx(math.log(3))
    assert trend.value_at(160) == pytest.approx(3 * 160**2.5)
    assert trend.last_step == 80 and trend.slope_stderr == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize(
    ("steps", "values", "kind", "match"),
    [
        ([1, 1], [1.0, 2.0], "linear", "two distinct steps"),
        ([0, 1], [1.0], "linear", "one length"),
        ([0, 1], [1.0, -1.0], "exponential", "positive"),
        ([1, 2], [1.0, -1.0], "power", "positive"),
        ([0, 1], [1.0, 2.0], "power", "positive steps"),
        ([0, 1], [1.0, math.nan], "linear", "finite"),
        ([0, 1], [1.0, 2.0], "cubic", "kind"),
    ],
)
def test_bad_points_are_refused(steps, values, kind, match):
    with pytest.raises(ValueError, match=match):
        fit_trend(steps, values, kind=kind)


# ----------------------------------------------------------------------------------- forecasts


def test_rising_line_reaches_its_threshold_where_the_line_does():
    f = steps_to_threshold([0, 10, 20, 30], [1.0, 2.0, 3.0, 4.0], 10.0)
    assert (f.expected_step, f.steps_to) == (pytest.approx(90.0), pytest.approx(60.0))
    assert f.confident and f.lower == pytest.approx(90.0) and f.upper == pytest.approx(90.0)
    assert f.within(60) and not f.within(59)


def test_falling_headroom_reaches_zero():
    # headroom to the collapse threshold falling 2 per step: 0 at step 5
    f = steps_to_threshold([0, 1, 2, 3], [10.0, 8.0, 6.0, 4.0], 0.0, rising=False)
    assert f.expected_step == pytest.approx(5.0) and f.steps_to == pytest.approx(2.0)


def test_a_fit_already_past_the_threshold_is_due_now():
    f = steps_to_threshold([0, 1, 2], [1.0, 5.0, 9.0], 4.0)
    assert f.steps_to == 0.0 and f.expected_step == 2.0 and f.within(0)


def test_a_trend_moving_away_forecasts_nothing():
    f = steps_to_threshold([0, 1, 2], [5.0, 4.0, 3.0], 10.0)
    assert f.expected_step is None and f.steps_to is None and not f.confident
    assert not f.within(1e9)


def test_two_points_give_a_crossing_but_no_confidence():
    f = steps_to_threshold([0, 10], [1.0, 2.0], 3.0)
    assert f.expected_step == pytest.approx(20.0) and not f.confident and f.upper == math.inf


def test_exponential_growth_to_ten_thousand():
    # max attention logit doubling every 100 steps from 10: 1e4 at 100 · log2(1000)
    steps = list(range(0, 401, 50))
    f = steps_to_threshold(steps, [10 * 2 ** (s / 100) for s in steps], 1e4, kind="exponential")
    assert f.expected_step == pytest.approx(100 * math.log2(1000))
    assert f.steps_to == pytest.approx(100 * math.log2(1000) - 400)


def test_power_growth_to_ten_thousand_and_its_range():
    # 0.01 · t²: 1e4 at t = 1000, from points at 100–400
    steps = [100, 200, 300, 400]
    f = steps_to_threshold(steps, [0.01 * s**2 for s in steps], 1e4, kind="power")
    assert f.expected_step == pytest.approx(1000) and f.steps_to == pytest.approx(600)
    assert f.confident and f.lower == pytest.approx(1000) and f.upper == pytest.approx(1000)
    # noise in the exponent: the range maps ln(400) + gap / (slope ± z·se) back through exp
    rng = np.random.default_rng(0)
    noisy = [0.01 * s**2 * math.exp(rng.normal(0, 0.05)) for s in steps]
    f = steps_to_threshold(steps, noisy, 1e4, kind="power", z=2.0)
    trend = f.trend
    gap = math.log(1e4) - (trend.intercept + trend.slope * math.log(400))
    spread = 2.0 * trend.slope_stderr
    assert f.lower == pytest.approx(math.exp(math.log(400) + gap / (trend.slope + spread)))
    assert f.upper == pytest.approx(math.exp(math.log(400) + gap / (trend.slope - spread)))
    assert f.lower < f.expected_step < f.upper
    # a power law does not bend in its own axes; the same points read as exponential do
    t = np.arange(100.0, 260.0, 10.0)
    assert not decelerating(t, 0.01 * t**3, kind="power")
    assert decelerating(t, 0.01 * t**3, kind="exponential")


def test_the_range_follows_the_slope_error_and_noise_lowers_confidence():
    rng = np.random.default_rng(2)
    t = np.arange(0, 50, 5.0)
    noisy = steps_to_threshold(t.tolist(), (0.1 * t + rng.normal(0, 0.3, t.size)).tolist(), 20.0)
    trend = noisy.trend
    now = trend.intercept + trend.slope * trend.last_step
    spread = 2 * trend.slope_stderr
    assert noisy.lower == pytest.approx(trend.last_step + (20 - now) / (trend.slope + spread))
    assert noisy.upper == pytest.approx(trend.last_step + (20 - now) / (trend.slope - spread))
    assert noisy.lower < noisy.expected_step < noisy.upper
    flat = steps_to_threshold(t.tolist(), (0.001 * t + rng.normal(0, 1.0, t.size)).tolist(), 20.0)
    assert not flat.confident


def test_a_bend_is_found_only_when_the_points_level_off_beyond_their_noise():
    t = np.arange(0.0, 16.0)
    rng = np.random.default_rng(0)
    assert decelerating(t, 10 * np.sqrt(t + 1))  # a saturating rise
    assert not decelerating(t, 0.5 * t)  # a line (no residual, no bend)
    assert not decelerating(t, 0.01 * t**2)  # bending up
    assert not decelerating(t, np.exp(0.2 * t), kind="exponential")  # a line in the logarithms
    # a slight bend under much larger noise is not significant; the same bend without noise is
    bend = -0.01 * (t - 8) ** 2  # the slope at the end 15% below its average
    assert not decelerating(t, t + bend + rng.normal(0, 1.0, t.size))
    assert decelerating(t, t + bend)
    with pytest.raises(ValueError, match="four distinct steps"):
        decelerating([0, 1, 2], [0.0, 1.0, 2.0])


def test_a_jump_that_levelled_off_is_found_where_the_parabola_misses_it():
    # a step at 60% of the window: a parabola through it barely bends, but the last quarter is
    # flat while the whole rises
    t = np.arange(0.0, 16.0)
    rng = np.random.default_rng(0)
    jump = np.where(t < 10, 1.0, 2.2) * (1 + rng.normal(0, 0.02, t.size))
    assert decelerating(t, jump, kind="exponential")
    assert decelerating(t, np.log(jump))
    # growth that goes on after the jump is not levelling off; nor is a noisy exponential,
    # whose last quarter's slope is uncertain
    assert not decelerating(t, jump * np.exp(0.1 * np.maximum(t - 10, 0)), kind="exponential")
    found = [
        decelerating(t, np.exp(0.1 * t + rng.normal(0, 0.1, t.size)), kind="exponential")
        for _ in range(200)
    ]
    # rarely on noise: the last quarter's slope rests on four points (two degrees of freedom, so
    # z = 2 of its standard errors is passed more often than a normal law says): 23 of 200 here
    assert sum(found) <= 30


def test_surely_within_uses_the_slow_end_of_the_range():
    rng = np.random.default_rng(2)
    t = np.arange(0, 50, 5.0)
    noisy = steps_to_threshold(t.tolist(), (0.1 * t + rng.normal(0, 0.3, t.size)).tolist(), 20.0)
    slow_end = noisy.upper - noisy.trend.last_step
    assert noisy.within(noisy.steps_to) and not noisy.surely_within(noisy.steps_to)
    assert noisy.surely_within(slow_end) and not noisy.surely_within(slow_end - 1)
    assert noisy.range_text() == f"{noisy.lower:.0f}–{noisy.upper:.0f}"
    away = steps_to_threshold([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0], 20.0)
    assert not away.surely_within(1e9) and away.range_text() == "none"


# ------------------------------------------------------------------------- update curvature


def test_line_search_finds_the_critical_step_of_a_parabola_from_either_side():
    def rise(eta):  # η² − 2η: the loss rises beyond η = 2
        return eta * eta - 2 * eta

    for start in (0.01, 1.0, 37.0):
        c = critical_step_size(rise, start, max_evals=40)
        assert c.step_size == pytest.approx(2.0, rel=1e-6) and c.sharpness == pytest.approx(1.0)
        assert c.lower <= 2.0 <= c.upper and c.evaluations <= 40


def test_ten_evaluations_bracket_the_critical_step():
    calls = []

    def rise(eta):
        calls.append(eta)
        return eta * eta - 2 * eta

    c = critical_step_size(rise, 0.1, max_evals=10)
    assert len(calls) == c.evaluations <= 10
    assert c.lower <= 2.0 < c.upper and c.upper / c.lower < 1.1


def test_no_rise_in_reach_gives_none_and_a_rise_everywhere_gives_an_upper_bound():
    assert critical_step_size(lambda eta: -eta, 1.0, max_evals=10) is None
    c = critical_step_size(lambda eta: eta, 1.0, max_evals=5)
    assert c.lower == 0.0 and c.step_size == c.upper == pytest.approx(1.0 / 16)


def quadratic(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    hessian = a @ a.T + n * torch.eye(n, dtype=torch.float64)
    theta = torch.randn(n, generator=gen, dtype=torch.float64)

    def loss_fn(params):
        w = params["w"]
        return 0.5 * w @ hessian @ w

    return hessian, theta, loss_fn


def test_update_curvature_along_the_gradient_is_its_rayleigh_quotient():
    hessian, theta, loss_fn = quadratic()
    g = hessian @ theta
    params = {"w": theta.clone()}
    c = update_curvature(loss_fn, params, {"w": g}, step_size=1e-3, max_evals=60)
    assert c.sharpness == pytest.approx(float(g @ hessian @ g / (g @ g)), rel=1e-9)
    assert torch.equal(params["w"], theta)  # not moved


def test_update_curvature_along_a_preconditioned_update():
    hessian, theta, loss_fn = quadratic(seed=1)
    g = hessian @ theta
    u = g / torch.linspace(0.5, 3.0, g.numel(), dtype=torch.float64)  # a diagonal preconditioner
    c = update_curvature(loss_fn, {"w": theta}, {"w": u}, step_size=0.01, max_evals=60)
    assert c.step_size == pytest.approx(float(2 * g @ u / (u @ hessian @ u)), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_update_ratio_of_a_step_is_its_size_over_the_critical_step(seed):
    # on a quadratic the secant through L(θ), the slope and L(θ + Δθ) is exact: the ratio equals
    # η / η_c of the line search, for a gradient step and a preconditioned one
    hessian, theta, loss_fn = quadratic(seed=seed)
    g = hessian @ theta
    for u, eta in ((g, 0.05), (g / torch.linspace(0.5, 3.0, g.numel(), dtype=torch.float64), 0.1)):
        c = update_curvature(loss_fn, {"w": theta}, {"w": u}, step_size=eta, max_evals=60)
        before, after = float(loss_fn({"w": theta})), float(loss_fn({"w": theta - eta * u}))
        ratio = update_ratio(before, after, decrease=float(eta * g @ u))
        assert ratio == pytest.approx(eta / c.step_size, rel=1e-9)
    assert math.isnan(update_ratio(1.0, 0.5, decrease=0.0))


def test_a_diverging_loss_counts_as_a_rise_and_a_non_finite_start_is_refused():
    def loss_fn(params):
        w = params["w"]
        # falls as w grows, and is NaN past w = 1 (the run diverged)
        return torch.where(w.max() > 1, torch.tensor(math.nan, dtype=w.dtype), -w.sum())

    c = update_curvature(
        loss_fn,
        {"w": torch.tensor([0.5])},
        {"w": torch.tensor([-1.0])},
        step_size=0.1,
        max_evals=30,
    )
    assert c.step_size == pytest.approx(0.5, rel=1e-6)  # NaN past w = 1
    with pytest.raises(FloatingPointError):
        update_curvature(
            loss_fn, {"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])}, step_size=0.1
        )


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.Adam, {"lr": 0.01}),
        (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    ],
)
def test_optimizer_update_is_the_next_step_and_changes_nothing(cls, kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    optimizer = cls(model.parameters(), **kwargs)
    x = torch.randn(8, 3)

    def backward():
        optimizer.zero_grad()
        model(x).square().mean().backward()

    for _ in range(3):  # some state to carry (momentum, moments)
        backward()
        optimizer.step()
    backward()
    named = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in named.items()}
    grads = {k: p.grad.clone() for k, p in named.items()}
    state = copy.deepcopy(optimizer.state_dict())
    update = optimizer_update(optimizer, named)
    for k, p in named.items():  # nothing moved
        assert torch.equal(p, before[k]) and torch.equal(p.grad, grads[k])
    after = optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for i, entries in state["state"].items():
        for name, value in entries.items():
            same = torch.equal if isinstance(value, torch.Tensor) else (lambda a, b: a == b)
            assert same(after["state"][i][name], value)
    optimizer.step()  # the real step
    for k, p in named.items():
        assert torch.allclose(update[k], p.detach() - before[k], atol=1e-7, rtol=1e-6)
