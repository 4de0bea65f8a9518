"""Tests for dynlens.collapse: Softmax Collapse thresholds, counts and headroom."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import dynlens.collapse
from dynlens.collapse import (
    CollapseIndicators,
    CollapseStats,
    collapse_indicators,
    collapse_stats,
    collapse_threshold,
    collapsed_mask,
    count_collapse,
    runner_up_gap,
    softmax_collapse_fraction,
    stablemax_collapse_fraction,
)
from dynlens.nn import stablemax_cross_entropy

# First integer gap d at which the two-class logits [d, 0] collapse (Prieto et al. 2025).
FIRST_COLLAPSING_GAP = {torch.float16: 8, torch.bfloat16: 6, torch.float32: 17, torch.float64: 37}
DTYPES = list(FIRST_COLLAPSING_GAP)


def two_class(gaps, dtype) -> torch.Tensor:
    gaps = torch.as_tensor(gaps, dtype=torch.float64)
    return torch.stack([gaps, torch.zeros_like(gaps)], dim=-1).to(dtype)


def test_docstring_examples():
    result = doctest.testmod(dynlens.collapse, extraglobs={"torch": torch})
    assert result.failed == 0
    assert result.attempted >= 10


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_class_collapse_starts_at_the_known_integer_gap(dtype):
    first = FIRST_COLLAPSING_GAP[dtype]
    assert softmax_collapse_fraction(two_class([first], dtype)) == 1.0
    assert softmax_collapse_fraction(two_class([first - 1], dtype)) == 0.0
    gaps = torch.arange(0, first + 60)
    mask = collapsed_mask(two_class(gaps, dtype))
    assert torch.equal(mask, gaps >= first)
    assert softmax_collapse_fraction(two_class(gaps, dtype)) == pytest.approx(60 / (first + 60))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_and_correct_class_gradient_exactly_zero_at_collapse(dtype):
    first = FIRST_COLLAPSING_GAP[dtype]
    target = torch.tensor([0])
    for gap, collapsed in ((first - 1, False), (first, True), (first + 5, True)):
        logits = two_class([gap], dtype).requires_grad_()
        loss = F.cross_entropy(logits, target)
        loss.backward()
        assert (loss == 0).item() is collapsed, (gap, loss)
        assert (logits.grad[0, 0] == 0).item() is collapsed, (gap, logits.grad)
        # The wrong class keeps its tiny gradient exp(-gap) until exp itself underflows: SC zeroes
        # the loss and the correct-class gradient, not every component.
        assert logits.grad[0, 1] > 0


def _fine_grid(dtype, low, high, step):
    if dtype in (torch.float16, torch.bfloat16):
        # every representable value in [low, high]: an exhaustive check
        grid = torch.arange(low, high, 1e-4, dtype=torch.float64).to(dtype).unique()
        return grid.double(), grid.double().diff().max().item()
    return torch.arange(low, high, step, dtype=torch.float64), step


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_formula_matches_brute_force(dtype):
    threshold = collapse_threshold(dtype)
    assert threshold == math.log(2 / torch.finfo(dtype).eps)
    assert math.ceil(threshold) == FIRST_COLLAPSING_GAP[dtype]
    grid, spacing = _fine_grid(dtype, threshold - 0.3, threshold + 0.3, 1e-4)
    mask = collapsed_mask(two_class(grid, dtype))
    first = grid[mask.nonzero()[0, 0]].item()
    assert mask[grid >= first].all() and not mask[grid < first].any()  # monotone
    # exp(-d) is rounded before it is compared with eps / 2, hence the small tolerance
    assert abs(first - threshold) <= spacing + 2e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_classes", [3, 10, 113])
def test_multiclass_collapse_lies_between_the_two_bounds(dtype, num_classes):
    low, high = collapse_threshold(dtype), collapse_threshold(dtype, num_classes=num_classes)
    assert high == pytest.approx(low + math.log(num_classes - 1))
    grid, spacing = _fine_grid(dtype, low - 0.5, high + 0.5, 2e-3)
    logits = torch.zeros(len(grid), num_classes, dtype=torch.float64)
    logits[:, 0] = grid  # the other C - 1 logits tie at the runner-up: the worst case
    mask = collapsed_mask(logits.to(dtype))
    first = grid[mask.nonzero()[0, 0]].item()
    assert low - spacing - 2e-3 <= first <= high + spacing + 2e-3
    if dtype in (torch.float16, torch.bfloat16):
        # reduced precision sums exactly (in float32) and rounds once: the worst case is attained
        assert abs(first - high) <= spacing + 2e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_logits_respect_the_bounds(dtype):
    gen = torch.Generator().manual_seed(0)
    num_classes = 7
    low = collapse_threshold(dtype)
    high = collapse_threshold(dtype, num_classes=num_classes)
    logits = torch.randn(4000, num_classes, generator=gen, dtype=torch.float64) * 3
    runner_up = logits[:, 1:].amax(-1)
    logits[:, 0] = runner_up + low - 2 + (high - low + 4) * torch.rand(4000, generator=gen)
    logits = logits.to(dtype)
    stats = collapse_stats(logits, activation="softmax")
    mask = collapsed_mask(logits)
    assert int(stats.num_collapsed) == int(mask.sum()) > 0
    tol = 2e-3 + 2 * torch.finfo(dtype).eps * 40
    assert (stats.gap[mask] >= low - tol).all()  # positive headroom: never collapsed
    assert (stats.headroom[mask] <= tol).all()
    assert mask[stats.gap >= high + tol].all()


def test_two_class_collapse_agrees_with_zero_loss_of_f_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        gaps = collapse_threshold(dtype) - 0.05 + 0.1 * torch.rand(5000, generator=gen)
        logits = two_class(gaps, dtype)
        stats = collapse_stats(logits, torch.zeros(5000, dtype=torch.long))
        assert 0 < int(stats.num_collapsed) < 5000
        assert int(stats.num_collapsed) == int(stats.num_zero_loss)


def test_dtype_argument_rounds_in_that_dtype():
    logits = two_class([7.9, 16.9, 36.9], torch.float32)
    assert softmax_collapse_fraction(logits) == pytest.approx(2 / 3)
    assert softmax_collapse_fraction(logits, dtype=torch.float16) == 1.0
    assert softmax_collapse_fraction(logits, dtype=torch.float64) == pytest.approx(1 / 3)
    # float16: three terms 1 + 2 * exp(-8); each alone is below eps / 2 but their sum is not, and
    # the float16 sum (accumulated exactly, rounded once, as F.cross_entropy does) is not 1.
    three = torch.tensor([[8.0, 0.0, 0.0]], dtype=torch.float16)
    assert softmax_collapse_fraction(three) == 0.0
    assert F.cross_entropy(three, torch.tensor([0])) > 0


def test_collapse_over_leading_dimensions():
    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 2] = 30.0
    logits[1, 0, 0] = 40.0
    mask = collapsed_mask(logits)
    assert mask.shape == (2, 3)
    assert mask.sum() == 2 and mask[0, 1] and mask[1, 0]
    assert softmax_collapse_fraction(logits) == pytest.approx(2 / 6)
    assert math.isnan(softmax_collapse_fraction(torch.zeros(0, 3)))


def test_non_finite_rows_never_count():
    logits = torch.tensor([[math.inf, 0.0], [math.nan, 0.0], [40.0, 0.0]])
    assert collapsed_mask(logits).tolist() == [False, False, True]


# ---------------------------------------------------------------- StableMax collapse


@pytest.mark.parametrize(
    ("dtype", "first"), [(torch.float16, 2**11 - 1), (torch.float32, 2**24 - 1)], ids=str
)
def test_stablemax_collapse_needs_a_huge_top_logit(dtype, first):
    # [d, 0]: s = (d + 1, 1); d + 2 rounds to d + 1 once the ulp of d + 1 reaches 2.
    assert stablemax_collapse_fraction(two_class([first], dtype)) == 1.0
    assert stablemax_collapse_fraction(two_class([first - 1], dtype)) == 0.0
    # where softmax collapsed long ago
    assert stablemax_collapse_fraction(two_class([40.0], dtype)) == 0.0
    assert softmax_collapse_fraction(two_class([40.0], dtype)) == 1.0


def test_stablemax_collapse_respects_the_necessary_bound():
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float16, torch.float32):
        low = collapse_threshold(dtype, "stablemax")
        # spread the top class's log s over the threshold region (log s is the log-odds scale)
        logits = torch.randn(3000, 5, generator=gen, dtype=torch.float64)
        top_log_s = logits[:, 1:].amax(-1).clamp(min=0).log1p() + low - 1 + 3 * torch.rand(3000)
        logits[:, 0] = top_log_s.exp() - 1
        logits = logits.to(dtype)
        stats = collapse_stats(logits, torch.zeros(3000, dtype=torch.long), activation="stablemax")
        mask = collapsed_mask(logits, activation="stablemax")
        assert 0 < int(mask.sum()) < 3000
        assert (stats.headroom[mask] <= 1e-2).all()
        # at least ln 2 beyond the bound, collapse is certain for the runner-up alone ... the other
        # three classes add at most ln 4 more
        assert mask[stats.gap >= low + math.log(2) + math.log(4) + 1e-2].all()
        loss = stablemax_cross_entropy(
            logits, torch.zeros(3000, dtype=torch.long), reduction="none", dtype=dtype
        )
        assert int(stats.num_zero_loss) == int((loss == 0).sum())


# ---------------------------------------------------------------- collapse_stats


def test_collapse_stats_counts_and_headroom():
    logits = torch.tensor(
        [[[20.0, 0.0, -1.0], [3.0, 0.0, 1.0]], [[0.0, 50.0, 0.0], [-2.0, -2.0, -2.0]]]
    )
    targets = torch.tensor([[0, 0], [0, 0]])  # third sample collapsed but wrong: loss is large
    stats = collapse_stats(logits, targets)
    assert isinstance(stats, CollapseStats)
    assert stats.num_samples.shape == () and stats.num_samples.dtype == torch.int64
    assert (int(stats.num_samples), int(stats.num_collapsed), int(stats.num_zero_loss)) == (4, 2, 1)
    torch.testing.assert_close(stats.gap, torch.tensor([20.0, 2.0, 50.0, 0.0]))
    assert stats.threshold == collapse_threshold(torch.float32)
    torch.testing.assert_close(stats.headroom, stats.threshold - stats.gap)
    assert (stats.headroom > 0).tolist() == [False, True, False, True]
    assert collapse_stats(logits).num_zero_loss is None


def test_collapse_stats_dtype_and_stablemax_units():
    logits = torch.tensor([[3.0, 1.0, -1.0]], dtype=torch.float32)
    stats = collapse_stats(logits, activation="stablemax", dtype=torch.float64)
    assert stats.gap.dtype == torch.float64
    assert stats.gap.item() == pytest.approx(math.log(4.0) - math.log(2.0))  # log s(3) - log s(1)
    assert stats.threshold == collapse_threshold(torch.float64, "stablemax")
    half = collapse_stats(torch.tensor([[3.3, 1.0]]), dtype=torch.float16)
    assert half.threshold == collapse_threshold(torch.float16) and half.gap.dtype == torch.float32
    # the gap of the logits as the float16 loss sees them: 3.3 rounds to 3.30078125
    assert half.gap.item() == torch.tensor(3.3).half().item() - 1 != torch.tensor(2.3).item()


@pytest.mark.parametrize("num_classes", [2, 3, 5, 8, 113])
def test_gap_is_top_minus_runner_up_by_sorting(num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    logits = torch.randint(-4, 5, (500, num_classes), generator=gen).float()  # many ties
    logits[:7] = torch.randn(7, num_classes, generator=gen) * 30
    logits[7, 0] = -math.inf  # masked classes never win
    ordered = logits.sort(dim=-1, descending=True).values
    expected = ordered[:, 0] - ordered[:, 1]
    gap = collapse_stats(logits).gap
    # read off the float32 log-probabilities, whose differences are the logits' up to a few
    # roundings at the size of the runner-up's log-probability (below gap + log C)
    bound = 4 * torch.finfo(torch.float32).eps * (expected + math.log(num_classes))
    assert ((gap == expected) | ((gap - expected).abs() <= bound)).all()  # == for inf gaps
    assert torch.equal(gap == 0, expected == 0)  # tied leaders: no margin at all, exactly
    assert (gap == 0).any()


def test_zero_loss_count_equals_f_cross_entropy_and_skips_ignored_targets():
    gen = torch.Generator().manual_seed(3)
    num_classes = 113
    logits = torch.randn(4000, num_classes, generator=gen) * 3
    logits[:, 0] += 10 + 15 * torch.rand(4000, generator=gen)  # across the float32 threshold
    targets = torch.where(torch.rand(4000, generator=gen) < 0.8, 0, 5)
    loss = F.cross_entropy(logits, targets, reduction="none")
    stats = collapse_stats(logits, targets)
    assert 0 < int(stats.num_zero_loss) == int((loss == 0).sum()) < 4000
    # correctly classified samples: zero loss exactly where the softmax collapsed
    right = targets == 0
    assert torch.equal(collapsed_mask(logits)[right], loss[right] == 0)
    # padding (ignore_index -100) has no loss to be zero
    padded = targets.masked_fill(torch.arange(4000) % 2 == 0, -100)
    kept = padded != -100
    expected = int(((loss == 0) & kept).sum())
    assert int(collapse_stats(logits, padded).num_zero_loss) == expected
    smx = collapse_stats(logits, padded, activation="stablemax")
    smx_loss = stablemax_cross_entropy(logits, targets, reduction="none", dtype=torch.float32)
    assert int(smx.num_zero_loss) == int(((smx_loss == 0) & kept).sum())


def test_collapse_stats_single_class_and_validation():
    stats = collapse_stats(torch.zeros(3, 1))
    assert int(stats.num_collapsed) == 3 and torch.isinf(stats.gap).all()
    with pytest.raises(ValueError, match="class indices"):
        collapse_stats(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="activation"):
        collapse_stats(torch.zeros(3, 2), activation="sparsemax")
    with pytest.raises(TypeError, match="floating dtype"):
        collapse_stats(torch.zeros(3, 2), dtype=torch.int32)
    with pytest.raises(ValueError, match="classes last"):
        collapsed_mask(torch.tensor(1.0))


def _planted(n=600, num_classes=7, seed=0, dtype=torch.float32):
    """Logits across the float32 collapse threshold, targets with ignored and out-of-range ones."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=gen) * 3
    logits[:, 0] += 10 + 15 * torch.rand(n, generator=gen)
    targets = torch.where(torch.rand(n, generator=gen) < 0.7, 0, 2)
    targets[::11] = -100
    targets[5::13] = num_classes
    return logits.to(dtype), targets


@pytest.mark.parametrize("activation", ["softmax", "stablemax"])
def test_indicators_counted_equal_brute_force_counts(activation):
    logits, targets = _planted()
    if activation == "stablemax":  # its top term must be ~2/eps times the rest: 1e4 to 1e10
        logits[:, 0] = 10 ** (4 + 6 * torch.rand(600, generator=torch.Generator().manual_seed(2)))
    found = collapse_indicators(logits, targets, activation=activation)
    assert isinstance(found, CollapseIndicators)
    counts = count_collapse([found])
    valid = (targets >= 0) & (targets < logits.shape[-1])
    if activation == "softmax":
        losses = F.cross_entropy(logits, targets.clamp(0, 6), reduction="none")
    else:
        losses = stablemax_cross_entropy(
            logits, targets.clamp(0, 6), reduction="none", dtype=torch.float32
        )
    collapsed = collapsed_mask(logits, activation=activation)
    expected = [600, int(collapsed.sum()), int(((losses == 0) & valid).sum())]
    assert counts.tolist() == [expected]
    assert 0 < expected[2] < expected[1] < 600  # the cases are all there
    assert torch.equal(found.top == 0, collapsed)
    no_targets = count_collapse([collapse_indicators(logits, activation=activation)])
    assert no_targets.tolist() == [[600, expected[1], 0]]


def test_indicators_from_given_log_probs_equal_computed_ones_and_leave_them_alone():
    logits, targets = _planted(seed=1)
    log_probs = F.log_softmax(logits, dim=-1)
    kept = log_probs.clone()
    given = collapse_indicators(logits, targets, log_probs=log_probs)
    fresh = collapse_indicators(logits, targets)
    for a, b in zip(given, fresh, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(runner_up_gap(logits, log_probs=log_probs), runner_up_gap(logits))
    assert torch.equal(log_probs, kept)  # read, never written
    stats = collapse_stats(logits, targets, log_probs=log_probs)
    assert [int(stats.num_collapsed), int(stats.num_zero_loss)] == count_collapse([fresh])[
        0, 1:
    ].tolist()
    wide = F.log_softmax(logits.double(), dim=-1)
    with pytest.raises(ValueError, match="log_probs"):
        collapse_indicators(logits, targets, log_probs=wide)  # not the precision measured in
    with pytest.raises(ValueError, match="log_probs"):
        collapse_indicators(logits, targets, log_probs=log_probs[:5])
    with pytest.raises(ValueError, match="softmax only"):
        collapse_indicators(logits, activation="stablemax", log_probs=log_probs)


def test_count_collapse_of_many_batches_equals_counting_each():
    batches = [_planted(n, seed=n) for n in (50, 50, 50)]
    same = [collapse_indicators(z, t) for z, t in batches]
    odd = [
        collapse_indicators(*_planted(30, seed=9)),  # another size
        collapse_indicators(batches[0][0]),  # no targets
        collapse_indicators(batches[1][0].double(), batches[1][1]),  # another precision
        collapse_indicators(batches[2][0], batches[2][1], activation="stablemax"),
    ]
    for items in (same, same + odd):
        counted = count_collapse(items)
        assert counted.dtype == torch.int64 and counted.shape == (len(items), 3)
        assert counted.tolist() == [count_collapse([item])[0].tolist() for item in items]
    assert count_collapse(odd)[1].tolist()[2] == 0
    with pytest.raises(ValueError, match="at least one"):
        count_collapse([])


def test_collapse_threshold_values_and_validation():
    assert collapse_threshold(torch.float32) == pytest.approx(24 * math.log(2))
    assert collapse_threshold(torch.float64) == pytest.approx(53 * math.log(2))
    assert collapse_threshold(torch.float16) == pytest.approx(11 * math.log(2))
    assert collapse_threshold(torch.bfloat16) == pytest.approx(8 * math.log(2))
    assert collapse_threshold(torch.float32, num_classes=113) == pytest.approx(
        24 * math.log(2) + math.log(112)
    )
    with pytest.raises(ValueError, match="num_classes"):
        collapse_threshold(torch.float32, num_classes=1)
    with pytest.raises(TypeError, match="floating"):
        collapse_threshold(torch.int64)
    with pytest.raises(ValueError, match="activation"):
        collapse_threshold(torch.float32, "exp")
