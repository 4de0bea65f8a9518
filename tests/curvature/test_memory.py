"""Memory-bounded Hessian-vector products and the finite-difference route, on tiny problems.

The memory plan is tested against a fake device (an injected :class:`MemoryMeter`) whose passes
cost a known number of bytes and which runs out of memory where the test says, since CI has no
GPU; the products themselves are always the real ones, checked against dense Hessians.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from dynlens.curvature import (
    CurvatureError,
    CurvatureMemoryError,
    HessianOperator,
    MemoryLimit,
    MemoryMeter,
    RssMemoryMeter,
    finite_difference_step,
    hutchinson_trace,
    hvp,
    top_eigenvalue,
)

D = torch.float64


def mlp_problem(dtype: torch.dtype = D, seed: int = 0, layernorm: bool = False):
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 6)]
    layers += [nn.LayerNorm(6), nn.GELU()] if layernorm else [nn.Tanh()]
    layers += [nn.Linear(6, 3)]
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():  # drawn in float64 whatever the dtype: the same problem, rounded
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D) / 2)
    x = torch.randn(16, 4, generator=g, dtype=D).to(dtype)
    y = torch.randint(0, 3, (16,), generator=g)

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    return loss_fn, {k: v.detach() for k, v in model.named_parameters()}


def dense_hessian(loss_fn, params: dict[str, Tensor]) -> Tensor:
    names, shapes = list(params), [p.shape for p in params.values()]
    theta = torch.cat([p.reshape(-1) for p in params.values()]).double()

    def flat(t: Tensor) -> Tensor:
        pieces = t.split([s.numel() for s in shapes])
        return loss_fn({n: c.reshape(s) for n, s, c in zip(names, shapes, pieces, strict=True)})

    return torch.autograd.functional.hessian(flat, theta)


def probes(k: int, n: int, dtype: torch.dtype = D, seed: int = 1) -> Tensor:
    return torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class FakeDevice(MemoryMeter):
    """A device holding ``base`` bytes on which a pass of k probes peaks at base + fixed + per·k.

    ``oom(call, probes)`` says which metered calls (numbered from 0, the graph build included)
    run out of memory: they raise ``torch.OutOfMemoryError`` as the CUDA allocator does.
    """

    def __init__(
        self,
        *,
        base: int = 1000,
        fixed: int = 100,
        per: int = 50,
        oom: Callable[[int, int], bool] | None = None,
    ) -> None:
        self.base, self.fixed, self.per = base, fixed, per
        self.oom = oom or (lambda call, probes: False)
        self.passes: list[int] = []  # probes of every metered call, failed ones included
        self.peaks: list[int] = []

    def in_use(self) -> int:
        return self.base

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int:
        return self.peaks[-1] if self.peaks else self.base

    def measure(self, fn, probes):
        call = len(self.passes)
        self.passes.append(probes)
        if self.oom(call, probes):
            raise torch.OutOfMemoryError("fake: CUDA out of memory")
        out = fn()
        self.peaks.append(self.base + self.fixed + self.per * probes)
        return out, self.peaks[-1]


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


def test_passes_start_at_one_probe_and_grow_only_as_far_as_measured_peaks_allow():
    loss_fn, params = mlp_problem()
    h = dense_hessian(loss_fn, params)
    v = probes(20, h.shape[0])
    device = FakeDevice()
    memory = MemoryLimit(1600, meter=device)  # 600 bytes over what is in use; 540 planned
    op = HessianOperator(loss_fn, params, route="batched_double_backward", memory=memory)
    torch.testing.assert_close(op @ v, v @ h, rtol=0, atol=1e-10)
    # graph build, then 1 probe (150 B: assumed all per probe, so 3 fit), then 3 (250 B: the
    # line 100 + 50·k, so 8 fit: 500 ≤ 540), then 8 and 8
    assert device.passes == [1, 1, 3, 8, 8]
    assert max(device.peaks) <= memory.limit and memory.peak_seen == max(device.peaks)
    assert memory.predict("batched_double_backward", 8) == pytest.approx(500)


def test_a_pass_predicted_not_to_fit_is_refused_before_it_runs():
    loss_fn, params = mlp_problem()
    n = sum(p.numel() for p in params.values())
    device = FakeDevice()
    memory = MemoryLimit(1100, meter=device)  # 90 bytes planned; one probe was measured at 150
    op = HessianOperator(loss_fn, params, route="double_backward", memory=memory)
    with pytest.raises(
        CurvatureMemoryError, match=r"needs about .*its gradient graph.*'finite_difference'"
    ):
        op @ probes(3, n)
    assert device.passes == [1, 1]  # the graph and the first probe (nothing known yet) only
    assert op._graph is None  # freed


def test_out_of_memory_halves_the_probes_per_pass_and_retries():
    loss_fn, params = mlp_problem()
    h = dense_hessian(loss_fn, params)
    v = probes(20, h.shape[0])
    device = FakeDevice(oom=lambda call, probes: probes > 2)
    memory = MemoryLimit(10**12, meter=device)  # the limit allows everything: the device does not
    op = HessianOperator(loss_fn, params, route="batched_double_backward", memory=memory)
    torch.testing.assert_close(op @ v, v @ h, rtol=0, atol=1e-10)
    route = "batched_double_backward"
    assert memory.out_of_memory == [(route, 19), (route, 9), (route, 4)]
    assert device.passes[:6] == [1, 1, 19, 9, 4, 2]
    assert max(device.passes[5:]) == 2  # capped for the rest of the operator's life
    assert op._graph is not None  # the shared graph survived the retries
    torch.testing.assert_close(op @ v[:5], v[:5] @ h, rtol=0, atol=1e-10)
    assert max(device.passes[-3:]) <= 2  # the cap holds in later calls too


def test_out_of_memory_at_one_probe_frees_what_the_measurement_held_and_raises():
    loss_fn, params = mlp_problem()
    n = sum(p.numel() for p in params.values())
    device = FakeDevice(oom=lambda call, probes: call >= 1)  # the graph fits, no product does
    memory = MemoryLimit(10**12, meter=device)
    op = HessianOperator(loss_fn, params, route="double_backward", memory=memory)
    with pytest.raises(CurvatureMemoryError, match="out of memory at one Hessian-vector product"):
        op @ probes(4, n)
    assert device.passes == [1, 1] and op._graph is None
    assert memory.out_of_memory == [("double_backward", 1)]
    # the graph build itself out of memory: no smaller pass exists, so it raises at once
    device = FakeDevice(oom=lambda call, probes: True)
    op = HessianOperator(
        loss_fn, params, route="double_backward", memory=MemoryLimit(10**12, meter=device)
    )
    with pytest.raises(CurvatureMemoryError):
        op @ probes(4, n)
    assert device.passes == [1]


@pytest.mark.parametrize(("headroom", "trial"), [(10**9, 8), (200, 3), (100, None)])
def test_the_tuned_trial_obeys_the_limit(headroom: int, trial: int | None):
    loss_fn, params = mlp_problem()
    h = dense_hessian(loss_fn, params)
    v = probes(12, h.shape[0])
    device = FakeDevice(fixed=0, per=50)
    memory = MemoryLimit(1000 + headroom, meter=device)
    op = HessianOperator(loss_fn, params, route="tuned", memory=memory)
    torch.testing.assert_close(op @ v, v @ h, rtol=0, atol=1e-10)
    # graph, one product, then two one at a time (as many as fit of the two), then the trial
    if trial is None:  # one probe per pass is all that fits: no vectorised trial at all
        assert set(device.passes) == {1} and op.route == "double_backward"
    else:
        assert device.passes[:4] == [1, 1, 2, trial]
        assert max(device.passes) <= trial
    assert max(device.peaks) <= memory.limit


def test_lanczos_stops_with_the_ritz_pair_so_far_when_a_product_no_longer_fits():
    loss_fn, params = mlp_problem()
    device = FakeDevice(oom=lambda call, probes: call >= 4)  # the graph, then 3 products
    limited = top_eigenvalue(
        loss_fn, params, max_iter=10, tol=1e-12, memory=MemoryLimit(10**12, meter=device)
    )
    free = top_eigenvalue(loss_fn, params, max_iter=3, tol=1e-12)
    assert limited.iterations == 3 and not limited.converged
    assert limited.value == pytest.approx(free.value, rel=1e-12)
    assert limited.value <= torch.linalg.eigvalsh(dense_hessian(loss_fn, params))[-1] + 1e-12


def test_a_generous_limit_changes_no_bit_of_the_results():
    loss_fn, params = mlp_problem()
    kw = {"num_probes": 20, "generator": torch.Generator().manual_seed(0)}
    free = hutchinson_trace(loss_fn, params, route="double_backward", **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    limited = hutchinson_trace(
        loss_fn, params, route="double_backward", memory=MemoryLimit(2**50), **kw
    )
    assert (limited.value, limited.stderr, limited.frobenius) == (
        free.value,
        free.stderr,
        free.frobenius,
    )


def test_probe_rows_are_chunked_to_a_quarter_of_the_headroom():
    loss_fn, params = mlp_problem()
    n = sum(p.numel() for p in params.values())
    row = 3 * n * 8  # probe, product and concatenation rows of float64
    device = FakeDevice(base=0)
    op = HessianOperator(loss_fn, params, memory=MemoryLimit(int(row * 5 / 0.9 * 4), meter=device))
    assert op.rows_that_fit(16) == 5
    assert HessianOperator(loss_fn, params).rows_that_fit(16) == 16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_rss_meter_reads_the_peak_of_a_pass_and_resets_it():
    meter = RssMemoryMeter()
    assert meter.available
    size = 256 * 2**20  # well above glibc's largest mmap threshold (32 MiB): mapped, then unmapped
    before = meter.in_use()
    out, peak = meter.measure(lambda: torch.ones(size // 4, dtype=torch.float32), 1)
    # pages are touched by the fill; the RSS counters may lag by a few pages, not by half
    assert peak - before >= size // 2, (before, peak)
    del out
    meter.reset_peak()
    assert meter.peak() - before < size // 2  # the high-water mark starts again from now


def test_memory_limit_validation():
    with pytest.raises(ValueError, match="positive number of bytes"):
        MemoryLimit(0)
    with pytest.raises(ValueError, match="positive number of bytes"):
        MemoryLimit(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        MemoryLimit(10, margin=1.5)


def test_the_plan_round_trips_through_its_state():
    memory = MemoryLimit(1600, meter=FakeDevice())
    memory.record("double_backward", 1, 1000, 1150)
    memory.record("double_backward", 3, 1000, 1250)
    memory.failed("double_backward", 8)
    restored = MemoryLimit(1, meter=FakeDevice())
    restored.load_state_dict(memory.state_dict())
    assert restored.predict("double_backward", 5) == memory.predict("double_backward", 5) == 350
    assert restored.probes_per_pass("double_backward", 20) == 4  # capped at 8 // 2


# ---------------------------------------------------------------------------------------------
# the finite-difference route
# ---------------------------------------------------------------------------------------------


def test_finite_difference_step_formula():
    u = torch.finfo(torch.float64).eps
    assert finite_difference_step(3.0, 2.0, torch.float64) == pytest.approx(
        u ** (1 / 3) / 4 * 4 / 2
    )
    with pytest.raises(ValueError):
        finite_difference_step(1.0, 0.0, torch.float32)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-8), (torch.float32, 1e-3)])
@pytest.mark.parametrize("layernorm", [False, True])
def test_finite_differences_are_within_their_documented_error(dtype, tolerance, layernorm):
    loss_fn, params = mlp_problem(dtype, layernorm=layernorm)
    # the float64 reference at the very same (rounded) parameters
    reference, _ = mlp_problem(D, layernorm=layernorm)
    h = dense_hessian(reference, {k: p.double() for k, p in params.items()})
    v = probes(8, h.shape[0], dtype)
    fd = hvp(loss_fn, params, v, route="finite_difference")
    exact = (v.double() @ h).to(dtype)
    relative = (fd.double() - exact.double()).norm(dim=1) / exact.double().norm(dim=1)
    assert relative.max().item() <= tolerance, relative
    # the error is the approximation's, not noise: far above exact arithmetic's
    assert relative.max().item() > torch.finfo(dtype).eps


def test_finite_differences_never_touch_the_parameters():
    loss_fn, params = mlp_problem()
    before = {k: v.clone() for k, v in params.items()}
    n = sum(p.numel() for p in params.values())
    hvp(loss_fn, params, probes(3, n), route="finite_difference")
    for k, v in params.items():
        assert torch.equal(v, before[k]) and v.grad is None


class _OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_finite_differences_pass_where_no_exact_route_can():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g, dtype=D)
    params = {"w": torch.randn(3, 2, generator=g, dtype=D)}
    once = lambda p: torch.tanh(_OnceSquare.apply(x @ p["w"])).sum()  # noqa: E731
    plain = lambda p: torch.tanh((x @ p["w"]) ** 2).sum()  # noqa: E731
    v = probes(3, 6)
    with pytest.raises(CurvatureError, match="once_differentiable"):
        hvp(once, params, v)
    fd = hvp(once, params, v, route="finite_difference")
    h = dense_hessian(plain, params)
    assert (fd - v @ h).norm().item() <= 1e-8 * (v @ h).norm().item()


def test_finite_differences_of_an_affine_loss_and_a_zero_probe_are_zero():
    params = {"w": torch.tensor([1.0, -2.0], dtype=D)}
    out = hvp(lambda p: 3 * p["w"].sum(), params, torch.ones(2, dtype=D), route="finite_difference")
    assert out.abs().max().item() <= 1e-6
    loss_fn = lambda p: (p["w"] ** 2).sum()  # noqa: E731
    zero = hvp(loss_fn, params, torch.zeros(2, dtype=D), route="finite_difference")
    assert torch.equal(zero, torch.zeros(2, dtype=D))
    assert math.isclose(
        hvp(loss_fn, params, torch.tensor([1.0, 0.0], dtype=D), route="finite_difference")[0],
        2.0,
        rel_tol=1e-9,
    )


def _relu_problem(dtype: torch.dtype):
    """A ReLU MLP: piecewise quadratic in θ, with kinks wherever a hidden unit's input is 0."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    ).to(dtype)
    x = torch.randn(64, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (64,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    return (lambda p: F.cross_entropy(functional_call(model, p, (x,)), y)), params


def _relative_errors(loss_fn, params, v) -> tuple[Tensor, HessianOperator]:
    exact = HessianOperator(loss_fn, params, route="double_backward") @ v
    op = HessianOperator(loss_fn, params, route="finite_difference")
    fd = op @ v
    return (fd - exact).double().norm(dim=1) / exact.double().norm(dim=1), op


@pytest.mark.parametrize("layernorm", [False, True])
def test_the_finite_difference_self_check_estimates_the_error_on_a_smooth_loss(layernorm):
    loss_fn, params = mlp_problem(torch.float32, layernorm=layernorm)
    n = sum(p.numel() for p in params.values())
    errors, op = _relative_errors(loss_fn, params, probes(6, n, torch.float32).sign())
    estimate = op.finite_difference_error
    # the estimate is of the right order (it leans high: its ε/2 half is the noisier one)
    assert errors.max().item() / 3 <= estimate <= 10 * errors.max().item(), (estimate, errors)
    assert estimate < 1e-3


def test_the_finite_difference_self_check_flags_kinks_the_step_crosses():
    # float32: the step (0.12% of the parameters' scale) crosses ReLU kinks, and the central
    # difference no longer approximates the Hessian; the self-check says so
    loss_fn, params = _relu_problem(torch.float32)
    n = sum(p.numel() for p in params.values())
    errors, op = _relative_errors(loss_fn, params, probes(2, n, torch.float32).sign())
    assert errors.min().item() > 1.0 and op.finite_difference_error > 0.3
    # float64: its step (1.5e-6) crosses none, and the products are right
    loss_fn, params = _relu_problem(D)
    errors, op = _relative_errors(loss_fn, params, probes(2, n).sign())
    assert errors.max().item() < 1e-8 and op.finite_difference_error < 1e-8


def test_estimates_carry_the_product_error_of_finite_differences_only():
    loss_fn, params = mlp_problem(torch.float32)
    fd = hutchinson_trace(loss_fn, params, num_probes=4, route="finite_difference")
    exact = hutchinson_trace(loss_fn, params, num_probes=4, route="double_backward")
    assert fd.route == "finite_difference" and 0 < fd.product_error < 1e-3
    assert exact.product_error is None
    eigen = top_eigenvalue(loss_fn, params, max_iter=4, route="finite_difference")
    assert 0 < eigen.product_error < 1e-3
    assert top_eigenvalue(loss_fn, params, max_iter=4).product_error is None


def test_the_rss_meter_does_not_count_what_the_c_allocator_keeps_after_a_free():
    meter = RssMemoryMeter()
    # 4,000 blocks of 64 KiB (below glibc's mmap threshold: on the heap); every other one freed,
    # the last kept, so the freed pages are holes that glibc does not give back by itself
    blocks = [torch.ones(16 * 1024) for _ in range(4000)]
    held = meter.in_use()
    del blocks[0:-1:2]
    freed = 2000 * 64 * 1024
    assert held - meter.in_use() >= freed // 2, (held, meter.in_use())
    del blocks
