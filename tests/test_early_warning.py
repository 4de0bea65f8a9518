"""The early-warning policy, without Lightning: settings per instability, forecasts of signals
whose crossing is known in closed form, the warning rule, clearing, and the events' rules."""

from __future__ import annotations

import math

import pytest

from dynlens.early_warning import (
    ATTENTION_LIMIT,
    CONSECUTIVE,
    HORIZONS,
    WINDOWS,
    WarningPolicy,
    per_instability,
)
from dynlens.forecast import steps_to_threshold


def test_each_instability_has_its_settings_by_default_and_one_number_sets_them_all():
    policy = WarningPolicy()
    assert (policy.windows, policy.horizons, policy.consecutive) == (WINDOWS, HORIZONS, CONSECUTIVE)
    assert WarningPolicy(window=8).windows == dict.fromkeys(WINDOWS, 8)
    assert WarningPolicy(horizon=300).horizons == dict.fromkeys(HORIZONS, 300)
    assert WarningPolicy(window={"divergence": 8}).windows == {**WINDOWS, "divergence": 8}
    mixed = WarningPolicy(consecutive={"attention": 5}).consecutive
    assert mixed == {"collapse": 2, "divergence": 1, "attention": 5, "spike": 1}  # the rest


@pytest.mark.parametrize(
    ("name", "given", "message"),
    [
        ("horizon", {"collapse": 0}, r"`horizon` to be an int >= 1"),
        ("horizon", 2.5, r"`horizon` to be an int >= 1 or 'auto', got 2\.5"),
        ("horizon", True, r"`horizon` to be an int"),
        ("consecutive", {"spikes": 2}, r"keys of `consecutive` among \('collapse'"),
        ("window", 3, r"`window` to be an int >= 4"),
    ],
)
def test_bad_settings_say_what_to_do(name, given, message):
    least = 4 if name == "window" else 1
    with pytest.raises(ValueError, match=message):
        per_instability(name, given, HORIZONS, least=least)
    with pytest.raises(ValueError, match=message):
        WarningPolicy(**{name: given})


@pytest.mark.parametrize("bad", ["collapse", (), ("collapse", "spikes")])
def test_the_instabilities_must_be_a_non_empty_sequence_of_known_ones(bad):
    with pytest.raises(ValueError, match="collapse"):
        WarningPolicy(bad)


def near_forecast():
    """An exact line reaching 5 at step 50, 20 steps after its last point."""
    forecast = steps_to_threshold([0, 10, 20, 30], [0.0, 1.0, 2.0, 3.0], 5.0, rising=True)
    assert forecast.surely_within(100) and forecast.expected_step == pytest.approx(50)
    return forecast


@pytest.mark.parametrize("consecutive", [1, 3])
def test_a_warning_needs_the_instability_surely_within_the_horizon_at_points_in_a_row(
    consecutive,
):
    near = near_forecast()
    policy = WarningPolicy(("collapse",), horizon=100, consecutive=consecutive)
    # in the horizon, in it, no forecast, then in it three times
    decided = [policy.decide("collapse", f) for f in (near, near, None, near, near, near)]
    if consecutive == 1:
        assert decided == [True, False, False, False, False, False]  # then active
    else:
        assert decided == [False, False, False, False, False, True]
    assert policy.in_a_row == {"collapse": 0} and policy.active == ["collapse"]


def test_an_active_warning_clears_when_the_trend_turns_away_or_goes_beyond_twice_the_horizon():
    policy = WarningPolicy(("collapse",), horizon=100, consecutive=1)
    assert policy.decide("collapse", near_forecast())
    falling = steps_to_threshold([0, 10, 20, 30], [3.0, 2.0, 1.0, 0.0], 5.0, rising=True)
    assert not policy.decide("collapse", None)  # no forecast: still active
    assert policy.active == ["collapse"]
    assert not policy.decide("collapse", falling) and policy.active == []
    assert policy.decide("collapse", near_forecast())  # a new warning once cleared
    # crosses at step 1030, 1000 steps on: its fast end is beyond 2 × 100 steps
    far = steps_to_threshold([0, 10, 20, 30], [0.0, 0.01, 0.02, 0.03], 1.03, rising=True)
    assert far.lower - far.trend.last_step > 200
    assert policy.cleared("collapse", far)
    assert not policy.decide("collapse", far) and policy.active == []


def test_a_power_law_signal_is_forecast_to_its_exact_crossing_once_the_window_is_full():
    # 2 t², the attention logit of a weight norm growing linearly: 1e4 at t = 70.71
    policy = WarningPolicy(("attention",), horizon=100, window=4, consecutive=1)
    forecasts = [policy.forecast("attention", t, 2.0 * t**2, ATTENTION_LIMIT) for t in (10, 20, 30)]
    assert forecasts == [None, None, None]  # fewer points than the window
    forecast = policy.forecast("attention", 40, 2.0 * 40**2, ATTENTION_LIMIT)
    assert forecast.expected_step == pytest.approx(math.sqrt(5000), rel=1e-9)
    assert policy.history["attention"] == [[t, 2.0 * t**2] for t in (10.0, 20.0, 30.0, 40.0)]


def test_no_forecast_past_the_end_of_a_rising_learning_rate_nor_after_the_event():
    policy = WarningPolicy(("attention",), horizon=100, window=4)
    for t in (10, 20, 30):
        policy.forecast("attention", t, 2.0 * t**2, ATTENTION_LIMIT)
    # the learning rate stops rising at step 60, before the crossing at 70.7: no forecast
    assert policy.forecast("attention", 40, 3200.0, ATTENTION_LIMIT, lambda s: 60) is None
    assert policy.forecast("attention", 50, 5000.0, ATTENTION_LIMIT, lambda s: None) is not None
    assert policy.happen("attention", 71) and not policy.happen("attention", 80)
    assert policy.happened == {"attention": 71}
    assert policy.forecast("attention", 60, 7200.0, ATTENTION_LIMIT) is None


def test_the_losses_give_the_spikes_and_the_divergence_and_its_threshold():
    policy = WarningPolicy(("divergence", "spike"))
    losses = [2.0 - 0.01 * step for step in range(100)] + [5.0] * 10 + [float("nan")]
    events = policy.scan_losses(range(len(losses)), losses)
    # above the lowest by half the ground ten steps in a row, then the NaN (the monitor records
    # the first divergence only)
    assert [e.step for e in events if e.kind == "divergence"] == [100, 110]
    spikes = [e.step for e in events if e.kind == "spike"]
    assert spikes[0] == 100 and policy.losses.spikes == len(spikes)
    assert policy.divergence_threshold == policy.losses.divergence_threshold


def test_the_events_thresholds():
    policy = WarningPolicy()
    assert policy.collapsed(0.51) and not policy.collapsed(0.5)
    assert policy.attention_blew_up(1.0001e4) and not policy.attention_blew_up(1e4)


def test_two_signals_warn_when_either_is_sure_and_clear_when_both_have():
    from dynlens.crossing import limit_crossing

    policy = WarningPolicy(("divergence",), horizon=100, consecutive=1)
    far = steps_to_threshold([0, 10, 20, 30], [0.0, 0.01, 0.02, 0.03], 1.03, rising=True)
    crossing = limit_crossing([0, 10, 20, 30], [1.0] * 4, [0.9 * 1.01**k for k in range(300)])
    assert crossing.surely_within(100) and not far.surely_within(100)
    assert policy.decide("divergence", far, crossing)  # the stability limit speaks
    assert policy.sooner("divergence", far, crossing) is crossing
    assert not policy.decide("divergence", far, crossing) and policy.active == ["divergence"]
    assert policy.cleared("divergence", far) and not policy.cleared("divergence", crossing)
    steady = limit_crossing([0, 10, 20, 30], [1.0] * 4, [0.5] * 300)  # never reaches η_c
    assert not policy.decide("divergence", far, steady) and policy.active == []


def test_auto_windows_keep_the_last_share_of_the_run_and_auto_horizons_grow_with_it():
    policy = WarningPolicy(("attention",), window="auto", horizon="auto")
    for step in range(1, 400):
        policy.forecast("attention", step, 1.0 + step, 1e4)
    steps = [s for s, _ in policy.history["attention"]]
    assert steps[-1] == 399 and steps[0] >= 199 * 0.99 and len(steps) <= 64  # thinned
    assert policy.horizon_at("attention", 10) == 5 and policy.horizon_at("attention", 1000) == 500
    assert policy.horizon_at("attention", 1) == 1  # at least MIN_HORIZON
    young = WarningPolicy(("attention",), window="auto")
    for step in range(1, 5):
        young.forecast("attention", step, float(step), 1e4)
    assert len(young.history["attention"]) == 4  # at least the minimum of points
