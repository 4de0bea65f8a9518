"""Attention-logit statistics: the pure functions behind ``LogitGrowthMonitor``'s attention logits.

Wortsman et al. 2023, *Small-scale proxies for large-scale Transformer training instabilities*
(arXiv:2309.14322): the attention logits ``z_ij = q_i · k_j / sqrt(d_h)`` grow until the softmax
over ``j`` is one-hot and its entropy collapses (Dehghani et al. 2023 saw it at 8B parameters). In
their runs the maximum attention logit (largest in the first layer) passing about 1e4 went with
divergence. *qk-layernorm* (LayerNorm on ``q`` and ``k`` per head before the product) keeps the
logits bounded.

Here: :func:`attention_logit_sums` (one SDPA call), :func:`multi_head_attention_logit_sums` (one
``multi_head_attention_forward`` call, recomputed from its projection weights) and
:func:`softmax_logit_sums` (scores a hand-written attention hands to a softmax, masked positions
at or below :func:`masked_below` left out), all as :class:`AttentionLogitSums`.

Everything here is plain torch and works in a plain PyTorch loop. Statistics come as *sufficient
statistics* (sums, counts and maxima as device tensors, each with a declared cross-process
reduction) so that they pool over micro-batches and processes exactly; nothing synchronises with
the host.

Attention logits are computed chunk-wise (over batch, heads and, where needed, query rows): one
chunk holds at most ``chunk_elements`` logits, so a measurement never materialises more than
:data:`DEFAULT_CHUNK_ELEMENTS` values (16 MiB in float32) however large the attention is, and never
more than the unfused attention itself would (its full ``B·H·L·S`` logits).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "AttentionLogitSums",
    "attention_logit_sums",
    "masked_below",
    "multi_head_attention_logit_sums",
    "softmax_logit_sums",
]

#: Largest number of attention logits one chunk of a measurement holds (2**22: 16 MiB in float32).
DEFAULT_CHUNK_ELEMENTS = 2**22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 logits are measured in float32, as attention kernels accumulate q·k and
    # softmax kernels compute log Z: the statistics must not add rounding of their own.
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class AttentionLogitSums:
    """Sufficient statistics of attention logits ``z = q·kᵀ·scale`` over the positions that take
    part in the softmax.

    ``max_logit`` pools by maximum (``-inf`` when no position took part), ``sum_squares`` and
    ``count`` by adding. ``chunks`` says how many pieces the measurement was computed in.
    """

    max_logit: Tensor | float
    sum_squares: Tensor | float
    count: Tensor | float
    chunks: int = 1

    SUMS: ClassVar[tuple[str, ...]] = ("sum_squares", "count")
    MAXIMA: ClassVar[tuple[str, ...]] = ("max_logit",)

    def merge(self, other: AttentionLogitSums) -> AttentionLogitSums:
        """The statistics of both sets of logits together (tensors or floats)."""
        best: Tensor | float
        if isinstance(self.max_logit, Tensor):
            theirs = torch.as_tensor(other.max_logit)  # the tensor itself when it is one
            best = torch.maximum(self.max_logit, theirs.to(self.max_logit))
        else:
            best = max(self.max_logit, other.max_logit)
        return AttentionLogitSums(
            max_logit=best,
            sum_squares=self.sum_squares + other.sum_squares,
            count=self.count + other.count,
            chunks=self.chunks + other.chunks,
        )

    def compute(self) -> dict[str, Tensor | float]:
        """``max`` (the largest logit) and ``rms`` (root of the mean square): 0-dim tensors, or
        floats when the fields are floats."""
        return {"max": self.max_logit, "rms": (self.sum_squares / self.count) ** 0.5}


def _keep_mask(mask: Tensor | None) -> Tensor | None:
    """SDPA's ``attn_mask`` as 'takes part' booleans: bool masks as they are (True = attend),
    additive float masks where they are above :func:`masked_below` (``-inf``, or the dtype's
    minimum as Hugging Face masks add it, drop their positions). Other finite additive values
    (ALiBi-style biases, soft masks such as -1e9) leave their positions in: the statistic is of
    the q·k product, which is what grows and what qk-layernorm bounds, so the bias itself is not
    added."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > masked_below(mask.dtype)


def masked_below(dtype: torch.dtype) -> float:
    """Scores at or below this value are masked out, not logits: half the dtype's most negative
    number, which an additive mask of ``finfo(dtype).min`` (or ``-inf``) leaves a score at
    whatever the q·k product was."""
    return torch.finfo(dtype).min / 2


def softmax_logit_sums(
    scores: Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> AttentionLogitSums:
    """Max and mean square of attention scores that a model hands to a softmax itself.

    For attention written by hand, ``softmax(q·kᵀ·scale + mask, dim=-1)`` (Hugging Face's
    ``"eager"`` attention, nanoGPT's non-flash path): ``scores`` are the ``(..., queries, keys)``
    values entering the softmax. Positions at or below :func:`masked_below` — ``-inf`` from
    ``masked_fill``, or the dtype's minimum added as a mask — take no part; every other score
    counts as it is (so an additive bias such as ALiBi is included, as the softmax sees it).

    Runs on the detached scores under ``no_grad`` with autocast off, in pieces of at most
    ``chunk_elements`` scores (float16/bfloat16 measured in float32).

    Example (the second row's last key is masked by the dtype's minimum):
        >>> m = torch.finfo(torch.float32).min
        >>> z = torch.tensor([[[[1.0, -2.0], [3.0, 0.0 + m]]]])
        >>> s = softmax_logit_sums(z)
        >>> s.max_logit.item(), s.count.item(), round(s.compute()["rms"].item(), 4)
        (3.0, 3.0, 2.1602)
    """
    if (
        isinstance(chunk_elements, bool)
        or not isinstance(chunk_elements, int)
        or chunk_elements < 1
    ):
        raise ValueError(f"Expected `chunk_elements` a positive int, got {chunk_elements!r}")
    dtype = _compute_dtype(scores.dtype)
    if scores.numel() == 0:
        return _no_logits(dtype, scores.device)
    with torch.no_grad(), torch.autocast(scores.device.type, enabled=False):
        below = masked_below(scores.dtype)
        rows = scores.detach().reshape(-1, scores.shape[-1])
        step = max(1, chunk_elements // rows.shape[-1])
        maxima, squares, counts = [], [], []
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step].to(dtype)
            keep = chunk > below
            counts.append(keep.sum(dtype=torch.float64))
            squares.append(torch.linalg.vector_norm(chunk.where(keep, 0.0)))
            maxima.append(chunk.where(keep, -math.inf).max())
        one = len(maxima) == 1
        best = maxima[0] if one else torch.stack(maxima).max()
        total = (squares[0] if one else torch.stack(squares)).double().square().sum()
        count = counts[0] if one else torch.stack(counts).sum()
        return AttentionLogitSums(best, total, count, len(maxima))


def _canonical(t: Tensor, batch: tuple[int, ...]) -> Tensor:
    """``t`` viewed with exactly ``len(batch)`` leading batch dimensions (each 1 or full)."""
    return t.reshape((1,) * (len(batch) + 3 - t.dim()) + tuple(t.shape))


def _chunk_plan(batch: int, heads: int, rows: int, cols: int, budget: int) -> tuple[int, int, int]:
    """Block sizes (batch, heads, query rows) whose logits fit ``budget`` elements: whole heads
    of several samples when they fit, else several heads of one sample, else rows of one head."""
    per_sample = heads * rows * cols
    if per_sample <= budget:
        return max(1, min(batch, budget // max(per_sample, 1))), heads, rows
    if rows * cols <= budget:
        return 1, max(1, budget // (rows * cols)), rows
    return 1, 1, max(1, budget // max(cols, 1))


def _no_logits(dtype: torch.dtype, device: torch.device) -> AttentionLogitSums:
    """The statistics of no logits at all: max -inf, nothing counted."""
    return AttentionLogitSums(
        torch.full((), -math.inf, dtype=dtype, device=device),
        torch.zeros((), dtype=torch.float64, device=device),
        torch.zeros((), dtype=torch.float64, device=device),
        chunks=0,
    )


@functools.lru_cache(maxsize=16)
def _above_diagonal(rows: int, cols: int, device: torch.device) -> Tensor:
    """``True`` above the diagonal (SDPA's ``is_causal`` drops those keys); cached per shape, as
    a model asks for the same few shapes at every attention call. Never written to."""
    return torch.ones(rows, cols, dtype=torch.bool, device=device).triu_(1)


def _causal_count(first: int, last: int, cols: int) -> int:
    """Σ_{i=first}^{last-1} min(i + 1, cols): the keys that queries first..last-1 see causally."""
    split = min(max(cols, first), last)  # rows below `split` see i + 1 keys, the rest all cols
    below = (split * (split + 1) - first * (first + 1)) // 2
    return below + (last - split) * cols


def _sums_4d(
    q: Tensor, k: Tensor, keep: Tensor | None, causal: bool, scale: float, budget: int
) -> AttentionLogitSums:
    """The core loop: ``q`` (B, H, L, E), ``k`` (B or 1, H or 1, S, E), ``keep`` broadcastable
    to (B, H, L, S) or None."""
    b_size, h_size, rows, _ = q.shape
    cols = k.shape[-2]
    dtype = _compute_dtype(q.dtype)
    device = q.device
    if 0 in (b_size, h_size, rows, cols):
        return _no_logits(dtype, device)
    # the scale is applied to the two statistics at the end instead of to every logit (a
    # negative scale, which turns maxima into minima, is applied to the logits themselves)
    late = scale >= 0
    nb, nh, nl = _chunk_plan(b_size, h_size, rows, cols, budget)
    above = None  # SDPA's is_causal drops keys j > i (top-left aligned when L != S)
    if causal and rows * cols <= budget:
        above = _above_diagonal(rows, cols, device)
    maxima, squares, counted = [], [], []
    known = 0  # positions counted without a mask: a Python int, no device work
    for b0, h0, l0 in itertools.product(
        range(0, b_size, nb), range(0, h_size, nh), range(0, rows, nl)
    ):
        bs, hs, ls = slice(b0, b0 + nb), slice(h0, h0 + nh), slice(l0, l0 + nl)
        q_chunk = q[bs, hs, ls].to(dtype)
        k_chunk = k[bs if k.shape[0] > 1 else slice(None)].to(dtype)
        nq = q_chunk.shape
        if k_chunk.shape[1] == 1:
            # one key head for all query heads: fold the heads (and a broadcast batch) into
            # rows, so that matmul does not broadcast (and copy) the keys once per head
            folded = 1 if k_chunk.shape[0] == 1 else nq[0]
            flat = q_chunk.reshape(folded, -1, nq[3])
            logits = (flat @ k_chunk[:, 0].transpose(-1, -2)).reshape(*nq[:3], cols)
        else:
            logits = q_chunk @ k_chunk[:, hs].transpose(-1, -2)
        if not late:
            logits.mul_(scale)
        dropped = None
        if causal:
            if above is not None:
                dropped = above[ls]
            else:
                i = torch.arange(l0, l0 + nq[2], device=device)
                dropped = i[:, None] < torch.arange(cols, device=device)[None, :]
        if keep is not None:
            chunk_keep = keep[
                bs if keep.shape[0] > 1 else slice(None),
                hs if keep.shape[1] > 1 else slice(None),
                ls if keep.shape[2] > 1 else slice(None),
            ]
            dropped = chunk_keep.logical_not() if dropped is None else dropped | ~chunk_keep
            # the mask may broadcast: count its entries times the broadcast factor
            factor = logits.numel() // dropped.numel()
            counted.append(logits.numel() - dropped.sum(dtype=torch.float64) * factor)
        elif causal:
            known += _causal_count(l0, l0 + nq[2], cols) * nq[0] * nq[1]
        else:
            known += logits.numel()
        if dropped is not None:
            logits.masked_fill_(dropped, 0.0)
        squares.append(torch.linalg.vector_norm(logits))
        if dropped is not None:
            logits.masked_fill_(dropped, float("-inf"))
        maxima.append(logits.max())
    # (one chunk, the usual case: no stacking; the operations' fixed cost is what counts there)
    best = maxima[0] if len(maxima) == 1 else torch.stack(maxima).max()
    norm = squares[0] if len(squares) == 1 else torch.stack(squares)
    total = norm.double().square().sum()
    if late:
        best, total = best * scale, total * scale**2
    # a fill, not a copy from the host: a host-to-device copy would wait for the GPU
    count = torch.full((), float(known), dtype=torch.float64, device=device)
    if counted:
        count = count + torch.stack(counted).sum()
    return AttentionLogitSums(best, total, count, len(maxima))


def attention_logit_sums(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> AttentionLogitSums:
    """Max and mean square of the attention logits of one
    :func:`torch.nn.functional.scaled_dot_product_attention` call, computed chunk-wise.

    Same arguments and conventions as SDPA: ``query`` ``(..., Hq, L, E)``, ``key``
    ``(..., Hk, S, E)``; the logits are

    .. code-block:: text

        z[..., h, i, j] = scale · q[..., h, i, :] · k[..., g(h), j, :]     (scale = 1/sqrt(E))

    with ``g(h) = h`` when the head counts match, ``g(h) = 0`` for one shared key head, and
    ``g(h) = h // (Hq / Hk)`` with ``enable_gqa=True`` (grouped-query attention, as SDPA's
    ``repeat_interleave``). Only positions that take part in the softmax count: a boolean
    ``attn_mask`` keeps its True entries, an additive float mask its entries that are not ``-inf``
    (finite additive values are not added: this is the q·k product Wortsman et al. track), and
    ``is_causal=True`` keeps ``j <= i``. The value tensor and dropout play no part.

    Runs on detached tensors under ``no_grad`` with autocast off: no effect on the autograd graph,
    on the RNG streams or on the attention's own result. One chunk holds at most
    ``chunk_elements`` logits (blocks of samples, then of heads, then of query rows), plus its
    boolean mask; float16/bfloat16 inputs are measured in float32.

    Returns:
        :class:`AttentionLogitSums` on the query's device.

    Example (two queries, two keys, E = 4, so scale = 1/2; the causal mask drops z[0, 1]):
        >>> q = torch.tensor([[[1.0, 0, 0, 0], [0, 2.0, 0, 0]]])
        >>> k = torch.tensor([[[2.0, 0, 0, 0], [0, 4.0, 0, 0]]])
        >>> s = attention_logit_sums(q, k, is_causal=True)  # kept: z00 = 1, z10 = 0, z11 = 4
        >>> s.max_logit.item(), s.count.item(), round(s.compute()["rms"].item(), 4)
        (4.0, 3.0, 2.3805)
    """
    if query.is_nested or key.is_nested:
        raise ValueError("Attention logits of nested (jagged) tensors are not measured")
    if (
        isinstance(chunk_elements, bool)
        or not isinstance(chunk_elements, int)
        or chunk_elements < 1
    ):
        raise ValueError(f"Expected `chunk_elements` a positive int, got {chunk_elements!r}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"Expected query and key with the same last dimension, got {tuple(query.shape)} and "
            f"{tuple(key.shape)}"
        )
    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        q, k = query.detach(), key.detach()
        # give both at least a head dimension: SDPA treats dim -3 as heads
        while q.dim() < 3:
            q = q.unsqueeze(0)
        while k.dim() < 3:
            k = k.unsqueeze(0)
        keep = _keep_mask(attn_mask.detach() if attn_mask is not None else None)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        batch = torch.broadcast_shapes(
            q.shape[:-3], k.shape[:-3], () if keep is None else keep.shape[:-3]
        )
        q, k = _canonical(q, batch), _canonical(k, batch)
        keep = None if keep is None else _canonical(keep, batch)
        hq, hk = q.shape[-3], k.shape[-3]
        groups = 1
        if hq != hk and 1 not in (hq, hk):
            if not (enable_gqa and hq % hk == 0):
                raise ValueError(
                    f"Expected as many key heads as query heads, one key head, or "
                    f"enable_gqa=True with query heads a multiple of key heads; got {hq} and {hk}"
                )
            groups = hq // hk
        total: AttentionLogitSums | None = None
        # several batch dimensions: a loop over all but the first, so that no tensor (or mask)
        # is ever expanded to the full batch; the usual 4-D (B, H, L, E) case has one pass
        outer = [range(n) for n in batch[1:]]
        for index in itertools.product(*outer):

            def four_d(t: Tensor, index: tuple[int, ...] = index) -> Tensor:
                picked = tuple(i if t.shape[d + 1] > 1 else 0 for d, i in enumerate(index))
                where: tuple[slice | int, ...] = (slice(None), *picked)
                t = t[where] if picked else t
                return t if t.dim() == 4 else t.unsqueeze(0)

            q4, k4 = four_d(q), four_d(k)
            keep4 = None if keep is None else four_d(keep)
            # a query broadcast over the batch or the heads: expanded views (no copy), so that
            # every (sample, head) of SDPA's output is measured
            q4 = q4.expand(batch[0] if batch else 1, max(hq, hk), *q4.shape[2:])
            for member in range(groups):
                # grouped-query attention: query heads member, member + groups, ... share key
                # heads 0, 1, ... (repeat_interleave), so each slice is an ordinary problem
                q_part = q4[:, member::groups] if groups > 1 else q4
                keep_part = keep4
                if groups > 1 and keep4 is not None and keep4.shape[1] > 1:
                    keep_part = keep4[:, member::groups]
                part = _sums_4d(q_part, k4, keep_part, is_causal, scale, chunk_elements)
                total = part if total is None else total.merge(part)
        if total is None:  # an empty batch dimension: nothing to measure
            return _no_logits(_compute_dtype(q.dtype), q.device)
        return total


def _mha_allowed(mask: Tensor) -> Tensor:
    return mask.detach().logical_not() if mask.dtype == torch.bool else mask != float("-inf")


def _pad_true(mask: Tensor | None) -> Tensor | None:
    """One more key column that takes part (bias_k, add_zero_attn)."""
    if mask is None:
        return None
    return torch.cat([mask, mask.new_ones(*mask.shape[:-1], 1)], dim=-1)


def multi_head_attention_logit_sums(
    query: Tensor,
    key: Tensor,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    *,
    bias_k: Tensor | None = None,
    add_zero_attn: bool = False,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> AttentionLogitSums:
    """Attention-logit statistics of one :func:`torch.nn.functional.multi_head_attention_forward`
    call (what :class:`torch.nn.MultiheadAttention` runs), recomputed from its projection weights.

    Arguments as in the functional (sequence-first ``(L, N, E)`` or unbatched ``(L, E)``;
    :class:`~torch.nn.MultiheadAttention` transposes ``batch_first`` inputs before calling it).
    Follows its steps: ``q = query W_qᵀ + b_q``, ``k = key W_kᵀ + b_k`` from the packed
    ``in_proj_weight`` (or the separate ``q_proj_weight``/``k_proj_weight``), ``bias_k`` appended as
    one more key, ``static_k`` replacing the keys, ``add_zero_attn`` appending a zero key (logit
    0), heads split ``d_h = E / num_heads``, scale ``1/sqrt(d_h)``. Masks follow *its* convention:
    a boolean ``attn_mask`` or ``key_padding_mask`` is True where attention is **not** allowed,
    a float one is added (``-inf`` excludes). Then as :func:`attention_logit_sums`.
    """
    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        query, key = query.detach(), key.detach()
        if query.dim() == 2:  # unbatched
            query, key = query.unsqueeze(1), key.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        length, batch, embed = query.shape
        head_dim = embed // num_heads
        if use_separate_proj_weight:
            if q_proj_weight is None or k_proj_weight is None:
                raise ValueError(
                    "Expected q_proj_weight and k_proj_weight with use_separate_proj_weight=True"
                )
            w_q, w_k = q_proj_weight, k_proj_weight
        else:
            if in_proj_weight is None:
                raise ValueError(
                    "Expected in_proj_weight with use_separate_proj_weight=False (or pass "
                    "q_proj_weight and k_proj_weight with use_separate_proj_weight=True)"
                )
            w_q, w_k = in_proj_weight[:embed], in_proj_weight[embed : 2 * embed]
        b_q = b_k = None
        if in_proj_bias is not None:
            b_q, b_k = in_proj_bias[:embed], in_proj_bias[embed : 2 * embed]
        # masks as "takes part" booleans first (MHA: bool True = not allowed, float -inf = not
        # allowed), so that the key columns appended below can be padded with True
        keep_attn = None if attn_mask is None else _mha_allowed(attn_mask)
        keep_pad = None if key_padding_mask is None else _mha_allowed(key_padding_mask)
        q = F.linear(query, w_q.detach(), None if b_q is None else b_q.detach())
        k = F.linear(key, w_k.detach(), None if b_k is None else b_k.detach())
        if bias_k is not None:
            k = torch.cat([k, bias_k.detach().repeat(1, batch, 1)])
            keep_attn, keep_pad = _pad_true(keep_attn), _pad_true(keep_pad)
        q = q.reshape(length, batch * num_heads, head_dim).transpose(0, 1)
        if static_k is None:
            k = k.reshape(k.shape[0], batch * num_heads, head_dim).transpose(0, 1)
        else:
            k = static_k.detach()
        if add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch * num_heads, 1, head_dim)], dim=1)
            keep_attn, keep_pad = _pad_true(keep_attn), _pad_true(keep_pad)
        keys = k.shape[1]
        keep = None
        if keep_attn is not None:
            keep = keep_attn
            if keep_attn.dim() == 3:  # (N·H, L, S)
                keep = keep_attn.reshape(batch, num_heads, length, keys)
        if keep_pad is not None:  # (N, S)
            keep_pad = keep_pad.reshape(batch, 1, 1, keys)
            keep = keep_pad if keep is None else keep & keep_pad
        return attention_logit_sums(
            q.reshape(batch, num_heads, length, head_dim),
            k.reshape(batch, num_heads, keys, head_dim),
            keep,
            scale=1.0 / math.sqrt(head_dim),
            chunk_elements=chunk_elements,
        )
