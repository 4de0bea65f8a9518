"""Tests for dynlens.nn: StableMax, its cross-entropy, the switchable CrossEntropyLoss, z-loss."""

from __future__ import annotations

import doctest
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynlens.nn
from dynlens.nn import (
    CrossEntropyLoss,
    StableMax,
    _cross_entropy_from_log_probs,
    log_stablemax,
    stablemax,
    stablemax_cross_entropy,
    z_loss,
)

ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def s_reference(x: torch.Tensor) -> torch.Tensor:
    """The paper's s(x), written out directly (forward only)."""
    return torch.where(x >= 0, x + 1, 1 / (1 - x))


def stablemax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    s = s_reference(x)
    return s / s.sum(dim=dim, keepdim=True)


def test_docstring_examples():
    result = doctest.testmod(dynlens.nn, extraglobs={"torch": torch})
    assert result.failed == 0
    assert result.attempted >= 6


def test_stablemax_closed_form_values():
    # s(1) = 2, s(0) = 1, s(-1) = 1/2, s(-3) = 1/4; sum 3.75
    x = torch.tensor([1.0, 0.0, -1.0, -3.0], dtype=torch.float64)
    expected = torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64) / 3.75
    torch.testing.assert_close(stablemax(x), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(log_stablemax(x), expected.log(), rtol=0, atol=1e-15)


def test_log_stablemax_equals_log_softmax_of_log_s():
    x = torch.randn(64, 17, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 30
    expected = F.log_softmax(torch.log(s_reference(x)), dim=-1)
    assert (log_stablemax(x) - expected).abs().max() < 1e-12
    # ... and the paper's log(s / sum s), on the same logits.
    assert (log_stablemax(x) - stablemax_reference(x).log()).abs().max() < 1e-12


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=12
    )
)
def test_stablemax_sums_to_one_and_matches_reference(values):
    x = torch.tensor(values, dtype=torch.float64)
    p = stablemax(x)
    assert abs(p.sum().item() - 1) < 1e-12
    assert (p >= 0).all()
    torch.testing.assert_close(p, stablemax_reference(x), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_stablemax_dim_and_module(dim):
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(stablemax(x, dim=dim), stablemax_reference(x, dim=dim))
    torch.testing.assert_close(StableMax(dim=dim)(x), stablemax(x, dim=dim))
    totals = stablemax(x, dim=dim).sum(dim)
    torch.testing.assert_close(totals, torch.ones_like(totals), rtol=0, atol=1e-15)
    assert f"dim={dim}" in repr(StableMax(dim=dim))


def test_stablemax_is_not_shift_invariant():
    x = torch.tensor([1.0, 0.0])
    assert not torch.allclose(stablemax(x), stablemax(x + 5))
    assert torch.allclose(torch.softmax(x, -1), torch.softmax(x + 5, -1))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_gradients_finite_at_one_and_large_magnitudes(dtype):
    big = torch.finfo(dtype).max
    x = torch.tensor(
        [[1.0, 0.0, -1.0], [1e4, -1e4, 1.0], [-1e4, 1e4, 0.0], [big, -big, 1.0], [1.0, 1.0, 1.0]],
        dtype=dtype,
        requires_grad=True,
    )
    target = torch.tensor([0, 1, 2, 0, 1])
    for fn in (
        lambda: stablemax(x).pow(2).sum(),
        lambda: log_stablemax(x).sum(),
        lambda: (log_stablemax(x) * torch.arange(3, dtype=dtype)).sum(),
        lambda: stablemax_cross_entropy(x, target, dtype=None),
        lambda: stablemax_cross_entropy(x, target),
    ):
        x.grad = None
        out = fn()
        assert torch.isfinite(out), out
        out.backward()
        assert torch.isfinite(x.grad).all(), x.grad
        assert x.grad.dtype == dtype


def test_unclamped_where_would_give_nan_at_one():
    # Documents why the branches are clamped: the naive form has a NaN gradient at x = 1.
    x = torch.tensor([1.0], requires_grad=True)
    torch.where(x >= 0, x + 1, 1 / (1 - x)).sum().backward()
    assert torch.isnan(x.grad).all()
    x.grad = None
    stablemax(torch.cat([x, torch.zeros(1)])).sum().backward()
    assert torch.isfinite(x.grad).all()


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        min_size=2,
        max_size=6,
    )
)
def test_gradients_finite_for_any_finite_float32(values):
    x = torch.tensor(values, dtype=torch.float32, requires_grad=True)
    stablemax_cross_entropy(x, torch.tensor(0), dtype=None).backward()
    assert torch.isfinite(x.grad).all()


def test_log_stablemax_gradcheck_including_zero_and_one():
    x = torch.tensor([[0.0, 1.0, -1.0, 2.5], [-0.3, 0.0, 7.0, -20.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(log_stablemax, (x.requires_grad_(),))
    assert torch.autograd.gradcheck(stablemax, (x,))


# ---------------------------------------------------------------- stablemax_cross_entropy


def brute_force_cross_entropy(
    log_probs, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    """F.cross_entropy's documented formula, one sample at a time, from log-probabilities."""
    class_dim = 0 if log_probs.dim() == 1 else 1
    lp = log_probs.unsqueeze(0) if class_dim == 0 else log_probs
    n_classes = lp.shape[1]
    lp = lp.movedim(1, -1).reshape(-1, n_classes)
    w = torch.ones(n_classes, dtype=lp.dtype) if weight is None else weight.to(lp.dtype)
    probabilities = target.shape == log_probs.shape
    if probabilities:
        tg = target.unsqueeze(0) if class_dim == 0 else target
        tg = tg.movedim(1, -1).reshape(-1, n_classes).to(lp.dtype)
    else:
        tg = target.reshape(-1)
    losses, denominators = [], []
    for i in range(lp.shape[0]):
        if probabilities:
            q = tg[i] * (1 - label_smoothing) + label_smoothing / n_classes
            losses.append(-(w * q * lp[i]).sum())
            denominators.append(torch.ones((), dtype=lp.dtype))
        elif tg[i] == ignore_index:
            losses.append(torch.zeros((), dtype=lp.dtype))
            denominators.append(torch.zeros((), dtype=lp.dtype))
        else:
            t = int(tg[i])
            nll = -w[t] * lp[i, t]
            smooth = -(w * lp[i]).sum() / n_classes
            losses.append((1 - label_smoothing) * nll + label_smoothing * smooth)
            denominators.append(w[t])
    losses_t = torch.stack(losses)
    if reduction == "sum":
        return losses_t.sum()
    if reduction == "mean":
        return losses_t.sum() / torch.stack(denominators).sum()
    out_shape = (
        target.shape
        if not probabilities
        else target.shape[:class_dim] + target.shape[class_dim + 1 :]
    )
    return losses_t.reshape(out_shape)


def _case(shape, probabilities, weighted, ignore, smoothing, reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=gen, dtype=torch.float64) * 4
    class_dim = 0 if len(shape) == 1 else 1
    n_classes = shape[class_dim]
    target_shape = shape[:class_dim] + shape[class_dim + 1 :]
    if probabilities:
        target = torch.rand(*shape, generator=gen, dtype=torch.float64)
        target = target / target.sum(class_dim, keepdim=True)
    else:
        target = torch.randint(0, n_classes, target_shape, generator=gen)
        if ignore and target.dim() > 0:
            target.view(-1)[::3] = -100
    weight = torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    kwargs = {"weight": weight, "reduction": reduction, "label_smoothing": smoothing}
    return logits, target, kwargs


CASES = [
    (shape, probabilities, weighted, ignore, smoothing, reduction)
    for shape in [(6, 4), (4,), (3, 4, 2, 3)]
    for probabilities, weighted, ignore, smoothing, reduction in itertools.product(
        [False, True], [False, True], [False, True], [0.0, 0.2], ["none", "mean", "sum"]
    )
    if not (probabilities and ignore)
]


@pytest.mark.parametrize(
    ("shape", "probabilities", "weighted", "ignore", "smoothing", "reduction"), CASES
)
def test_stablemax_cross_entropy_matches_brute_force(
    shape, probabilities, weighted, ignore, smoothing, reduction
):
    logits, target, kwargs = _case(shape, probabilities, weighted, ignore, smoothing, reduction, 3)
    class_dim = 0 if len(shape) == 1 else 1
    expected = brute_force_cross_entropy(
        stablemax_reference(logits, class_dim).log(), target, **kwargs
    )
    got = stablemax_cross_entropy(logits, target, **kwargs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "probabilities", "weighted", "ignore", "smoothing", "reduction"), CASES
)
def test_log_prob_port_reproduces_f_cross_entropy(
    shape, probabilities, weighted, ignore, smoothing, reduction
):
    # The semantics shared with F.cross_entropy: feeding log_softmax gives F.cross_entropy back.
    logits, target, kwargs = _case(shape, probabilities, weighted, ignore, smoothing, reduction, 4)
    class_dim = 0 if len(shape) == 1 else 1
    got = _cross_entropy_from_log_probs(
        F.log_softmax(logits, class_dim),
        target,
        kwargs["weight"],
        -100,
        kwargs["reduction"],
        kwargs["label_smoothing"],
    )
    torch.testing.assert_close(
        got, F.cross_entropy(logits, target, **kwargs), rtol=1e-13, atol=1e-13
    )


def test_custom_ignore_index_and_legacy_reduction_arguments():
    logits, target, _ = _case((8, 5), False, False, False, 0.0, "mean", 5)
    target[::2] = 3
    expected = brute_force_cross_entropy(
        stablemax_reference(logits, 1).log(), target, ignore_index=3
    )
    torch.testing.assert_close(stablemax_cross_entropy(logits, target, ignore_index=3), expected)
    expected_sum = brute_force_cross_entropy(
        stablemax_reference(logits, 1).log(), target, reduction="sum"
    )
    with pytest.warns(UserWarning):  # PyTorch's own deprecation warning for size_average/reduce
        got = stablemax_cross_entropy(logits, target, size_average=False)
    torch.testing.assert_close(got, expected_sum)


def test_dtype_argument_controls_compute_precision_and_output_dtype():
    logits = torch.tensor([[3.0e7, 0.0, -5.0]], dtype=torch.float32)
    target = torch.tensor([0])
    default = stablemax_cross_entropy(logits, target)
    assert default.dtype == torch.float32
    exact = stablemax_cross_entropy(logits.double(), target, dtype=torch.float64)
    assert default == exact.float()  # computed in float64, rounded once
    native = stablemax_cross_entropy(logits, target, dtype=None)
    assert native == stablemax_cross_entropy(logits, target, dtype=torch.float32)
    # float32 absorbs the other terms (2^24 < 3e7 + 1): the float32 loss is exactly 0.
    assert native == 0 and default > 0


def test_stablemax_cross_entropy_validation():
    logits = torch.randn(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        stablemax_cross_entropy(logits, torch.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        stablemax_cross_entropy(logits, torch.tensor([0, 1]), label_smoothing=1.5)
    with pytest.raises(TypeError, match=r"floating torch\.dtype"):
        stablemax_cross_entropy(logits, torch.tensor([0, 1]), dtype=torch.int64)
    with pytest.raises(ValueError, match="floating-point target"):
        stablemax_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="scalar"):
        stablemax_cross_entropy(torch.tensor(1.0), torch.tensor(0))


# ---------------------------------------------------------------- CrossEntropyLoss


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"reduction": "none"},
        {"reduction": "sum", "label_smoothing": 0.1},
        {"weight": torch.tensor([1.0, 2.0, 0.5, 1.5]), "ignore_index": 2},
    ],
)
def test_softmax_cross_entropy_loss_is_exactly_nn_cross_entropy_loss(kwargs):
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(7, 4, generator=gen, requires_grad=True)
    target = torch.randint(0, 4, (7,), generator=gen)
    ours = CrossEntropyLoss(**kwargs)(logits, target)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    theirs = nn.CrossEntropyLoss(**kwargs)(logits, target)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), logits)
    assert torch.equal(ours, theirs)
    assert torch.equal(grad_ours, grad_theirs)


def test_cross_entropy_loss_stablemax_and_switching_mid_run():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 3, 2, generator=gen)
    target = torch.randint(0, 3, (5, 2), generator=gen)
    weight = torch.tensor([1.0, 0.5, 2.0])
    loss_fn = CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    assert torch.equal(
        loss_fn(logits, target), F.cross_entropy(logits, target, weight, label_smoothing=0.1)
    )
    loss_fn.activation = "stablemax"
    expected = stablemax_cross_entropy(logits, target, weight, label_smoothing=0.1, dtype=None)
    assert torch.equal(loss_fn(logits, target), expected)
    loss_fn.dtype = torch.float64
    expected = stablemax_cross_entropy(logits, target, weight, label_smoothing=0.1)
    assert torch.equal(loss_fn(logits, target), expected)
    assert "activation='stablemax'" in repr(loss_fn)


def test_cross_entropy_loss_softmax_in_float64_sees_past_float32_collapse():
    logits = torch.tensor([[17.0, 0.0]], requires_grad=True)
    target = torch.tensor([0])
    assert CrossEntropyLoss()(logits, target) == 0  # collapsed in float32
    loss_fn = CrossEntropyLoss(dtype=torch.float64)
    loss = loss_fn(logits, target)
    assert loss.dtype == torch.float32
    assert loss == F.cross_entropy(logits.double(), target).float()
    assert loss > 0
    loss.backward()
    assert logits.grad.dtype == torch.float32 and logits.grad[0, 0] < 0
    probabilities = torch.tensor([[0.75, 0.25]])
    torch.testing.assert_close(
        loss_fn(logits, probabilities),
        F.cross_entropy(logits.double(), probabilities.double()).float(),
    )


@pytest.mark.parametrize("shape", [(7, 5), (5,), (3, 5, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compute", [None, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_log_probs_hook_sees_the_log_probs_and_changes_nothing(shape, dtype, compute, reduction):
    gen = torch.Generator().manual_seed(11)
    logits = (10 * torch.randn(shape, generator=gen)).to(dtype)
    target = torch.randint(0, 5, shape[:1] + shape[2:] if len(shape) > 1 else (), generator=gen)
    if target.dim():
        target.view(-1)[0] = 3  # the ignored class below
    weight = torch.rand(5, generator=gen).to(dtype)
    results, seen = [], []
    for hooked in (False, True):
        loss_fn = CrossEntropyLoss(
            weight=weight, ignore_index=3, reduction=reduction, dtype=compute
        )
        if hooked:
            handle = loss_fn.register_log_probs_hook(lambda *args: seen.append(args))
        x = logits.clone().requires_grad_()
        loss = loss_fn(x, target)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        results.append((loss, grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    ((module, input, seen_target, log_probs),) = seen
    assert module is loss_fn and input.shape == shape and not log_probs.requires_grad
    assert seen_target is target
    expected = F.log_softmax(logits.to(compute or dtype), dim=0 if len(shape) == 1 else 1)
    assert log_probs.dtype == (compute or dtype) and torch.equal(log_probs, expected)
    handle.remove()
    loss_fn(logits, target)
    assert len(seen) == 1


def test_log_probs_hook_is_not_called_where_the_loss_does_not_split():
    seen = []
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    loss_fn = CrossEntropyLoss(label_smoothing=0.1)
    loss_fn.register_log_probs_hook(lambda *args: seen.append(args))
    assert torch.equal(
        loss_fn(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1)
    )
    loss_fn.label_smoothing = 0.0
    probabilities = torch.softmax(torch.randn(4, 3), dim=1)
    assert torch.equal(loss_fn(logits, probabilities), F.cross_entropy(logits, probabilities))
    loss_fn.activation = "stablemax"
    loss_fn(logits, target)
    loss_fn.activation = "softmax"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # casts the whole loss to float32
        assert loss_fn(logits.bfloat16(), target).dtype == torch.float32
    assert seen == []
    loss_fn(logits, target)
    assert len(seen) == 1


def test_cross_entropy_loss_validation():
    with pytest.raises(ValueError, match="activation"):
        CrossEntropyLoss(activation="sparsemax")
    with pytest.raises(TypeError, match="dtype"):
        CrossEntropyLoss(dtype="float64")
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropyLoss(label_smoothing=-0.1)
    loss_fn = CrossEntropyLoss()
    loss_fn.activation = "softmx"
    with pytest.raises(ValueError, match="activation"):
        loss_fn(torch.randn(2, 3), torch.tensor([0, 1]))


# ---------------------------------------------------------------- z_loss


def test_z_loss_hand_computation():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]], dtype=torch.float64)
    # Z = 1 + 3 = 4 and Z = 2e
    expected = (math.log(4.0) ** 2 + (1 + math.log(2.0)) ** 2) / 2
    assert abs(z_loss(logits).item() - expected) < 1e-14


def test_z_loss_dim_and_mean_over_positions():
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    expected = (
        sum(
            math.log(sum(math.exp(x[i, c, t].item()) for c in range(5))) ** 2
            for i in range(2)
            for t in range(3)
        )
        / 6
    )
    assert abs(z_loss(x, dim=1).item() - expected) < 1e-12
    assert z_loss(x, dim=1).shape == ()
