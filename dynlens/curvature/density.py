"""Stochastic Lanczos quadrature: the spectral density of H, smoothed and as histogram buckets."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .lanczos import _Lanczos, _lanczos
from .memory import MemoryLimit
from .operator import HessianOperator, LossFn, Route
from .trace import _generator, _rademacher


@dataclass(frozen=True, eq=False)
class SpectralDensity:
    """The eigenvalue density of H by stochastic Lanczos quadrature, from :func:`spectral_density`.

    Tensors are float64 on the CPU. φ(t) = (1/n) Σ_i δ(t − λ_i) is the spectral density of H
    (n = ``num_params``); the quadrature approximates it by point masses w_j at nodes λ_j.

    Attributes:
        nodes: the Ritz values of every run, pooled, ascending.
        weights: their weights: each run's divided by the number of runs, so they sum to 1.
        run_nodes: per run, the eigenvalues of its tridiagonal T, ascending (fewer than
            ``num_iter`` where its Krylov space became invariant: those are exact eigenvalues).
        run_weights: per run, the squared first components of T's eigenvectors (each sums to 1).
        grid: the points ``density`` is given at, ascending.
        density: the smoothed density φ_σ(t) = Σ_j w_j N(t; λ_j, σ²) at ``grid``: it integrates
            to 1 over the line, so to 1 over a grid that spans the nodes with a few σ to spare.
        sigma: σ, the standard deviation of the Gaussian each node is smoothed with.
        top_eigenvalues: descending; entry i is the largest, over the runs, of each run's
            (i+1)-th largest Ritz value. By Cauchy interlacing a run's i-th largest Ritz value is
            at most λ_i, so this is the best lower estimate the runs give. A repeated eigenvalue
            appears once (a Krylov space holds one copy).
        top_residuals: ‖A x − θ x‖ of the Ritz pair behind each top eigenvalue: an eigenvalue
            of H lies within it of the value.
        num_products: Hessian-vector products spent (``num_runs`` × ``num_iter`` at most).
        num_params: n.
        route: the Hessian-vector-product route used.
        product_error: as :attr:`Estimate.product_error`.
    """

    nodes: Tensor
    weights: Tensor
    run_nodes: tuple[Tensor, ...]
    run_weights: tuple[Tensor, ...]
    grid: Tensor
    density: Tensor
    sigma: float
    top_eigenvalues: Tensor
    top_residuals: Tensor
    num_products: int
    num_params: int
    route: str | None = None
    product_error: float | None = None

    def moment(self, k: int) -> float:
        """Σ_j w_j λ_j^k, the estimate of tr(H^k)/n (unbiased for k ≤ 2·``num_iter`` − 1)."""
        return (self.weights * self.nodes**k).sum().item()


def spectral_density(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    *,
    num_runs: int = 1,
    num_iter: int = 50,
    grid: int | Tensor = 1000,
    sigma: float | None = None,
    top_k: int = 5,
    generator: torch.Generator | None = None,
    route: Route = "auto",
    memory: MemoryLimit | None = None,
) -> SpectralDensity:
    """The eigenvalue density of H by stochastic Lanczos quadrature (SLQ), with its top eigenvalues.

    Lin, L., Saad, Y., & Yang, C. (2016). *Approximating spectral densities of large matrices.*
    SIAM Review. Ghorbani, B., Krishnan, S., & Xiao, Y. (2019). *An Investigation into Neural Net
    Optimization via Hessian Eigenvalue Density.* ICML (PyHessian's ``density()`` follows them).

    Each of the R = ``num_runs`` runs draws a Rademacher vector v (entries ±1) and runs m =
    ``num_iter`` Lanczos steps (full reorthogonalisation, as :func:`top_eigenvalue`) from
    q = v/√n. With T = V diag(θ) Vᵀ the eigendecomposition of the m × m tridiagonal T, the nodes
    θ_j and weights τ_j = V_1j² are the m-point Gauss quadrature of the measure qᵀ δ(t − H) q:

        Σ_j τ_j θ_j^k = qᵀ H^k q = vᵀ H^k v / n      exactly, for k ≤ 2m − 1
        E[vᵀ H^k v] / n = tr(H^k) / n                 (Hutchinson)

    so the pooled quadrature, weights τ_j / R, matches the moments of the spectral density
    φ(t) = (1/n) Σ_i δ(t − λ_i) up to order 2m − 1 without bias (:meth:`SpectralDensity.moment`).
    Its standard error shrinks like 1/√(R·n) for a spread-out spectrum, which is why one run is
    the usual choice for a network's Hessian. Smoothed with a Gaussian of standard deviation σ:

        φ_σ(t) = (1/R) Σ_runs Σ_j τ_j N(t; θ_j, σ²)

    The extreme Ritz values converge first: the largest are estimates of the top eigenvalues
    (from below), an outlier far above the bulk to many digits within a few steps.

    Cost: at most R·m Hessian-vector products (fewer when a Krylov space becomes invariant), all
    through one gradient graph; memory for m vectors of n entries (one run at a time).

    Args:
        num_runs: R, start vectors (independent quadratures, pooled).
        num_iter: m, Lanczos steps (Hessian-vector products) per run.
        grid: the number of points of an even grid from the smallest node − 5σ to the largest
            + 5σ, or the points themselves (a 1-D tensor).
        sigma: σ. ``None``: 1% of the nodes' span (or of their largest magnitude, or 1, where
            that is 0).
        top_k: how many top eigenvalues to give (fewer where no run has that many nodes).
        generator: source of the start vectors, as in :func:`hutchinson_trace`.
        route: Hessian-vector-product route, see :class:`HessianOperator`.
        memory: a :class:`MemoryLimit`, as in :func:`top_eigenvalue`: a run whose next product
            no longer fits ends there (its quadrature has fewer nodes).

    Example (H = diag(1, 1, 2, 2, 3, 10): four distinct eigenvalues, so each run's Krylov space is
    invariant after four steps; nodes are the eigenvalues and, for a diagonal H and a Rademacher
    start, weights their multiplicity / n exactly):
        >>> import torch
        >>> from dynlens.curvature import spectral_density
        >>> a = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 10.0], dtype=torch.float64)
        >>> loss_fn = lambda p: 0.5 * (a * p["w"] ** 2).sum()
        >>> sd = spectral_density(loss_fn, {"w": torch.zeros(6, dtype=torch.float64)}, num_iter=10)
        >>> [round(x, 6) for x in sd.nodes.tolist()], [round(x, 4) for x in sd.weights.tolist()]
        ([1.0, 2.0, 3.0, 10.0], [0.3333, 0.3333, 0.1667, 0.1667])
        >>> sd.num_products, round(sd.top_eigenvalues[0].item(), 6), round(sd.moment(1), 6)
        (4, 10.0, 3.166667)
    """
    for arg, value in (("num_runs", num_runs), ("num_iter", num_iter), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Expected `{arg}` to be a positive int, got {value!r}")
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"Expected `sigma` to be a positive number or None, got {sigma!r}")
    if isinstance(grid, Tensor):
        if grid.ndim != 1 or grid.numel() < 2 or not bool(torch.isfinite(grid).all()):
            raise ValueError("Expected `grid` to be a 1-D tensor of at least 2 finite points")
    elif not isinstance(grid, int) or isinstance(grid, bool) or grid < 2:
        raise ValueError(f"Expected `grid` to be an int >= 2 or a 1-D tensor, got {grid!r}")
    op = HessianOperator(loss_fn, params, route=route, memory=memory)
    generator = _generator(generator, op.device)
    eps = torch.finfo(op.dtype).eps
    runs = []
    for _ in range(num_runs):
        q = _rademacher(1, op.numel, generator, op)[0] / math.sqrt(op.numel)
        runs.append(_lanczos(op.matmul, q, num_iter, numel=op.numel, eps=eps))
    run_weights = tuple(run.evecs[0] ** 2 for run in runs)
    nodes = torch.cat([run.evals for run in runs])
    nodes, order = nodes.sort()
    weights = (torch.cat(run_weights) / num_runs)[order]
    if sigma is None:
        sigma = _default_sigma(nodes)
    if isinstance(grid, Tensor):
        points = grid.detach().to(device="cpu", dtype=torch.float64).sort().values
    else:
        points = torch.linspace(
            nodes[0].item() - 5 * sigma, nodes[-1].item() + 5 * sigma, grid, dtype=torch.float64
        )
    density = smoothed_density(nodes, weights, points, sigma)
    top, residuals = _top_ritz(runs, top_k)
    return SpectralDensity(
        nodes=nodes,
        weights=weights,
        run_nodes=tuple(run.evals for run in runs),
        run_weights=run_weights,
        grid=points,
        density=density,
        sigma=float(sigma),
        top_eigenvalues=top,
        top_residuals=residuals,
        num_products=sum(len(run.alphas) for run in runs),
        num_params=op.numel,
        route=op.route,
        product_error=op.finite_difference_error,
    )


def smoothed_density(nodes: Tensor, weights: Tensor, points: Tensor, sigma: float) -> Tensor:
    """φ_σ(t) = Σ_j w_j N(t; λ_j, σ²) at ``points``: point masses smoothed by a Gaussian.

    The curve :func:`spectral_density` returns (Lin, Saad & Yang 2016, §3; Ghorbani, Krishnan &
    Xiao 2019 plot it on a log scale, σ about 1% of the spectrum's span); with weights summing to
    1 it integrates to 1. All in float64 on the CPU.

        >>> import torch
        >>> one, zero = torch.tensor([1.0]), torch.tensor([0.0])
        >>> round(smoothed_density(zero, one, zero, 1.0).item(), 6)  # 1/√(2π)
        0.398942
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"Expected `sigma` to be a positive number, got {sigma!r}")
    x = nodes.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    w = weights.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    t = points.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    z = (t[:, None] - x[None, :]) / sigma
    return torch.exp(-0.5 * z**2) @ w / (sigma * math.sqrt(2 * math.pi))


def spectrum_histogram(nodes: Tensor, weights: Tensor, num_params: int) -> tuple[Tensor, Tensor]:
    """Histogram buckets that show a quadrature's point masses, counts summing to ``num_params``.

    Stochastic Lanczos quadrature (:func:`spectral_density`) approximates the spectral density
    φ(t) = (1/n) Σ_i δ(t − λ_i) by point masses w_j at nodes λ_j (Ghorbani, Krishnan & Xiao 2019
    plot them smoothed). Scaled by n, n·w_j estimates *how many* of H's n eigenvalues lie near
    λ_j, so a histogram of counts n·w_j sums to n, as a histogram of the exact eigenvalues would.

    Each distinct node x_j gets a narrow bucket (x_j − δ, x_j] holding n·Σw of the nodes merged
    into it, and the gaps between nodes get empty buckets, so a viewer that re-bins (TensorBoard's
    Histograms tab) puts each mass where its node is. Nodes closer than 10⁻⁶·s are merged (s the
    larger of the nodes' span and largest magnitude; 1 where both are 0), at their weighted mean;
    δ = min(10⁻³·s, half the smallest gap), wider than float32's resolution at every node, as
    TensorBoard keeps bucket edges in float32.

    Args:
        nodes: the nodes, any order (e.g. :attr:`SpectralDensity.nodes`).
        weights: their non-negative weights, summing to 1 (:attr:`SpectralDensity.weights`).
        num_params: n, what the counts sum to.

    Returns:
        ``(edges, counts)``, float64 on the CPU: ``2k`` ascending edges and ``2k − 1`` counts for
        k distinct nodes; bucket i is (edges[i], edges[i + 1]]; ``edges[0]`` is the histogram's
        min and ``edges[-1]`` its max, the largest node.

    Example (masses 1/3 at 1 and 2/3 at 3, n = 6):
        >>> import torch
        >>> edges, counts = spectrum_histogram(torch.tensor([3.0, 1.0]),
        ...                                    torch.tensor([2 / 3, 1 / 3]), 6)
        >>> [round(e, 3) for e in edges.tolist()], [round(c, 6) for c in counts.tolist()]
        ([0.997, 1.0, 2.997, 3.0], [2.0, 0.0, 4.0])
    """
    x = nodes.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    w = weights.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if x.numel() == 0 or x.shape != w.shape:
        raise ValueError(
            f"Expected as many weights as nodes, at least one, got {x.numel()} and {w.numel()}"
        )
    x, order = x.sort()
    w = w[order]
    scale = max((x[-1] - x[0]).item(), x.abs().max().item()) or 1.0
    # groups of nodes within 1e-6·s of their neighbour: one bucket each
    group = torch.cat([torch.zeros(1, dtype=torch.long), (x.diff() > 1e-6 * scale).cumsum(0)])
    k = int(group[-1]) + 1
    mass = torch.zeros(k, dtype=torch.float64).index_add_(0, group, w)
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, group, torch.ones_like(w))
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, group, w * x)
    plain = torch.zeros(k, dtype=torch.float64).index_add_(0, group, x) / count
    at = torch.where(mass > 0, mean / mass.clamp_min(torch.finfo(torch.float64).tiny), plain)
    delta = 1e-3 * scale
    if k > 1:
        delta = min(delta, 0.5 * at.diff().min().item())
    edges = torch.stack([at - delta, at], dim=1).reshape(-1)
    counts = torch.stack([mass * num_params, torch.zeros(k, dtype=torch.float64)], dim=1)
    return edges, counts.reshape(-1)[:-1]


def _default_sigma(nodes: Tensor) -> float:
    span = (nodes[-1] - nodes[0]).item()
    return 0.01 * (span or nodes.abs().max().item() or 1.0)


def _top_ritz(runs: list[_Lanczos], top_k: int) -> tuple[Tensor, Tensor]:
    """Entry i: the largest over runs of each run's (i+1)-th largest Ritz value, its residual."""
    top, residuals = [], []
    for i in range(min(top_k, max(len(run.alphas) for run in runs))):
        candidates = [
            (run.evals[-1 - i].item(), abs(run.beta * run.evecs[-1, -1 - i].item()))
            for run in runs
            if len(run.alphas) > i
        ]
        value, residual = max(candidates)
        top.append(value)
        residuals.append(residual)
    return torch.tensor(top, dtype=torch.float64), torch.tensor(residuals, dtype=torch.float64)
