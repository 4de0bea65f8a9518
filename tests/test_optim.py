"""Tests for dynlens.optim: the ⊥Grad projection and the OrthoGrad optimizer wrapper."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynlens.optim
from dynlens.optim import OrthoGrad, project_out_weights_


def test_docstring_examples():
    result = doctest.testmod(dynlens.optim, extraglobs={"torch": torch})
    assert result.failed == 0
    assert result.attempted >= 4


def hand_projection(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The paper's formula in float64, written out."""
    w64, g64 = w.double().flatten(), g.double().flatten()
    perp = g64 - (w64 @ g64) / (w64 @ w64) * w64
    return (perp * g64.norm() / perp.norm()).view_as(g)


@settings(max_examples=50, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
)
def test_projection_is_orthogonal_and_norm_preserving(shape, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(*shape, generator=gen) * scale)
    g = torch.randn(*shape, generator=gen)
    if w.numel() > 1:
        w.grad = g.clone()
        project_out_weights_([w])
        cos = (w.detach().flatten() @ w.grad.flatten()) / (w.norm() * w.grad.norm())
        assert abs(cos.item()) < 1e-6
        assert abs(w.grad.norm().item() - g.norm().item()) <= 1e-5 * g.norm().item()
        torch.testing.assert_close(w.grad, hand_projection(w.detach(), g).float())
    else:
        # A single number is always parallel to its weight: nothing orthogonal remains.
        w.grad = g.clone()
        project_out_weights_([w])
        assert torch.equal(w.grad, torch.zeros_like(g))


def test_projection_per_tensor_and_skips_missing_grads():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (nn.Parameter(torch.randn(4, 3, generator=gen)) for _ in range(3))
    ga, gb = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    a.grad, b.grad = ga.clone(), gb.clone()
    project_out_weights_([a, b, c])
    torch.testing.assert_close(a.grad, hand_projection(a.detach(), ga).float())
    torch.testing.assert_close(b.grad, hand_projection(b.detach(), gb).float())
    assert c.grad is None


def test_projection_degenerate_cases_have_no_nan():
    zero_w = nn.Parameter(torch.zeros(3))
    zero_w.grad = torch.tensor([1.0, -2.0, 2.0])
    parallel = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    parallel.grad = torch.tensor([-2.0, -4.0, -6.0])
    zero_g = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    zero_g.grad = torch.zeros(3)
    project_out_weights_([zero_w, parallel, zero_g])
    assert torch.equal(zero_w.grad, torch.tensor([1.0, -2.0, 2.0]))  # nothing to project out
    assert torch.equal(parallel.grad, torch.zeros(3))  # purely radial: no orthogonal part
    assert torch.equal(zero_g.grad, torch.zeros(3))
    # rtol sets what counts as parallel: here sin(angle) = 0.6
    w = nn.Parameter(torch.tensor([1.0, 0.0]))
    w.grad = torch.tensor([4.0, 3.0])
    project_out_weights_([w], rtol=0.5)
    assert torch.equal(w.grad, torch.tensor([0.0, 5.0]))
    w.grad = torch.tensor([4.0, 3.0])
    project_out_weights_([w], rtol=0.7)
    assert torch.equal(w.grad, torch.zeros(2))


def test_projection_stays_orthogonal_for_nearly_parallel_gradients():
    # g is 1e-4 (relative) away from -3w: one pass leaves a radial residue of order eps * ||g||
    # that the rescaling by ||g|| / ||g_perp|| (~1e4) would amplify.
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        w = nn.Parameter(torch.randn(1000, generator=gen))
        g = -3 * w.detach() + 1e-4 * torch.randn(1000, generator=gen)
        w.grad = g.clone()
        project_out_weights_([w])
        w64, g64 = w.detach().double(), w.grad.double()
        assert abs((w64 @ g64 / (w64.norm() * g64.norm())).item()) < 1e-6
        assert abs(w.grad.norm().item() / g.norm().item() - 1) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_projection_other_dtypes_without_overflow(dtype):
    # <w, w> = 2e5 overflows float16 (max 65504): the scalars are accumulated in float32.
    w = nn.Parameter(torch.ones(200_000, dtype=dtype))
    g = torch.zeros(200_000, dtype=dtype)
    g[:100_000] = 1
    w.grad = g.clone()
    project_out_weights_([w])
    assert w.grad.dtype == dtype
    assert torch.isfinite(w.grad).all()
    # g = 1 on the first half: its orthogonal part is +1/2 there and -1/2 on the second half.
    expected = torch.cat([torch.full((100_000,), 0.5), torch.full((100_000,), -0.5)]) * 2**0.5
    torch.testing.assert_close(w.grad.double(), expected.double(), rtol=1e-2, atol=0)


def test_small_step_along_projected_gradient_does_not_increase_convex_loss():
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)

    def loss_fn(w):
        return 0.5 * w @ a @ w - b @ w

    w = nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    (w.grad,) = torch.autograd.grad(loss_fn(w), w)
    project_out_weights_([w])
    with torch.no_grad():
        before = loss_fn(w)
        for lr in (1e-2, 1e-3, 1e-4):
            assert loss_fn(w - lr * w.grad) <= before


def test_projection_rejects_sparse_gradients():
    w = nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3).to_sparse()
    with pytest.raises(TypeError, match="dense real"):
        project_out_weights_([w])


# ---------------------------------------------------------------- OrthoGrad


def make_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(16, 5, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    return model, x, y


def train(model, opt, x, y, steps, scheduler=None, project_by_hand=False):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if project_by_hand:
            project_out_weights_(model.parameters())
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return [p.detach().clone() for p in model.parameters()]


def test_orthograd_adam_equals_hand_projection_then_adam_and_uses_betas_eps():
    kwargs = {"lr": 0.05, "betas": (0.5, 0.9), "eps": 1e-2, "weight_decay": 0.01}
    model, x, y = make_problem()
    reference = copy.deepcopy(model)
    ours = train(model, OrthoGrad(model.parameters(), torch.optim.Adam, **kwargs), x, y, 5)
    theirs = train(
        reference,
        torch.optim.Adam(reference.parameters(), **kwargs),
        x,
        y,
        5,
        project_by_hand=True,
    )
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    # The keywords take effect: other betas or eps give other weights.
    for changed in ({"betas": (0.9, 0.999)}, {"eps": 1e-8}):
        model, x, y = make_problem()
        other = train(
            model, OrthoGrad(model.parameters(), torch.optim.Adam, **kwargs | changed), x, y, 5
        )
        assert not all(torch.equal(a, b) for a, b in zip(ours, other, strict=True))


def test_orthograd_differs_from_plain_adam():
    model, x, y = make_problem()
    reference = copy.deepcopy(model)
    ours = train(model, OrthoGrad(model.parameters(), torch.optim.Adam, lr=0.05), x, y, 3)
    plain = train(reference, torch.optim.Adam(reference.parameters(), lr=0.05), x, y, 3)
    assert not any(torch.equal(a, b) for a, b in zip(ours, plain, strict=True))


def test_orthograd_state_dict_round_trip_continues_identically():
    model, x, y = make_problem()
    opt = OrthoGrad(model.parameters(), torch.optim.AdamW, lr=0.05, betas=(0.8, 0.95))
    train(model, opt, x, y, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["param_groups"][0]["betas"] == (0.8, 0.95)
    continued = train(model, opt, x, y, 3)

    restored, _, _ = make_problem(seed=99)
    restored.load_state_dict(saved_model)
    opt2 = OrthoGrad(restored.parameters(), torch.optim.AdamW, lr=1.0)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["lr"] == 0.05
    resumed = train(restored, opt2, x, y, 3)
    for a, b in zip(continued, resumed, strict=True):
        assert torch.equal(a, b)


def test_orthograd_state_is_the_base_optimizers():
    model, x, y = make_problem()
    opt = OrthoGrad(model.parameters(), torch.optim.Adam, lr=0.01)
    train(model, opt, x, y, 1)
    p = next(model.parameters())
    assert "exp_avg_sq" in opt.state[p]
    assert opt.state is opt.base_optimizer.state
    assert opt.defaults["betas"] == (0.9, 0.999)


def test_step_lr_changes_the_lr_the_base_optimizer_uses():
    model, x, y = make_problem()
    reference = copy.deepcopy(model)
    opt = OrthoGrad(model.parameters(), torch.optim.Adam, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    ours = train(model, opt, x, y, 5, scheduler=scheduler)
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1**2)

    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.1)
    ref_scheduler = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.1)
    theirs = train(reference, ref_opt, x, y, 5, scheduler=ref_scheduler, project_by_hand=True)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_one_cycle_lr_cycles_the_base_optimizers_betas():
    model, x, y = make_problem()
    opt = OrthoGrad(model.parameters(), torch.optim.Adam, lr=0.01, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    first = opt.base_optimizer.param_groups[0]["betas"]
    train(model, opt, x, y, 4, scheduler=scheduler)
    later = opt.base_optimizer.param_groups[0]["betas"]
    assert later[0] != first[0] and later[1] == 0.99


def test_add_param_group_reaches_the_base_optimizer():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = OrthoGrad([a], torch.optim.SGD, lr=0.1)
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert len(opt.base_optimizer.param_groups) == 2
    b.grad = torch.tensor([1.0, -1.0])
    opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([1.0, 1.0]) - 0.5 * b.grad)


def test_step_with_closure_returns_loss_and_projects():
    model, x, y = make_problem()
    opt = OrthoGrad(model.parameters(), torch.optim.SGD, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.shape == () and loss > 0
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()
    # the gradient the step used was projected: orthogonal to the weights before the step
    before = make_problem()[0]
    for p, p0 in zip(model.parameters(), before.parameters(), strict=True):
        step = (p0 - p).detach().flatten()
        assert abs((step @ p0.detach().flatten()).item()) < 1e-5 * step.norm() * p0.norm()


def test_lbfgs_base_sees_projected_gradients_and_decreases_loss():
    model, x, y = make_problem()
    opt = OrthoGrad(model.parameters(), torch.optim.LBFGS, lr=0.5, max_iter=5)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(3):
        opt.step(closure)
    assert nn.functional.cross_entropy(model(x), y).item() < first


def test_zero_grad_delegates():
    model, x, y = make_problem()
    opt = OrthoGrad(model.parameters(), torch.optim.SGD, lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    nn.functional.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_orthograd_validation_messages():
    params = [nn.Parameter(torch.ones(2))]
    with pytest.raises(TypeError, match="pass the class"):
        OrthoGrad(params, torch.optim.SGD(params, lr=0.1))
    with pytest.raises(TypeError, match=r"subclass of torch.optim.Optimizer"):
        OrthoGrad(params, nn.Linear)
    with pytest.raises(TypeError, match=r"subclass of torch.optim.Optimizer"):
        OrthoGrad(params, "Adam")
    with pytest.raises(TypeError, match="already OrthoGrad"):
        OrthoGrad(params, OrthoGrad)
    with pytest.raises(TypeError, match="bets"):  # a typo reaches Adam instead of vanishing
        OrthoGrad(params, torch.optim.Adam, lr=0.1, bets=(0.9, 0.99))
    assert "Adam" in repr(OrthoGrad(params, torch.optim.Adam))
