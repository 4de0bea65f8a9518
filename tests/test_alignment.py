"""Tests for dynlens.alignment: the NLM cosine, per tensor and from shard sums."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dynlens.alignment
from dynlens.alignment import nlm_cosine, nlm_cosine_from_sums, nlm_cosine_per_tensor, nlm_sums


def test_docstring_examples():
    result = doctest.testmod(dynlens.alignment, extraglobs={"torch": torch})
    assert result.failed == 0 and result.attempted > 0


def test_nlm_cosine_hand_computation():
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    grads = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    g = torch.cat([t.flatten() for t in grads]).double()
    w = torch.cat([t.flatten() for t in params]).double()
    expected = -(g @ w) / (g.norm() * w.norm())
    got = nlm_cosine(grads, params)
    assert got.shape == () and abs(got.item() - expected.item()) < 1e-6
    per_tensor = nlm_cosine_per_tensor(grads, params)
    for i, (gi, wi) in enumerate(zip(grads, params, strict=True)):
        gi, wi = gi.flatten().double(), wi.flatten().double()
        assert abs(per_tensor[i].item() - (-(gi @ wi) / (gi.norm() * wi.norm())).item()) < 1e-6


def test_nlm_cosine_special_directions():
    params = [torch.tensor([[1.0, -2.0], [0.5, 3.0]]), torch.tensor([4.0, 0.0])]
    assert nlm_cosine([-3 * p for p in params], params).item() == pytest.approx(1.0, abs=1e-7)
    assert nlm_cosine([2 * p for p in params], params).item() == pytest.approx(-1.0, abs=1e-7)
    assert nlm_cosine([torch.zeros_like(p) for p in params], params).item() == 0.0
    orthogonal = [torch.tensor([[2.0, 1.0], [0.0, 0.0]]), torch.tensor([0.0, 7.0])]
    assert nlm_cosine(orthogonal, params).item() == 0.0
    assert nlm_cosine_per_tensor([-p for p in params], params).tolist() == [1.0, 1.0]
    assert nlm_cosine([torch.ones(2)], [torch.zeros(2)]).item() == 0.0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_nlm_cosine_is_a_cosine(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(3, 2, generator=gen) * scale, torch.randn(4, generator=gen)]
    grads = [torch.randn(3, 2, generator=gen), torch.randn(4, generator=gen) * scale]
    value = nlm_cosine(grads, params)
    assert -1.0 <= value.item() <= 1.0
    # scale invariant in both arguments, and odd in the gradient
    torch.testing.assert_close(nlm_cosine([2.5 * g for g in grads], params), value)
    torch.testing.assert_close(nlm_cosine(grads, [0.5 * p for p in params]), value)
    torch.testing.assert_close(nlm_cosine([-g for g in grads], params), -value)


def test_nlm_cosine_validation():
    with pytest.raises(ValueError, match="equally many"):
        nlm_cosine([torch.ones(2)], [torch.ones(2), torch.ones(2)])
    with pytest.raises(ValueError, match="shape"):
        nlm_cosine([torch.ones(2)], [torch.ones(3)])
    with pytest.raises(ValueError, match="None"):
        nlm_cosine_per_tensor([None], [torch.ones(3)])


def test_nlm_sums_add_over_shards_of_the_parameters():
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    grads = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    whole = nlm_cosine(grads, params)
    # FSDP-like shards: flat pieces of every tensor, split across two "ranks"
    flat_p = torch.cat([p.reshape(-1) for p in params])
    flat_g = torch.cat([g.reshape(-1) for g in grads])
    pieces = [(flat_g[:6], flat_p[:6]), (flat_g[6:], flat_p[6:])]
    total = sum(nlm_sums([g], [p]) for g, p in pieces)
    torch.testing.assert_close(nlm_cosine_from_sums(total), whole)
    torch.testing.assert_close(nlm_sums(grads, params), total)


def test_nlm_cosines_are_the_overall_and_per_tensor_cosines_by_name():
    gen = torch.Generator().manual_seed(5)
    a = torch.nn.Parameter(torch.randn(3, 2, generator=gen))
    b = torch.nn.Parameter(torch.randn(4, generator=gen))
    a.grad, b.grad = torch.randn(3, 2, generator=gen), torch.randn(4, generator=gen)
    got = dynlens.alignment.nlm_cosines([("a", a), ("b", b)], per_layer=True)
    g = torch.cat([a.grad.flatten(), b.grad.flatten()])
    w = torch.cat([a.detach().flatten(), b.detach().flatten()])
    assert set(got) == {"nlm_cosine", "nlm_cosine/a", "nlm_cosine/b"}
    assert got["nlm_cosine"].item() == pytest.approx((-g @ w / (g.norm() * w.norm())).item())
    for name, p in (("a", a), ("b", b)):
        by_hand = -p.grad.flatten() @ p.detach().flatten() / (p.grad.norm() * p.detach().norm())
        assert got[f"nlm_cosine/{name}"].item() == pytest.approx(by_hand.item())
    assert set(dynlens.alignment.nlm_cosines([("a", a)])) == {"nlm_cosine"}
    assert dynlens.alignment.nlm_cosines([]) == {}
