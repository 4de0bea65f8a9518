"""Curvature estimators against dense float64 Hessians of tiny models."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from dynlens.curvature import (
    ROUTES,
    TUNING_PROBES,
    CurvatureError,
    CurvatureFallbackWarning,
    HessianOperator,
    adam_preconditioner,
    adam_sharpness_threshold,
    gd_sharpness_threshold,
    hutchinson_trace,
    hutchpp_trace,
    hvp,
    momentum_sharpness_threshold,
    sgd_trace_threshold,
    top_eigenvalue,
)
from dynlens.curvature import operator as hessian_operator
from dynlens.curvature.operator import _WARNED

D = torch.float64
MODELS = ("tanh_mlp", "layernorm_gelu", "attention", "batchnorm")
LossFn = Callable[[dict[str, Tensor]], Tensor]


@pytest.fixture(autouse=True)
def _fresh_warning_registry():
    # Fallback warnings are once per process and reason; every test starts from none seen.
    _WARNED.clear()
    yield
    _WARNED.clear()


class TinyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        # On CPU this dispatches to flash attention, which has no double-backward rule.
        return self.out(F.scaled_dot_product_attention(q, k, v).squeeze(1).mean(1))


def make_model(kind: str, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    if kind == "tanh_mlp":
        model, x = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(16, 4)
    elif kind == "layernorm_gelu":
        model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
        x = torch.randn(16, 5)
    elif kind == "attention":
        model, x = TinyAttention(), torch.randn(4, 5, 4)
    elif kind == "batchnorm":
        model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(16, 3)
    elif kind == "dropout":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3))
        x = torch.randn(16, 4)
    else:
        raise ValueError(kind)
    return model.to(D), x.to(D), torch.randint(0, 3, (x.shape[0],))


def problem(kind: str, seed: int = 0) -> tuple[nn.Module, LossFn, dict[str, Tensor]]:
    model, x, y = make_model(kind, seed)
    buffers = dict(model.named_buffers())

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        # Buffer copies: BatchNorm in train mode updates its running stats in place.
        copies = {k: b.clone() for k, b in buffers.items()}
        return F.cross_entropy(functional_call(model, (p, copies), (x,)), y)

    return model, loss_fn, {k: p.detach() for k, p in model.named_parameters()}


def exact_hessian(loss_fn: LossFn, params: dict[str, Tensor]) -> Tensor:
    names, shapes = list(params), [p.shape for p in params.values()]
    theta = torch.cat([p.reshape(-1) for p in params.values()])

    def flat_loss(t: Tensor) -> Tensor:
        pieces = t.split([s.numel() for s in shapes])
        return loss_fn({n: c.reshape(s) for n, s, c in zip(names, shapes, pieces, strict=True)})

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(flat_loss, theta)


def quadratic(eigenvalues: list[float], seed: int = 0) -> tuple[LossFn, dict[str, Tensor], Tensor]:
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    h = q @ torch.diag(torch.tensor(eigenvalues, dtype=D)) @ q.T
    return (lambda p: 0.5 * p["w"] @ h @ p["w"]), {"w": torch.zeros(n, dtype=D)}, h


# ---------------------------------------------------------------------------------------------
# Hessian-vector products
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", MODELS)
def test_hvp_matches_exact_hessian_on_every_route(kind: str, route: str) -> None:
    model, loss_fn, params = problem(kind)
    h = exact_hessian(loss_fn, params)
    probes = torch.randn(3, h.shape[0], dtype=D, generator=torch.Generator().manual_seed(1))
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    # An explicit route never falls back: attention passes because the math SDPA backend is used.
    out = hvp(loss_fn, params, probes, route=route)
    torch.testing.assert_close(out, probes @ h, rtol=0, atol=1e-10)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k


def test_auto_route_on_cpu_is_double_backward_even_through_attention() -> None:
    _, loss_fn, params = problem("attention")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = hutchinson_trace(loss_fn, params, num_probes=TUNING_PROBES)
        few = hutchinson_trace(loss_fn, params, num_probes=2, route="tuned")  # too few to time
        tuned = hutchinson_trace(loss_fn, params, num_probes=TUNING_PROBES, route="tuned")
    assert auto.route == few.route == "double_backward"  # "auto" never times anything
    assert tuned.route in ("double_backward", "batched_double_backward")
    assert tuned.value == pytest.approx(auto.value, rel=1e-12)
    assert not [w for w in caught if issubclass(w.category, CurvatureFallbackWarning)]


class _Clock:
    """perf_counter stand-in: each timed trial (start, stop) lasts the next given duration."""

    def __init__(self, *durations: float) -> None:
        self.ticks = [t for d in durations for t in (0.0, d)]

    def __call__(self) -> float:
        return self.ticks.pop(0)


@pytest.mark.parametrize(
    ("sequential", "batched", "kept"),
    [
        (1.0, 8 * 0.5, "batched_double_backward"),  # 0.5 per probe against 1.0: batched
        (1.0, 8 * 0.95, "double_backward"),  # within the 10% margin: double backward stays
        (1.0, 8 * 2.0, "double_backward"),
    ],
)
def test_tuned_route_on_cpu_keeps_the_double_backward_route_that_timed_faster(
    monkeypatch: pytest.MonkeyPatch, sequential: float, batched: float, kept: str
) -> None:
    _, loss_fn, params = problem("tanh_mlp")
    h = exact_hessian(loss_fn, params)
    probes = torch.randn(20, h.shape[0], dtype=D, generator=torch.Generator().manual_seed(3))
    op = HessianOperator(loss_fn, params, route="tuned")
    # two products timed one at a time, eight in one pass, on the clock the operator reads
    clock = SimpleNamespace(perf_counter=_Clock(2 * sequential, batched))
    monkeypatch.setattr(hessian_operator, "time", clock)
    out = op @ probes  # 1 + 2 + 8 trial products, then the other 9 on the route kept
    assert op.route == kept
    torch.testing.assert_close(out, probes @ h, rtol=0, atol=1e-10)  # rows in order
    torch.testing.assert_close(op @ probes[:6], probes[:6] @ h, rtol=0, atol=1e-10)  # no 2nd trial


def test_only_the_tuned_route_runs_the_timing_trial() -> None:
    _, loss_fn, params = problem("tanh_mlp")
    assert not HessianOperator(loss_fn, params, route="double_backward")._tuning
    assert not HessianOperator(loss_fn, params)._tuning
    assert HessianOperator(loss_fn, params, route="tuned")._tuning


def test_hvp_dict_and_flat_layouts_agree() -> None:
    _, loss_fn, params = problem("tanh_mlp")
    op = HessianOperator(loss_fn, params)
    probes = torch.randn(2, op.numel, dtype=D, generator=torch.Generator().manual_seed(0))
    expected = exact_hessian(loss_fn, params) @ probes.T
    batched = hvp(loss_fn, params, op.unflatten(probes))
    assert set(batched) == set(params)
    assert batched["0.weight"].shape == (2, 6, 4)
    torch.testing.assert_close(op.flatten(batched, batched=True), expected.T, rtol=0, atol=1e-10)
    single = hvp(loss_fn, params, op.unflatten(probes[1]))
    torch.testing.assert_close(op.flatten(single), expected[:, 1], rtol=0, atol=1e-10)
    torch.testing.assert_close(hvp(loss_fn, params, probes[0]), expected[:, 0], rtol=0, atol=1e-10)


def test_hvp_of_an_affine_loss_is_zero_on_every_route() -> None:
    a = torch.arange(5, dtype=D)
    params = {"w": torch.randn(5, dtype=D), "unused": torch.randn(2, dtype=D)}
    for route in ROUTES:
        out = hvp(lambda p: a @ p["w"], params, torch.ones(7, dtype=D), route=route)
        assert torch.equal(out, torch.zeros(7, dtype=D)), route
    eig = top_eigenvalue(lambda p: a @ p["w"], params)
    assert eig.converged and eig.value == 0.0 and eig.iterations == 1


@pytest.mark.parametrize("route", ROUTES)
def test_every_probe_sees_the_same_dropout_mask(route: str) -> None:
    # One Hessian means one mask: with a fresh mask per probe the columns would not form a
    # symmetric matrix, and the routes would disagree with each other.
    _, loss_fn, params = problem("dropout")
    op = HessianOperator(loss_fn, params)
    columns = hvp(loss_fn, params, torch.eye(op.numel, dtype=D), route=route)
    torch.testing.assert_close(columns, columns.T, rtol=0, atol=1e-12)
    reference = hvp(loss_fn, params, torch.eye(op.numel, dtype=D), route="double_backward")
    torch.testing.assert_close(columns, reference, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Trace
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_trace_estimates_at_the_default_budget(kind: str) -> None:
    _, loss_fn, params = problem(kind)
    exact = exact_hessian(loss_fn, params).trace().item()
    plain = hutchinson_trace(loss_fn, params)
    sketched = hutchpp_trace(loss_fn, params)
    assert plain.num_probes == 100
    assert sketched.num_probes == 100
    for est in (plain, sketched):
        assert abs(est.value - exact) <= 3 * est.stderr, est
    # Hutchinson's relative error here is ~10-20% at 100 probes (variance 2(‖H‖²_F − Σ H_jj²) at
    # init is large against tr(H)); Hutch++ meets 5% at the same budget.
    assert abs(sketched.value - exact) <= 0.05 * abs(exact), (sketched, exact)


def test_hutchinson_reaches_five_percent_where_its_variance_allows() -> None:
    # Budget chosen from the exact variance so that 5% is three standard deviations.
    _, loss_fn, params = problem("tanh_mlp")
    h = exact_hessian(loss_fn, params)
    exact = h.trace().item()
    variance = 2 * (h.square().sum() - h.diag().square().sum()).item()
    budget = math.ceil(variance / (0.05 * exact / 3) ** 2)
    est = hutchinson_trace(loss_fn, params, num_probes=budget, chunk_size=512)
    assert abs(est.value - exact) <= 0.05 * exact, (est, exact)
    # The reported stderr matches the exact one, √(variance/m), to within 10%.
    assert est.stderr == pytest.approx(math.sqrt(variance / budget), rel=0.1)


def test_hutchinson_frobenius_estimate() -> None:
    _, loss_fn, params = problem("layernorm_gelu")
    h = exact_hessian(loss_fn, params)
    h2 = h @ h
    # ‖Hv‖² = vᵀH²v is itself a Hutchinson term for H², with variance 2(‖H²‖²_F − Σ (H²)_jj²).
    sd = math.sqrt(2 * (h2.square().sum() - h2.diag().square().sum()).item() / 100)
    est = hutchinson_trace(loss_fn, params, num_probes=100)
    assert abs(est.frobenius**2 - h2.trace().item()) <= 3 * sd
    assert est.frobenius == pytest.approx(torch.linalg.matrix_norm(h).item(), rel=0.1)


def test_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    # Rademacher probes: vᵀ diag(a) v = Σ a_j v_j² = Σ a_j for every probe, so zero variance.
    a = torch.linspace(-1.0, 3.0, 11, dtype=D)
    est = hutchinson_trace(lambda p: 0.5 * (a * p["w"] ** 2).sum(), {"w": torch.zeros(11, dtype=D)})
    assert est.value == pytest.approx(a.sum().item(), abs=1e-12)
    assert est.stderr == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("estimator", [hutchinson_trace, hutchpp_trace])
def test_stderr_interval_covers_the_exact_trace(estimator: Callable[..., object]) -> None:
    _, loss_fn, params = problem("tanh_mlp")
    exact = exact_hessian(loss_fn, params).trace().item()
    covered = 0
    for seed in range(30):
        est = estimator(loss_fn, params, generator=torch.Generator().manual_seed(100 + seed))
        covered += abs(est.value - exact) <= 1.96 * est.stderr
    assert covered >= 27, covered


def test_hutchpp_has_lower_variance_when_a_few_eigenvalues_dominate() -> None:
    eigenvalues = [50.0, 40.0, 30.0, 20.0] + [0.5] * 56
    loss_fn, params, h = quadratic(eigenvalues)
    exact = h.trace().item()
    plain, sketched = [], []
    for seed in range(30):
        plain.append(hutchinson_trace(loss_fn, params, num_probes=30, generator=_gen(seed)))
        sketched.append(hutchpp_trace(loss_fn, params, num_probes=30, generator=_gen(seed)))
    plain_mse = sum((e.value - exact) ** 2 for e in plain) / 30
    sketched_mse = sum((e.value - exact) ** 2 for e in sketched) / 30
    assert sketched_mse < 0.05 * plain_mse, (sketched_mse, plain_mse)
    assert max(e.stderr for e in sketched) < min(e.stderr for e in plain)


def test_hutchpp_is_exact_when_the_sketch_spans_the_space() -> None:
    loss_fn, params, h = quadratic([3.0, -1.0, 2.0, 0.5, 7.0])
    est = hutchpp_trace(loss_fn, params, num_probes=18)  # sketch of 6 columns in ℝ⁵
    assert est.value == pytest.approx(h.trace().item(), abs=1e-10)
    assert est.num_probes == 6 + 5 + 6


# ---------------------------------------------------------------------------------------------
# Top eigenvalue
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_top_eigenvalue_matches_exact(kind: str) -> None:
    _, loss_fn, params = problem(kind)
    h = exact_hessian(loss_fn, params)
    exact = torch.linalg.eigvalsh(h)[-1].item()
    eig = top_eigenvalue(loss_fn, params)
    assert eig.converged, eig
    assert eig.value == pytest.approx(exact, rel=0.01)
    x = torch.cat([eig.vector[k].reshape(-1) for k in params])
    assert x.norm().item() == pytest.approx(1.0)
    assert (x @ h @ x).item() == pytest.approx(eig.value, rel=1e-6)
    assert (h @ x - eig.value * x).norm().item() == pytest.approx(eig.residual, abs=1e-8)


@pytest.mark.parametrize(
    ("eigenvalues", "top"),
    [([-10.0, 1.0, 2.0, 3.0, 0.5, -4.0], 3.0), ([-5.0, -3.0, -1.0, -2.0], -1.0)],
)
def test_top_eigenvalue_is_the_largest_algebraic_one(eigenvalues: list[float], top: float) -> None:
    loss_fn, params, _ = quadratic(eigenvalues)
    eig = top_eigenvalue(loss_fn, params)
    assert eig.converged
    assert eig.value == pytest.approx(top, rel=1e-6)


def test_warm_start_converges_in_fewer_iterations() -> None:
    _, loss_fn, params = problem("layernorm_gelu")
    previous = top_eigenvalue(loss_fn, params, max_iter=60, tol=1e-6)
    moved = {
        k: p + 1e-3 * torch.randn(p.shape, dtype=D, generator=_gen(7)) for k, p in params.items()
    }
    exact = torch.linalg.eigvalsh(exact_hessian(loss_fn, moved))[-1].item()
    cold = top_eigenvalue(loss_fn, moved, max_iter=60)
    warm = top_eigenvalue(loss_fn, moved, max_iter=60, init=previous.vector)
    assert cold.converged and warm.converged
    assert warm.value == pytest.approx(exact, rel=0.01)
    assert cold.value == pytest.approx(exact, rel=0.01)
    assert warm.iterations < cold.iterations, (warm.iterations, cold.iterations)


def test_unconverged_lanczos_says_so() -> None:
    loss_fn, params, _ = quadratic([float(i) for i in range(1, 41)])
    eig = top_eigenvalue(loss_fn, params, max_iter=3, tol=1e-12)
    assert not eig.converged
    assert eig.iterations == 3


def test_preconditioned_sharpness_equals_explicit_matrix() -> None:
    _, loss_fn, params = problem("tanh_mlp")
    h = exact_hessian(loss_fn, params)
    p = {k: 0.1 + torch.rand(v.shape, dtype=D, generator=_gen(3)) for k, v in params.items()}
    d = torch.cat([v.reshape(-1) for v in p.values()]).rsqrt()
    exact = torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1].item()
    eig = top_eigenvalue(loss_fn, params, preconditioner=p, tol=1e-6, max_iter=60)
    assert eig.converged
    assert eig.value == pytest.approx(exact, rel=1e-6)
    # λ(P⁻¹H) = λ(P^{-1/2} H P^{-1/2}); the plain top eigenvalue differs.
    assert abs(eig.value - torch.linalg.eigvalsh(h)[-1].item()) > 0.1 * abs(exact)


@pytest.mark.parametrize(
    ("optimizer_cls", "kwargs"),
    [
        (torch.optim.Adam, {"betas": (0.8, 0.95), "eps": 1e-4}),
        (torch.optim.AdamW, {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}),
        (torch.optim.Adam, {"betas": (0.9, 0.99), "eps": 1e-6, "amsgrad": True}),
    ],
)
def test_adam_preconditioner_matches_hand_computation(optimizer_cls: type, kwargs: dict) -> None:
    model, x, y = make_model("tanh_mlp")
    named = dict(model.named_parameters())
    optimizer = optimizer_cls(model.parameters(), lr=1e-2, **kwargs)
    beta2, eps = kwargs["betas"][1], kwargs["eps"]
    v = {k: torch.zeros_like(p) for k, p in named.items()}
    v_max = {k: torch.zeros_like(p) for k, p in named.items()}
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for k, p in named.items():
            v[k] = beta2 * v[k] + (1 - beta2) * p.grad**2
            v_max[k] = torch.maximum(v_max[k], v[k])
        optimizer.step()
    second = v_max if kwargs.get("amsgrad") else v
    got = adam_preconditioner(optimizer, named)
    for k in named:
        expected = (second[k] / (1 - beta2**3)).sqrt() + eps
        torch.testing.assert_close(got[k], expected, rtol=1e-12, atol=0)

    # And the preconditioned sharpness built from it matches the explicit matrix.
    params = {k: p.detach() for k, p in named.items()}

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    d = torch.cat([got[k].reshape(-1) for k in named]).rsqrt()
    h = exact_hessian(loss_fn, params)
    exact = torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1].item()
    eig = top_eigenvalue(loss_fn, params, preconditioner=got, max_iter=60, tol=1e-8)
    assert eig.value == pytest.approx(exact, rel=1e-6)


def test_adam_preconditioner_needs_a_step_and_the_optimizers_own_tensors() -> None:
    model, _, _ = make_model("tanh_mlp")
    named = dict(model.named_parameters())
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="at least one optimizer step"):
        adam_preconditioner(optimizer, named)
    with pytest.raises(ValueError, match="not one of the optimizer's parameters"):
        adam_preconditioner(optimizer, {k: p.detach().clone() for k, p in named.items()})


# ---------------------------------------------------------------------------------------------
# Fallback between routes
# ---------------------------------------------------------------------------------------------


class _CubeGrad(torch.autograd.Function):
    """3x²·g with a forward-AD rule but no backward: like CPU flash attention's backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, g: Tensor) -> Tensor:
        return 3 * x * x * g

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, tx: Tensor | None, tg: Tensor | None) -> Tensor:
        x, g = ctx.saved_tensors
        out = torch.zeros_like(x)
        if tx is not None:
            out = out + 6 * x * g * tx
        if tg is not None:
            out = out + 3 * x * x * tg
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError("derivative for _CubeGrad is not implemented")


class _Cube(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, tx: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * tx

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _CubeGrad.apply(x, g)


class _LegacyCubeGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor) -> Tensor:
        return 3 * x * x * g

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError("derivative for _LegacyCubeGrad is not implemented")


class _LegacyCube(torch.autograd.Function):
    """Old-style Function: torch.func transforms refuse it, and it has no double backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _LegacyCubeGrad.apply(x, g)


class _OnceCube(_Cube):
    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


def cube_problem(cube: Callable[[Tensor], Tensor]) -> tuple[LossFn, dict[str, Tensor]]:
    g = _gen(0)
    x = torch.randn(8, 3, dtype=D, generator=g)
    params = {
        "w": torch.randn(3, 4, dtype=D, generator=g) / 2,
        "v": torch.randn(4, 2, dtype=D, generator=g),
    }
    return (lambda p: (torch.tanh(cube(x @ p["w"])) @ p["v"]).square().mean()), params


def test_auto_falls_back_with_exactly_one_warning() -> None:
    loss_fn, params = cube_problem(_Cube.apply)
    reference, _ = cube_problem(lambda t: t**3)
    h = exact_hessian(reference, params)
    probes = torch.randn(3, h.shape[0], dtype=D, generator=_gen(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = hvp(loss_fn, params, probes)
        est = hutchinson_trace(loss_fn, params, num_probes=10)  # same reason: no second warning
    fallbacks = [w for w in caught if issubclass(w.category, CurvatureFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    message = str(fallbacks[0].message)
    assert "double_backward" in message and "_CubeGrad" in message
    assert "'vmap_forward_over_reverse'" in message
    assert est.route == "vmap_forward_over_reverse"
    torch.testing.assert_close(out, probes @ h, rtol=0, atol=1e-10)


def test_an_explicit_route_does_not_fall_back() -> None:
    loss_fn, params = cube_problem(_Cube.apply)
    reference, _ = cube_problem(lambda t: t**3)
    v = torch.ones(20, dtype=D)
    with pytest.raises(CurvatureError, match="double_backward: RuntimeError: derivative for _Cube"):
        hvp(loss_fn, params, v, route="double_backward")
    with pytest.raises(CurvatureError, match="route='auto' falls back"):
        hvp(loss_fn, params, v, route="double_backward")
    expected = exact_hessian(reference, params) @ v
    for route in ("forward_over_reverse", "vmap_forward_over_reverse"):
        out = hvp(loss_fn, params, v, route=route)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_clear_error_when_no_route_works() -> None:
    loss_fn, params = cube_problem(_LegacyCube.apply)
    with pytest.raises(CurvatureError, match="no Hessian-vector-product route works") as info:
        hutchinson_trace(loss_fn, params, num_probes=4)
    message = str(info.value)
    for route in ROUTES:
        assert f"{route}: " in message
    assert "_LegacyCubeGrad is not implemented" in message
    assert "setup_context" in message


@pytest.mark.parametrize("route", ["auto", *ROUTES])
def test_once_differentiable_functions_are_refused_not_silently_zero(route: str) -> None:
    # torch.func would return zero second derivatives through it without complaint.
    loss_fn, params = cube_problem(_OnceCube.apply)
    with pytest.raises(CurvatureError, match=r"_OnceCube.*once_differentiable"):
        hvp(loss_fn, params, torch.ones(20, dtype=D), route=route)


# ---------------------------------------------------------------------------------------------
# No observer effect
# ---------------------------------------------------------------------------------------------


def test_estimators_leave_rng_parameters_grads_buffers_and_mode_untouched() -> None:
    model, x, y = make_model("batchnorm")
    model = nn.Sequential(model, nn.Dropout(0.3)).train()
    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for p in named.values():
        p.grad = torch.full_like(p, 0.25)
    before = {k: p.detach().clone() for k, p in named.items()}
    buffers_before = {k: b.clone() for k, b in buffers.items()}

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        copies = {k: b.clone() for k, b in buffers.items()}
        return F.cross_entropy(functional_call(model, (p, copies), (x,)), y)

    rng = torch.get_rng_state()
    for route in ROUTES:
        hutchinson_trace(loss_fn, named, num_probes=4, route=route)
        hutchpp_trace(loss_fn, named, num_probes=6, route=route)
        top_eigenvalue(loss_fn, named, max_iter=3, route=route)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    for k, p in named.items():
        assert torch.equal(p, before[k]) and torch.equal(p.grad, torch.full_like(p, 0.25)), k
    for k, b in buffers.items():
        assert torch.equal(b, buffers_before[k]), k


def test_default_generator_is_seeded_and_an_own_generator_advances() -> None:
    _, loss_fn, params = problem("tanh_mlp")
    first = hutchinson_trace(loss_fn, params, num_probes=5)
    assert hutchinson_trace(loss_fn, params, num_probes=5) == first
    g = _gen(0)
    a = hutchinson_trace(loss_fn, params, num_probes=5, generator=g)
    b = hutchinson_trace(loss_fn, params, num_probes=5, generator=g)
    assert a == first and b.value != a.value


# ---------------------------------------------------------------------------------------------
# Thresholds and validation
# ---------------------------------------------------------------------------------------------


def test_thresholds() -> None:
    assert gd_sharpness_threshold(0.01) == pytest.approx(200.0)
    assert momentum_sharpness_threshold(0.01, 0.9) == pytest.approx(380.0)
    assert momentum_sharpness_threshold(0.01, 0.0) == gd_sharpness_threshold(0.01)
    assert sgd_trace_threshold(0.1) == pytest.approx(20.0)
    assert adam_sharpness_threshold(1.0) == pytest.approx(38.0)
    assert adam_sharpness_threshold(0.5, beta1=0.0) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="learning rate"):
        gd_sharpness_threshold(0.0)
    with pytest.raises(ValueError, match="beta1"):
        adam_sharpness_threshold(1e-3, beta1=1.0)


def test_validation_messages() -> None:
    _, loss_fn, params = problem("tanh_mlp")
    with pytest.raises(ValueError, match=r"scalar .*\.mean\(\)"):
        hvp(lambda p: p["0.weight"], params, torch.ones(51, dtype=D))
    with pytest.raises(ValueError, match="`route`"):
        hvp(loss_fn, params, torch.ones(51, dtype=D), route="reverse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_probes"):
        hutchpp_trace(loss_fn, params, num_probes=2)
    with pytest.raises(ValueError, match="shape"):
        hvp(loss_fn, params, torch.ones(50, dtype=D))
    with pytest.raises(ValueError, match="one dtype and device"):
        hvp(loss_fn, {**params, "x": torch.ones(2)}, torch.ones(53, dtype=D))
    with torch.inference_mode(), pytest.raises(CurvatureError, match="inference_mode"):
        hutchinson_trace(loss_fn, params)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_batched_double_backward_agrees_with_one_probe_at_a_time():
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p):
        return (functional_call(model, p, (x,)) - y).square().mean()

    probes = torch.randn(5, sum(p.numel() for p in params.values()), generator=gen)
    batched = HessianOperator(loss_fn, params, route="batched_double_backward")
    looped = HessianOperator(loss_fn, params, route="double_backward")
    torch.testing.assert_close(batched @ probes, looped @ probes)
    assert batched._vectorisable  # it did run vectorised
    estimate = hutchinson_trace(
        loss_fn,
        params,
        num_probes=8,
        generator=torch.Generator().manual_seed(0),
        route="batched_double_backward",
    )
    reference = hutchinson_trace(
        loss_fn,
        params,
        num_probes=8,
        generator=torch.Generator().manual_seed(0),
        route="double_backward",
    )
    assert estimate.value == pytest.approx(reference.value, rel=1e-5)


class _HostRead(torch.autograd.Function):
    """Identity whose backward reads a value on the host, which vmap cannot vectorise."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        float(g.abs().max())
        return g


class _HostReadCube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _HostRead.apply(g * 3 * x**2)  # lands in the gradient's own graph


def test_batched_double_backward_runs_probe_by_probe_where_vmap_cannot():
    w = torch.tensor([1.0, 2.0, -1.0])

    def loss_fn(p):
        return _HostReadCube.apply(p["w"]).sum()

    op = HessianOperator(loss_fn, {"w": w}, route="batched_double_backward")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessian = op @ torch.eye(3)
    assert not op._vectorisable
    torch.testing.assert_close(hessian, torch.diag(6 * w))
