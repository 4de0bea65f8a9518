import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dynlens.grokking import PHASES, detect_grokking, transition_steps, weight_norm

STEPS = [0, 100, 200, 1000, 2000, 3000]


@pytest.mark.parametrize(
    ("train", "val", "expected"),
    [
        # memorised at 100, generalised at 3000: delay 2900 ≥ 1000
        ([0.1, 0.995, 1, 1, 1, 1], [0, 0.01, 0.01, 0.2, 0.6, 0.999], (100, 3000, 2900, "grokking")),
        # both at 200: no delay
        ([0.1, 0.5, 1, 1, 1, 1], [0.1, 0.5, 0.99, 1, 1, 1], (200, 200, 0, "comprehension")),
        # generalised 800 steps after memorising: under 1000
        ([0.1, 0.5, 1, 1, 1, 1], [0, 0, 0, 0.995, 1, 1], (200, 1000, 800, "comprehension")),
        (
            [0.1, 0.995, 1, 1, 1, 1],
            [0, 0.01, 0.02, 0.02, 0.03, 0.04],
            (100, None, None, "memorization"),
        ),
        (
            [0.1, 0.2, 0.3, 0.3, 0.3, 0.4],
            [0, 0.01, 0.02, 0.02, 0.03, 0.04],
            (None, None, None, "confusion"),
        ),
    ],
)
def test_four_kinds(train, val, expected):
    r = detect_grokking(STEPS, train, val)
    assert (r.memorized_step, r.generalized_step, r.delay, r.kind) == expected


def test_delay_exactly_at_the_grokking_boundary_is_grokking():
    r = detect_grokking([0, 10, 1010], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0])
    assert (r.delay, r.kind) == (1000, "grokking")
    r = detect_grokking([0, 10, 1009], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0])
    assert (r.delay, r.kind) == (999, "comprehension")


def test_grokking_delay_is_an_argument():
    r = detect_grokking([0, 10, 60], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0], grokking_delay=50)
    assert r.kind == "grokking"


def test_threshold_reached_exactly_counts_and_just_below_does_not():
    r = detect_grokking([0, 1, 2], [0.98, 0.99, 1.0], [0.0, 0.98999, 0.99])
    assert (r.memorized_step, r.generalized_step) == (1, 2)


def test_nan_points_are_ignored():
    r = detect_grokking(
        [0, 10, 20, 30], [0.1, math.nan, 1.0, 1.0], [math.nan, 0.0, math.nan, 1.0], grokking_delay=5
    )
    assert (r.memorized_step, r.generalized_step, r.delay, r.kind) == (20, 30, 10, "grokking")


def test_non_monotone_curves_use_the_first_crossing():
    # train reaches the threshold at 10, falls back, reaches it again at 30
    r = detect_grokking([0, 10, 20, 30], [0.5, 0.995, 0.7, 1.0], [0.0, 0.0, 0.0, 0.0])
    assert r.memorized_step == 10


def test_validation_before_training_gives_a_negative_delay():
    r = detect_grokking([0, 10, 20], [0.5, 0.9, 1.0], [0.5, 0.995, 1.0])
    assert (r.memorized_step, r.generalized_step, r.delay, r.kind) == (20, 10, -10, "comprehension")


def test_validation_only_is_confusion():
    r = detect_grokking([0, 10], [0.5, 0.9], [0.5, 1.0])
    assert (r.kind, r.delay) == ("confusion", None)


def test_empty_history_is_confusion():
    r = detect_grokking([], [], [])
    assert (r.memorized_step, r.generalized_step, r.kind, r.transition_steps) == (
        None,
        None,
        "confusion",
        None,
    )


@pytest.mark.parametrize(
    ("steps", "train", "val", "match"),
    [
        ([0, 1], [0.1], [0.1, 0.2], "equal length"),
        ([0, 0], [0.1, 0.2], [0.1, 0.2], "strictly increasing"),
        ([1, 0], [0.1, 0.2], [0.1, 0.2], "strictly increasing"),
        ([[0, 1]], [[0.1, 0.2]], [[0.1, 0.2]], "one-dimensional"),
    ],
)
def test_bad_input_says_what_is_wrong(steps, train, val, match):
    with pytest.raises(ValueError, match=match):
        detect_grokking(steps, train, val)


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        detect_grokking([0], [1.0], [1.0], threshold=0.0)


def test_phase_codes():
    assert detect_grokking([0], [0.1], [0.1]).phase == PHASES["learning"] == 0
    assert detect_grokking([0], [1.0], [0.1]).phase == PHASES["memorized"] == 1
    assert detect_grokking([0], [1.0], [1.0]).phase == PHASES["generalized"] == 2


def test_transition_steps_on_a_known_curve():
    # rise from 0.0 to 1.0: 10% (0.1) first reached at step 30, 90% (0.9) at step 70
    steps = np.arange(0, 110, 10)
    val = [0.0, 0.02, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 1.0, 1.0]
    assert transition_steps(steps, val) == 40
    assert detect_grokking(steps, [1.0] * 11, val).transition_steps == 40


def test_transition_steps_measured_from_the_first_value():
    # starts at 0.5: total rise 0.5, levels 0.55 (step 2) and 0.95 (step 3)
    assert transition_steps([0, 1, 2, 3], [0.5, 0.52, 0.6, 0.99]) == 1


def test_transition_steps_undefined_without_a_rise():
    assert transition_steps([0, 1, 2], [0.5, 0.4, 0.5]) is None
    assert transition_steps([0], [0.5]) is None
    # reported only once the run has generalised
    assert detect_grokking([0, 1], [1.0, 1.0], [0.0, 0.5]).transition_steps is None


@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=30),
    st.lists(st.floats(0, 1), min_size=1, max_size=30),
)
def test_detected_steps_are_first_crossings(train, val):
    n = min(len(train), len(val))
    steps = list(range(0, 7 * n, 7))
    train, val = train[:n], val[:n]
    r = detect_grokking(steps, train, val)
    for step, curve in ((r.memorized_step, train), (r.generalized_step, val)):
        if step is None:
            assert max(curve) < 0.99
        else:
            i = steps.index(step)
            assert curve[i] >= 0.99 and all(a < 0.99 for a in curve[:i])
    assert (r.delay is None) == (r.memorized_step is None or r.generalized_step is None)


def test_weight_norm_matches_the_flattened_vector():
    params = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, dtype=torch.float64)]
    flat = torch.cat([p.double().reshape(-1) for p in params])
    assert weight_norm(params).item() == pytest.approx(flat.norm().item(), rel=1e-6)
    assert weight_norm([torch.tensor([3.0, 4.0])]).item() == 5.0
    with pytest.raises(ValueError, match="at least one"):
        weight_norm([])
