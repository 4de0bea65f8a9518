"""Per-block Hessian traces and the spectral density (SLQ) against exact Hessians and spectra."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dynlens.curvature import (
    HessianOperator,
    hutchinson_trace,
    parameter_blocks,
    spectral_density,
)
from dynlens.curvature.trace import _rademacher

D = torch.float64
LossFn = Callable[[dict[str, Tensor]], Tensor]


class Net(nn.Module):
    """66 parameters: a top-level layer, a ModuleList of two, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h)


def net_problem() -> tuple[LossFn, dict[str, Tensor]]:
    torch.manual_seed(0)
    model = Net().to(D)
    x, y = torch.randn(12, 3, dtype=D), torch.randint(0, 2, (12,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    return (lambda p: F.cross_entropy(functional_call(model, p, (x,)), y)), params


def dense_hessian(loss_fn: LossFn, params: dict[str, Tensor]) -> Tensor:
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def flat_loss(theta: Tensor) -> Tensor:
        pieces = theta.split(sizes)
        return loss_fn({k: t.reshape(s) for k, t, s in zip(params, pieces, shapes, strict=True)})

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    return torch.autograd.functional.hessian(flat_loss, flat)


def block_mask(params: dict[str, Tensor], members: list[str]) -> Tensor:
    return torch.cat([torch.full((p.numel(),), k in members, dtype=D) for k, p in params.items()])


def rademacher_quadratic_sd(m: Tensor) -> float:
    """Exact standard deviation of vᵀMv, M symmetric, v Rademacher: √(2(‖M‖²_F − Σ M_ii²))."""
    return math.sqrt(2 * (m.square().sum() - m.diagonal().square().sum()).item())


# --- per-block traces ------------------------------------------------------------------------


def test_block_traces_match_the_exact_diagonal_blocks_within_their_standard_errors():
    loss_fn, params = net_problem()
    h = dense_hessian(loss_fn, params)
    m = 300
    est = hutchinson_trace(loss_fn, params, num_probes=m, blocks="layer")
    assert list(est.blocks) == ["embed", "blocks.0", "blocks.1", "head"]
    for name, members in parameter_blocks(params, "layer").items():
        e = torch.diag(block_mask(params, members))
        exact = (e @ h).trace().item()
        # One term is vᵀ E_b H v = vᵀ M v with M = (E_b H + H E_b)/2: its exact spread.
        exact_stderr = rademacher_quadratic_sd((e @ h + h @ e) / 2) / math.sqrt(m)
        block = est.blocks[name]
        assert abs(block.value - exact) <= 3 * exact_stderr, (name, block.value, exact)
        assert block.stderr == pytest.approx(exact_stderr, rel=0.25), name
        assert block.num_probes == m and block.blocks is None and block.route == est.route


def test_block_traces_sum_to_the_total_and_leave_the_total_as_it_was():
    loss_fn, params = net_problem()
    plain = hutchinson_trace(loss_fn, params, num_probes=20)
    for rule in ("module", "layer", "tensor"):
        est = hutchinson_trace(loss_fn, params, num_probes=20, blocks=rule)
        assert sum(b.value for b in est.blocks.values()) == pytest.approx(est.value, rel=1e-12)
        # Same probes, same products: asking for blocks does not move the total by a bit.
        assert (est.value, est.stderr, est.frobenius) == (
            plain.value,
            plain.stderr,
            plain.frobenius,
        )
    assert plain.blocks is None


def test_a_diagonal_hessian_gives_every_block_exactly_whatever_the_parameter_order():
    # Parameters neither sorted nor alike in shape: a wrong split of the flat vector shows.
    d = {
        "z": torch.tensor([[1.0, 2, 3], [4, 5, 6]], dtype=D),
        "a": torch.tensor([7.0, 8, 9, 10], dtype=D),
    }
    d["m"] = torch.tensor([11.0], dtype=D)
    params = {k: torch.zeros_like(v) for k, v in d.items()}

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return 0.5 * sum((d[k] * p[k].square()).sum() for k in d)

    est = hutchinson_trace(loss_fn, params, num_probes=5, blocks={"pair": ["m", "z"]})
    assert parameter_blocks(params, {"pair": ["m", "z"]}) == {"pair": ["z", "m"], "other": ["a"]}
    assert est.blocks["pair"].value == pytest.approx(21.0 + 11.0, abs=1e-12)
    assert est.blocks["other"].value == pytest.approx(34.0, abs=1e-12)
    assert est.blocks["pair"].stderr == 0.0 and est.value == pytest.approx(66.0, abs=1e-12)
    tensors = hutchinson_trace(loss_fn, params, num_probes=5, blocks="tensor").blocks
    assert {k: round(b.value, 9) for k, b in tensors.items()} == {"z": 21.0, "a": 34.0, "m": 11.0}


def test_rules_name_the_blocks_a_user_expects():
    _, params = net_problem()
    assert parameter_blocks(params, "module") == {
        "embed": ["embed.weight", "embed.bias"],
        "blocks": ["blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias"],
        "head": ["head.weight", "head.bias"],
    }
    assert list(parameter_blocks(params, "layer")) == ["embed", "blocks.0", "blocks.1", "head"]
    assert list(parameter_blocks(params, "tensor")) == list(params)
    nested = ["encoder.layers.3.ffn.weight", "encoder.norm.weight", "0.weight", "lm_head.weight"]
    assert list(parameter_blocks(nested, "layer")) == [
        "encoder.layers.3",
        "encoder",
        "0",
        "lm_head",
    ]
    assert list(parameter_blocks(nested, "module")) == ["encoder", "0", "lm_head"]
    assert parameter_blocks(["a", "b"], {"x": ["b"], "y": ["a"]}) == {"x": ["b"], "y": ["a"]}


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ("layers", "Expected `blocks` to be one of"),
        (["a"], "Expected `blocks` to be one of"),
        ({"x": ["a", "nope"]}, "names 'nope', which is not a parameter"),
        ({"x": ["a"], "y": ["b", "a"]}, "'a' is in block 'x' and in block 'y'"),
        ({"x": []}, "Block 'x' is empty"),
        ({"x": "a"}, r"write \{'x': \['a'\]\}"),
        ({"other": ["a"]}, r"Parameters \['b'\] are in no block"),
    ],
)
def test_bad_blocks_raise_before_any_product(blocks, message):
    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        raise AssertionError("no product may be computed for a bad `blocks`")

    params = {"a": torch.zeros(2, dtype=D), "b": torch.zeros(3, dtype=D)}
    with pytest.raises(ValueError, match=message):
        hutchinson_trace(loss_fn, params, num_probes=2, blocks=blocks)


# --- spectral density ------------------------------------------------------------------------


def known_spectrum(seed: int = 0) -> tuple[Tensor, Tensor]:
    """A = Q diag(λ) Qᵀ: a bulk of 40 eigenvalues evenly in [0, 1] and one outlier at 10."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(41, 41, generator=g, dtype=D))
    eigenvalues = torch.cat([torch.linspace(0, 1, 40, dtype=D), torch.tensor([10.0], dtype=D)])
    return q @ torch.diag(eigenvalues) @ q.T, eigenvalues


def quadratic(a: Tensor) -> tuple[LossFn, dict[str, Tensor]]:
    return (lambda p: 0.5 * p["w"] @ a @ p["w"]), {"w": torch.zeros(a.shape[0], dtype=D)}


RUNS = 200  # the outlier's weight (uᵀv)²/n varies most: 200 runs put the moments within 10%


@pytest.fixture(scope="module")
def bulk_and_outlier():
    a, eigenvalues = known_spectrum()
    return a, eigenvalues, spectral_density(*quadratic(a), num_runs=RUNS, num_iter=8, top_k=3)


def test_pooled_moments_match_the_spectrum_within_the_runs_sampling_error(bulk_and_outlier):
    a, eigenvalues, sd = bulk_and_outlier
    n, runs = a.shape[0], RUNS
    assert sd.num_products == runs * 8 and sd.num_params == n
    assert all(
        len(w) == 8 and float(w.sum()) == pytest.approx(1.0, abs=1e-12) for w in sd.run_weights
    )
    assert float(sd.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool((sd.nodes[1:] >= sd.nodes[:-1]).all())
    for k in (1, 2, 3):
        exact = (eigenvalues**k).sum().item() / n
        # Each run's moment is vᵀA^k v / n exactly (k ≤ 15): its exact spread over Rademacher v.
        stderr = rademacher_quadratic_sd(torch.linalg.matrix_power(a, k)) / n / math.sqrt(runs)
        assert abs(sd.moment(k) - exact) <= 4 * stderr, (k, sd.moment(k), exact, stderr)
        assert stderr < 0.1 * exact  # the check has teeth: the tolerance is well below the value


def test_each_run_is_a_gauss_quadrature_exact_to_order_2m_minus_1():
    a, _ = known_spectrum(seed=1)
    loss_fn, params = quadratic(a)
    m, runs = 5, 3
    sd = spectral_density(
        loss_fn, params, num_runs=runs, num_iter=m, generator=torch.Generator().manual_seed(7)
    )
    # The start vectors, drawn as spectral_density draws them.
    g, op = torch.Generator().manual_seed(7), HessianOperator(loss_fn, params)
    for nodes, weights in zip(sd.run_nodes, sd.run_weights, strict=True):
        q = _rademacher(1, op.numel, g, op)[0] / math.sqrt(op.numel)
        for k in range(2 * m):
            exact = (q @ torch.linalg.matrix_power(a, k) @ q).item()
            assert (weights * nodes**k).sum().item() == pytest.approx(exact, rel=1e-8), k


def test_the_outlier_is_the_top_ritz_value_and_the_density_holds_its_mass(bulk_and_outlier):
    a, _, sd = bulk_and_outlier
    n, runs = a.shape[0], RUNS
    assert sd.top_eigenvalues[0].item() == pytest.approx(10.0, abs=1e-8)
    assert sd.top_residuals[0].item() < 1e-6
    # Cauchy interlacing: the next Ritz values stay below the bulk's edge λ_2 = 1.
    assert bool((sd.top_eigenvalues[1:] <= 1 + 1e-9).all()) and len(sd.top_eigenvalues) == 3
    # Each top value is the best (largest) of the runs' Ritz values of that rank.
    best = [max(nodes[-1 - i].item() for nodes in sd.run_nodes) for i in range(3)]
    assert sd.top_eigenvalues.tolist() == best
    assert torch.trapezoid(sd.density, sd.grid).item() == pytest.approx(1.0, abs=1e-4)
    far = sd.grid > 5
    outlier_weight = sd.weights[sd.nodes > 5].sum().item()
    assert torch.trapezoid(sd.density[far], sd.grid[far]).item() == pytest.approx(
        outlier_weight, abs=1e-6
    )
    # Its weight is (uᵀv)²/n per run, mean 1/n and variance at most 2/n² over Rademacher v.
    assert outlier_weight == pytest.approx(1 / n, abs=4 * math.sqrt(2) / n / math.sqrt(runs))


def test_an_invariant_krylov_space_ends_each_run_with_the_exact_eigenvalues():
    # Diagonal H, three distinct eigenvalues (one negative): three steps per run, exact nodes,
    # and for a Rademacher start the weights are the multiplicities / n exactly.
    a = torch.tensor([-1.0] * 3 + [0.5] * 2 + [4.0] * 5, dtype=D)

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return 0.5 * (a * p["w"].square()).sum()

    params = {"w": torch.zeros(10, dtype=D)}
    sd = spectral_density(loss_fn, params, num_runs=2, num_iter=8)
    assert sd.num_products == 6
    for nodes, weights in zip(sd.run_nodes, sd.run_weights, strict=True):
        assert nodes.tolist() == pytest.approx([-1.0, 0.5, 4.0], abs=1e-12)
        assert weights.tolist() == pytest.approx([0.3, 0.2, 0.5], abs=1e-12)
    assert sd.top_eigenvalues.tolist() == pytest.approx([4.0, 0.5, -1.0], abs=1e-12)
    # An isolated node on a given grid with a given σ: its weight times the Gaussian's peak.
    at = spectral_density(loss_fn, params, num_iter=8, grid=torch.tensor([4.0, 9.0]), sigma=0.01)
    assert at.density.tolist() == pytest.approx([0.5 / (0.01 * math.sqrt(2 * math.pi)), 0.0])
    again = spectral_density(loss_fn, params, num_iter=8, grid=torch.tensor([4.0, 9.0]), sigma=0.01)
    assert torch.equal(at.nodes, again.nodes) and torch.equal(at.weights, again.weights)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_runs": 0}, "`num_runs` to be a positive int"),
        ({"num_iter": 0}, "`num_iter` to be a positive int"),
        ({"top_k": 0}, "`top_k` to be a positive int"),
        ({"sigma": 0.0}, "`sigma` to be a positive number"),
        ({"grid": 1}, "`grid` to be an int >= 2"),
        ({"grid": torch.zeros(2, 2)}, "`grid` to be a 1-D tensor"),
    ],
)
def test_bad_density_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spectral_density(*quadratic(torch.eye(3, dtype=D)), **kwargs)
