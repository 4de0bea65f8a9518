"""Hessian trace: Hutchinson's (with per-block traces) and Hutch++ estimators, and their probes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .memory import MemoryLimit
from .operator import HessianOperator, LossFn, Route

BlockRule = Literal["module", "layer", "tensor"]
#: The rules ``blocks=`` accepts by name (see :func:`parameter_blocks`).
BLOCK_RULES: tuple[str, ...] = ("module", "layer", "tensor")
#: Where parameters that no block of a mapping names go (see :func:`parameter_blocks`).
OTHER_BLOCK = "other"
Blocks = Mapping[str, Sequence[str]] | BlockRule


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate with its standard error.

    Attributes:
        value: the estimate (e.g. of tr(H)).
        stderr: estimated standard error of ``value``: sample std of the per-probe terms / √m.
            ``nan`` when it cannot be estimated (a single stochastic probe).
        num_probes: Hessian-vector products spent.
        frobenius: estimate of ‖H‖_F where the estimator provides one (Hutchinson), else None.
        route: the Hessian-vector-product route that produced it (pass it back as ``route=``
            to skip a failing route next time).
        product_error: on the ``"finite_difference"`` route, the estimated relative error of
            its products (:attr:`HessianOperator.finite_difference_error`); ``None`` on the
            exact routes.
        blocks: from :func:`hutchinson_trace` with ``blocks=``, the trace of each diagonal block
            tr(H_bb) by block name, as Estimates of their own (from the same probes, so their
            ``num_probes`` are the total's products, not extra ones); else ``None``.
    """

    value: float
    stderr: float
    num_probes: int
    frobenius: float | None = None
    route: str | None = None
    product_error: float | None = None
    blocks: dict[str, Estimate] | None = field(default=None, hash=False)


def hutchinson_trace(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    *,
    num_probes: int = 100,
    generator: torch.Generator | None = None,
    route: Route = "auto",
    chunk_size: int = 16,
    memory: MemoryLimit | None = None,
    blocks: Blocks | None = None,
) -> Estimate:
    """Hutchinson's estimate of the Hessian trace tr(H), with its standard error and ‖H‖_F.

    Hutchinson, M. F. (1989). *A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines.* Communications in Statistics - Simulation and Computation.

    For m Rademacher probes v_i (entries ±1 with probability ½ each), E[v vᵀ] = I, so

        tr(H) ≈ (1/m) Σ_i v_iᵀ H v_i                 (unbiased)
        stderr = std_i(v_iᵀ H v_i) / √m               (sample std, Bessel-corrected)
        ‖H‖²_F ≈ (1/m) Σ_i ‖H v_i‖²                   (unbiased: E‖Hv‖² = tr(H²) = ‖H‖²_F)

    The variance of one term is 2(‖H‖²_F − Σ_j H_jj²): zero for a diagonal H, large when the
    off-diagonal mass is. ``frobenius`` is the square root of the unbiased ‖H‖²_F estimate (so
    slightly biased low, by Jensen). All m products share one gradient graph.

    Per-block traces (``blocks=``): split θ into blocks b (sets of parameter tensors) and each
    probe and its product alike; the same products give every diagonal block's trace:

        tr(H_bb) ≈ (1/m) Σ_i v_{i,b}ᵀ (H v_i)_b        (unbiased: E[v_bᵀ H_{b,c} v_c] = 0, c ≠ b)
        stderr_b = std_i(v_{i,b}ᵀ (H v_i)_b) / √m

    at no extra product. The blocks partition θ, so their traces sum to the total (up to
    rounding). One term's variance is 2(‖H_bb‖²_F − Σ_{j∈b} H_jj²) + ‖H_{b,rest}‖²_F: the
    block's coupling to the rest adds to it, so a block's stderr can be large against its value.

    Args:
        num_probes: m, Hessian-vector products to spend (PyHessian's default cap is 100).
        generator: source of the probes. ``None`` creates a fresh generator seeded with 0 on
            ``params``' device, so repeated calls at the same θ agree; pass an own generator
            (kept across calls) for independent probes each time. The global RNG is never used.
        route: Hessian-vector-product route, see :class:`HessianOperator`.
        chunk_size: probes generated and multiplied at a time (bounds memory at ~3·chunk·n).
        memory: a :class:`MemoryLimit` the products are planned under (see
            :class:`HessianOperator`); it also lowers ``chunk_size`` so that the probe rows take
            at most a quarter of the headroom.
        blocks: per-block traces too, in :attr:`Estimate.blocks`: a rule, ``"module"`` (one
            block per top-level module), ``"layer"`` (one per layer of a ``ModuleList``, e.g.
            ``blocks.0``) or ``"tensor"`` (one per parameter tensor), or a mapping block name →
            parameter names, whose left-out parameters form a block ``"other"``; see
            :func:`parameter_blocks`. ``None`` (default): the total only.

    Example (a 50-dim quadratic with eigenvalues 100, 80, 60 and 47 ones: tr(H) = 287,
    ‖H‖_F = 141.59):
        >>> import torch
        >>> from dynlens.curvature import hutchinson_trace
        >>> g = torch.Generator().manual_seed(0)
        >>> q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
        >>> eigenvalues = torch.tensor([100.0, 80.0, 60.0] + [1.0] * 47, dtype=torch.float64)
        >>> h = q @ torch.diag(eigenvalues) @ q.T
        >>> loss_fn = lambda p: 0.5 * p["w"] @ h @ p["w"]
        >>> params = {"w": torch.zeros(50, dtype=torch.float64)}
        >>> est = hutchinson_trace(loss_fn, params, num_probes=30)
        >>> round(est.value, 2), round(est.stderr, 2), round(est.frobenius, 2)
        (279.92, 32.11, 135.23)

    Per block (H = diag(1, 2, 3) on ``a`` and 10·I₂ on ``b``, a diagonal H: every term is exact):
        >>> loss_fn = lambda p: 0.5 * (p["a"] @ torch.diag(torch.tensor([1.0, 2, 3])) @ p["a"]
        ...                            + 10 * p["b"].square().sum())
        >>> est = hutchinson_trace(loss_fn, {"a": torch.zeros(3), "b": torch.zeros(2)},
        ...                        num_probes=4, blocks="tensor")
        >>> est.value, {name: block.value for name, block in est.blocks.items()}
        (26.0, {'a': 6.0, 'b': 20.0})
    """
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"Expected `num_probes` to be a positive int, got {num_probes!r}")
    op = HessianOperator(loss_fn, params, route=route, memory=memory)
    partition = None if blocks is None else parameter_blocks(op.names, blocks)
    generator = _generator(generator, op.device)
    quad, sq_norm, per_tensor = [], [], []
    for k in _chunks(num_probes, op.rows_that_fit(chunk_size)):
        v = _rademacher(k, op.numel, generator, op)
        hv = op @ v
        terms = v * hv
        quad.append(terms.sum(dim=1))
        sq_norm.append(hv.square().sum(dim=1))
        if partition is not None:  # v_{i,t}ᵀ (H v_i)_t per parameter tensor t, columns in op.names
            segments = terms.split(op.numels, dim=1)
            per_tensor.append(torch.stack([seg.sum(dim=1) for seg in segments], dim=1).double())
    q = torch.cat(quad).double()
    frobenius_sq = torch.cat(sq_norm).double().mean().item()
    block_estimates = None
    if partition is not None:
        columns = torch.cat(per_tensor)
        index = {name: i for i, name in enumerate(op.names)}
        block_estimates = {}
        for block, names in partition.items():
            qb = columns[:, [index[name] for name in names]].sum(dim=1)
            block_estimates[block] = Estimate(
                value=qb.mean().item(),
                stderr=_stderr(qb),
                num_probes=num_probes,
                route=op.route,
                product_error=op.finite_difference_error,
            )
    return Estimate(
        value=q.mean().item(),
        stderr=_stderr(q),
        num_probes=num_probes,
        frobenius=math.sqrt(max(frobenius_sq, 0.0)),
        route=op.route,
        product_error=op.finite_difference_error,
        blocks=block_estimates,
    )


def parameter_blocks(names: Iterable[str], blocks: Blocks) -> dict[str, list[str]]:
    """The partition of parameter names into named blocks that ``hutchinson_trace`` splits into.

    Args:
        names: the parameter names in order, e.g. ``dict(model.named_parameters())`` (its keys).
        blocks: a rule or a mapping:

            * ``"module"``: one block per top-level module, named by the first dotted component
              (``encoder.layers.0.weight`` → ``encoder``);
            * ``"layer"``: one block per layer of a ``ModuleList`` (or ``Sequential``): the name
              up to and including its first integer component (``encoder.layers.0.weight`` →
              ``encoder.layers.0``); a parameter outside any list forms its top-level module's
              block (``head.weight`` → ``head``);
            * ``"tensor"``: one block per parameter tensor, named by the parameter;
            * a mapping block name → list of parameter names. Every name must be a parameter,
              and in one block only. Parameters it leaves out go to one more block, ``"other"``
              (last), so the blocks always cover θ and their traces sum to the total; to leave
              no ``"other"``, name every parameter.

    Returns:
        block name → its parameter names, blocks in the order of their first parameter (a
        rule) or of the mapping, names in the order of ``names``.

    Raises:
        ValueError: an unknown rule; a mapping that names an unknown parameter, names one twice,
            has an empty block or a bare string for a list, or leaves parameters out while
            naming a block ``"other"`` itself. The message says what to change.

    Example:
        >>> from dynlens.curvature import parameter_blocks
        >>> names = ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w", "head.w"]
        >>> list(parameter_blocks(names, "layer"))
        ['embed', 'layers.0', 'layers.1', 'head']
        >>> parameter_blocks(names, {"body": ["layers.0.w", "layers.0.b", "layers.1.w"]})
        {'body': ['layers.0.w', 'layers.0.b', 'layers.1.w'], 'other': ['embed.weight', 'head.w']}
    """
    names = list(names)
    if isinstance(blocks, str):
        if blocks not in BLOCK_RULES:
            raise ValueError(
                f"Expected `blocks` to be one of {BLOCK_RULES} or a mapping block name -> "
                f"parameter names, got {blocks!r}"
            )
        rules: dict[str, Callable[[str], str]] = {
            "module": _module_block,
            "layer": _layer_block,
            "tensor": str,
        }
        key = rules[blocks]
        out: dict[str, list[str]] = {}
        for name in names:
            out.setdefault(key(name), []).append(name)
        return out
    if not isinstance(blocks, Mapping):
        raise ValueError(
            f"Expected `blocks` to be one of {BLOCK_RULES} or a mapping block name -> parameter "
            f"names, got {type(blocks).__name__}"
        )
    known = set(names)
    owner: dict[str, str] = {}
    for block, members in blocks.items():
        if isinstance(members, str) or not isinstance(members, Iterable):
            raise ValueError(
                f"Expected block {block!r} to list parameter names, got {members!r}: write "
                f"{{{block!r}: [{members!r}]}} for a block of one parameter"
            )
        members = list(members)
        if not members:
            raise ValueError(f"Block {block!r} is empty: give it parameter names or drop it")
        for name in members:
            if name not in known:
                raise ValueError(
                    f"Block {block!r} names {name!r}, which is not a parameter; the parameters "
                    f"are {names}"
                )
            if name in owner:
                raise ValueError(
                    f"Parameter {name!r} is in block {owner[name]!r} and in block {block!r}: the "
                    "blocks must not overlap, so put it in one of them"
                )
            owner[name] = block
    out = {block: [name for name in names if owner.get(name) == block] for block in blocks}
    rest = [name for name in names if name not in owner]
    if rest:
        if OTHER_BLOCK in out:
            raise ValueError(
                f"Parameters {rest} are in no block, and the block {OTHER_BLOCK!r} they would "
                f"go to is one of yours: add them to a block, or rename your {OTHER_BLOCK!r}"
            )
        out[OTHER_BLOCK] = rest
    return out


def _module_block(name: str) -> str:
    return name.split(".", 1)[0]


def _layer_block(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def hutchpp_trace(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    *,
    num_probes: int = 100,
    generator: torch.Generator | None = None,
    route: Route = "auto",
    chunk_size: int = 16,
    memory: MemoryLimit | None = None,
) -> Estimate:
    """Hutch++ estimate of tr(H): exact trace on a sketched top subspace, Hutchinson on the rest.

    Meyer, R. A., Musco, C., Musco, C., & Woodruff, D. P. (2021). *Hutch++: Optimal Stochastic
    Trace Estimation.* SOSA 2021 (Algorithm 1).

    With a budget of m products and k = ⌊m/3⌋:

        S  = k Rademacher columns;  Q = orth(H S)      (k products; QR, Q has orthonormal columns)
        t₁ = tr(Qᵀ H Q)                                 (exact; k products)
        G  = m − 2k Rademacher columns; G' = (I − QQᵀ) G
        t₂ = (1/(m−2k)) Σ_i g'_iᵀ H g'_i                (Hutchinson on (I−QQᵀ)H(I−QQᵀ))
        tr(H) ≈ t₁ + t₂,   stderr = std_i(g'_iᵀ H g'_i) / √(m−2k)

    Unbiased: for *any* orthonormal Q, tr(H) = tr(QᵀHQ) + tr((I−QQᵀ)H(I−QQᵀ)), and conditional on
    Q the second term is estimated without bias; so E[t₁ + t₂ | Q] = tr(H) exactly, and the
    conditional variance (what ``stderr`` estimates) is also the unconditional one. When a few
    eigenvalues dominate, as the outliers of neural-network Hessians do, Q captures them and the
    variance is far below Hutchinson's at the same budget (for PSD H, relative error O(1/m)
    against Hutchinson's O(1/√m)). When n ≤ k the sketch spans ℝⁿ and the value is exact.
    ``frobenius`` is not estimated.

    Args:
        num_probes: m ≥ 3, Hessian-vector products to spend (min(k, n) fewer when n < k).
        generator, route, chunk_size, memory: as in :func:`hutchinson_trace`.

    Example (the H of :func:`hutchinson_trace`'s example, tr(H) = 287, same budget: the three
    outliers land in Q and the standard error drops from 32 to 1.4):
        >>> import torch
        >>> from dynlens.curvature import hutchpp_trace
        >>> g = torch.Generator().manual_seed(0)
        >>> q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
        >>> eigenvalues = torch.tensor([100.0, 80.0, 60.0] + [1.0] * 47, dtype=torch.float64)
        >>> h = q @ torch.diag(eigenvalues) @ q.T
        >>> loss_fn = lambda p: 0.5 * p["w"] @ h @ p["w"]
        >>> est = hutchpp_trace(loss_fn, {"w": torch.zeros(50, dtype=torch.float64)}, num_probes=30)
        >>> round(est.value, 2), round(est.stderr, 2)
        (285.36, 1.39)
    """
    if not isinstance(num_probes, int) or num_probes < 3:
        raise ValueError(
            f"Expected `num_probes` to be an int >= 3 (a third each for the sketch, its exact "
            f"trace and the deflated Hutchinson part), got {num_probes!r}"
        )
    op = HessianOperator(loss_fn, params, route=route, memory=memory)
    generator = _generator(generator, op.device)
    chunk_size = op.rows_that_fit(chunk_size)
    k = num_probes // 3
    m_rest = num_probes - 2 * k
    sketch = _rademacher(k, op.numel, generator, op)  # rows are the columns of S
    q = torch.linalg.qr(_apply_chunked(op, sketch, chunk_size).T).Q  # n × min(n, k)
    exact = (q.T * _apply_chunked(op, q.T, chunk_size)).sum()  # Σ_j q_jᵀ H q_j = tr(QᵀHQ)
    g = _rademacher(m_rest, op.numel, generator, op)
    g = g - (g @ q) @ q.T  # rows (I − QQᵀ) g_i
    quad = (g * _apply_chunked(op, g, chunk_size)).sum(dim=1).double()
    return Estimate(
        value=exact.item() + quad.mean().item(),
        stderr=_stderr(quad),
        num_probes=k + q.shape[1] + m_rest,
        route=op.route,
        product_error=op.finite_difference_error,
    )


def _generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(0)


def _rademacher(k: int, n: int, generator: torch.Generator, op: HessianOperator) -> Tensor:
    bits = torch.randint(0, 2, (k, n), generator=generator, device=generator.device)
    return (2 * bits - 1).to(device=op.device, dtype=op.dtype)


def _chunks(total: int, size: int) -> Iterator[int]:
    if size < 1:
        raise ValueError(f"Expected `chunk_size` to be a positive int, got {size}")
    for start in range(0, total, size):
        yield min(size, total - start)


def _apply_chunked(op: HessianOperator, rows: Tensor, size: int) -> Tensor:
    return torch.cat([op @ chunk for chunk in rows.split(size)]) if len(rows) else rows


def _stderr(samples: Tensor) -> float:
    if samples.numel() < 2:
        return math.nan
    return (samples.std() / math.sqrt(samples.numel())).item()
