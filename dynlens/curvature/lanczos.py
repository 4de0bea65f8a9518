"""Lanczos: the top eigenvalue (sharpness) of H, optionally preconditioned.

The iteration itself (:func:`_lanczos`, full reorthogonalisation) is shared with the spectral
density of :mod:`.density`, which runs it from random start vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import CurvatureMemoryError
from .memory import MemoryLimit
from .operator import HessianOperator, LossFn, Route
from .trace import _generator, _rademacher


@dataclass(frozen=True)
class Eigen:
    """An eigenpair from :func:`top_eigenvalue`.

    Attributes:
        value: the Ritz value, the estimate of λ_max.
        vector: the unit-norm Ritz vector as a dict shaped like ``params`` (norm taken over all
            entries together). With a preconditioner it is the eigenvector of P^{-1/2} H P^{-1/2}.
            Pass it back as ``init=`` to warm-start the next call.
        converged: whether the residual ‖A x − λ x‖ fell to ``tol · |λ|`` within ``max_iter``.
        iterations: Hessian-vector products spent (one per Lanczos step).
        residual: the final residual ‖A x − λ x‖ of the returned pair.
        route: the Hessian-vector-product route used.
        product_error: as :attr:`Estimate.product_error`.
    """

    value: float
    vector: dict[str, Tensor] = field(compare=False, repr=False)
    converged: bool
    iterations: int = 0
    residual: float = math.nan
    route: str | None = None
    product_error: float | None = None


def top_eigenvalue(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    *,
    init: Mapping[str, Tensor] | Tensor | None = None,
    max_iter: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    preconditioner: Mapping[str, Tensor] | None = None,
    route: Route = "auto",
    memory: MemoryLimit | None = None,
) -> Eigen:
    """Largest algebraic eigenvalue λ_max of H (sharpness) by Lanczos, optionally preconditioned.

    Lanczos, C. (1950), with full reorthogonalisation (Golub & Van Loan, *Matrix Computations*,
    §10.1). Cohen et al. (2021), *Gradient Descent on Neural Networks Typically Occurs at the Edge
    of Stability*, track sharpness with Lanczos the same way.

    After j steps the Krylov basis Q_j = [q_1 … q_j] gives the tridiagonal T_j = Q_jᵀ A Q_j; its
    largest eigenpair (θ, s) gives the Ritz pair (θ, x = Q_j s) whose residual is exactly
    ‖A x − θ x‖ = |β_{j+1} s_j|. The iteration stops when that is ≤ ``tol`` · |θ| (``converged``)
    or after ``max_iter`` products. Eigenvalue error ≤ residual (and ≈ residual²/gap). Lanczos
    converges to both ends of the spectrum, so a large negative eigenvalue does not mislead it as it
    does power iteration; it stores ``max_iter`` vectors of n entries.

    Warm start: pass the previous call's ``Eigen.vector`` as ``init``. When the top eigenvector has
    moved little, the first residual is already small and few products are needed. A residual test
    cannot tell that a *different* eigenvalue has overtaken the one ``init`` points at, so cold
    start (``init=None``) now and then when tracking over long runs.

    Preconditioned sharpness (Cohen et al. 2022, *Adaptive Gradient Methods at the Edge of
    Stability*): with ``preconditioner`` P (a dict of positive diagonals shaped like ``params``,
    e.g. from :func:`adam_preconditioner`), the operator is A = P^{-1/2} H P^{-1/2}, which has the
    same eigenvalues as P⁻¹H; ``vector`` is then the eigenvector u of A (P^{-1/2}u is that of P⁻¹H).

    Args:
        init: start vector (dict shaped like ``params`` or flat ``(n,)``); ``None`` draws a
            Rademacher vector from ``generator``.
        max_iter: Lanczos steps (Hessian-vector products) at most.
        tol: relative residual at which to stop.
        generator: as in :func:`hutchinson_trace` (only used when ``init`` is None).
        preconditioner: the diagonal P, or None for H itself.
        route: Hessian-vector-product route, see :class:`HessianOperator`.
        memory: a :class:`MemoryLimit` the products are planned under. The basis (one vector of
            n entries per step) counts against it: when a further product no longer fits, the
            iteration stops there and returns the Ritz pair so far (``converged`` False).

    Example (spectrum {-10, 1, 2, 3}: the top eigenvalue is 3, not -10):
        >>> import torch
        >>> from dynlens.curvature import top_eigenvalue
        >>> a = torch.tensor([-10.0, 1.0, 2.0, 3.0], dtype=torch.float64)
        >>> loss_fn = lambda p: 0.5 * (a * p["w"] ** 2).sum()
        >>> eig = top_eigenvalue(loss_fn, {"w": torch.zeros(4, dtype=torch.float64)})
        >>> round(eig.value, 6), eig.converged, eig.vector["w"].abs().argmax().item()
        (3.0, True, 3)
    """
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"Expected `max_iter` to be a positive int, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"Expected `tol` to be positive, got {tol!r}")
    op = HessianOperator(loss_fn, params, route=route, memory=memory)
    scale = None
    if preconditioner is not None:
        p_flat = op.flatten(preconditioner).to(device=op.device, dtype=op.dtype)
        if not bool((p_flat > 0).all()):
            raise ValueError("Expected every entry of `preconditioner` to be positive")
        scale = p_flat.rsqrt()

    def apply(x: Tensor) -> Tensor:
        return op @ x if scale is None else scale * (op @ (scale * x))

    if init is None:
        q = _rademacher(1, op.numel, _generator(generator, op.device), op)[0]
    else:
        q = init if isinstance(init, Tensor) else op.flatten(init)
        q = q.detach().reshape(-1).to(device=op.device, dtype=op.dtype).clone()
        if q.numel() != op.numel:
            raise ValueError(f"Expected `init` with {op.numel} entries, got {q.numel()}")
    norm = q.norm()
    if not bool(norm > 0) or not bool(torch.isfinite(norm)):
        raise ValueError("Expected `init` to be a finite, non-zero vector")
    q = q / norm

    lanczos = _lanczos(
        apply,
        q,
        max_iter,
        numel=op.numel,
        eps=torch.finfo(op.dtype).eps,
        accept=lambda theta, s_last, beta: abs(beta * s_last) <= tol * abs(theta),
    )
    theta, s = lanczos.evals[-1].item(), lanczos.evecs[:, -1]
    residual = abs(lanczos.beta * s[-1].item())
    vector = s.to(device=op.device, dtype=op.dtype) @ lanczos.basis
    vector = vector / vector.norm()
    return Eigen(
        value=theta,
        vector={k: v.clone() for k, v in op.unflatten(vector).items()},
        converged=lanczos.stopped,
        iterations=len(lanczos.alphas),
        residual=residual,
        route=op.route,
        product_error=op.finite_difference_error,
    )


@dataclass
class _Lanczos:
    """What a Lanczos run leaves: the basis, T's entries and T's eigendecomposition."""

    basis: Tensor  # rows q_1 … q_j, orthonormal, one per completed step
    alphas: list[float]  # T's diagonal α_1 … α_j
    betas: list[float]  # T's off-diagonal β_2 … β_j
    beta: float  # β_{j+1} = ‖r_j‖, the residual norm after the last step
    evals: Tensor  # T's eigenvalues (the Ritz values), ascending, float64 on the CPU
    evecs: Tensor  # T's orthonormal eigenvectors, one per column
    stopped: bool  # `accept` held, or the Krylov space became invariant (Ritz values exact)


#: Rows of the basis's first block (it doubles when full).
_FIRST_ROWS = 8


def _lanczos(
    apply: Callable[[Tensor], Tensor],
    q: Tensor,
    max_iter: int,
    *,
    numel: int,
    eps: float,
    accept: Callable[[float, float, float], bool] | None = None,
) -> _Lanczos:
    """Lanczos with full reorthogonalisation from the unit vector ``q``, at most ``max_iter`` steps.

    Each step spends one product and rebuilds T_j = Q_jᵀ A Q_j. The run stops early when
    ``accept(θ_max, s_j, β_{j+1})`` holds (s the top Ritz vector of T_j), when the Krylov space is
    invariant (β_{j+1} ≈ 0), when it spans ℝⁿ, or when a product no longer fits in memory (a
    :class:`CurvatureMemoryError` after the first step; on the first it propagates).
    """
    # The basis lives in one block of rows, grown by doubling: each step reads it as a view
    # instead of stacking a copy of every vector so far.
    block = q.new_empty(min(_FIRST_ROWS, max_iter + 1, numel), q.numel())
    block[0], rows = q, 1
    alphas: list[float] = []
    betas: list[float] = []
    beta, stopped = math.inf, False
    evals = evecs = torch.ones(1, dtype=torch.float64)  # replaced by the first step's
    for _ in range(max_iter):
        try:
            w = apply(block[rows - 1])
        except CurvatureMemoryError:
            if not alphas:
                raise
            rows -= 1  # its product did not fit: the Ritz values of the steps so far stand
            break
        alphas.append(torch.dot(block[rows - 1], w).item())
        # Full reorthogonalisation ("twice is enough", Parlett, The Symmetric Eigenvalue Problem)
        # keeps the basis orthogonal in floating point: no spurious copies of converged Ritz values.
        b = block[:rows]
        for _ in range(2):
            w = w - b.T @ (b @ w)
        beta = w.norm().item()
        evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
        spectrum_scale = max(evals.abs().max().item(), eps)
        if beta <= 10 * eps * spectrum_scale or (
            accept is not None and accept(evals[-1].item(), evecs[-1, -1].item(), beta)
        ):
            # The first case is an invariant subspace: the Ritz values are exact eigenvalues.
            stopped = True
            break
        if rows == numel:
            break
        betas.append(beta)
        if rows == len(block):
            grown = block.new_empty(min(2 * rows, max_iter + 1, numel), block.shape[1])
            grown[:rows] = block
            block = grown
        block[rows] = w / beta
        rows += 1
    # Drop what a step that did not complete (max_iter reached, a product that did not fit) left.
    del betas[len(alphas) - 1 :]
    return _Lanczos(block[: len(alphas)], alphas, betas, beta, evals, evecs, stopped)


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return t
