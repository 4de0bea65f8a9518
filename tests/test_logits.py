"""Tests for dynlens.logits: output-logit statistics, growth rate and attention-logit statistics."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynlens.attention
import dynlens.logits
from dynlens.attention import attention_logit_sums, multi_head_attention_logit_sums
from dynlens.logits import OutputLogitSums, log_growth_rate, output_logit_stats, output_logit_sums

NEG_INF = float("-inf")


@pytest.mark.parametrize(
    ("module", "examples"),
    [(dynlens.logits, 5), (dynlens.attention, 8)],
    ids=["logits", "attention"],
)
def test_docstring_examples(module, examples):
    result = doctest.testmod(module, extraglobs={"torch": torch, "math": math})
    assert result.failed == 0
    assert result.attempted >= examples


# ------------------------------------------------------------------------------- output logits
def test_output_statistics_by_hand():
    z = torch.tensor([[2.0, -1.0, 0.0, 3.0], [0.5, 0.5, 0.5, 0.5], [-4.0, 1.0, 1.0, 0.0]])
    s = output_logit_stats(z)
    flat = z.flatten().tolist()
    assert s.rms == pytest.approx(math.sqrt(sum(v * v for v in flat) / 12))
    assert s.max_abs == 4.0
    logz = [math.log(sum(math.exp(v) for v in row)) for row in z.tolist()]
    assert s.logz_mean == pytest.approx(sum(logz) / 3)
    assert s.logz_max == pytest.approx(max(logz))

    def std(row):
        mean = sum(row) / len(row)
        return math.sqrt(sum((v - mean) ** 2 for v in row) / len(row))

    assert s.spread == pytest.approx(sum(std(row) for row in z.tolist()) / 3)


def test_output_statistics_treat_every_leading_position_as_a_sample():
    z = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    assert output_logit_stats(z) == pytest.approx(output_logit_stats(z.reshape(10, 7)))
    sums = output_logit_sums(z)
    assert (sums.samples, sums.entries) == (10.0, 70.0)  # host floats: no device work


def test_output_statistics_shift_behaviour():
    """log Z moves with a common shift of the logits; spread (what the loss sees) does not."""
    z = torch.randn(6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = output_logit_stats(z), output_logit_stats(z - 30.0)
    assert b.logz_mean == pytest.approx(a.logz_mean - 30.0)
    assert b.spread == pytest.approx(a.spread)


def test_output_sums_merge_equals_one_pass():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 6, generator=g), 3 * torch.randn(5, 6, generator=g)
    merged = output_logit_sums(x).merge(output_logit_sums(y)).compute()
    whole = output_logit_sums(torch.cat([x, y])).compute()
    for key, value in whole.items():
        assert merged[key].item() == pytest.approx(value.item(), rel=1e-6), key


@pytest.mark.parametrize("shift", [0.0, -3e4, 5e3])
def test_log_z_equals_logsumexp_far_from_zero_too(shift):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(300, 50, generator=gen) * torch.logspace(-2, 2, 300)[:, None] + shift
    row_logz = torch.stack([output_logit_sums(row[None]).logz_sum for row in z]).double()
    exact = torch.logsumexp(z.double(), dim=-1)
    # float32 rounding of m + log S (as logsumexp's own result in float32), and of S's sum
    eps = torch.finfo(torch.float32).eps
    assert ((row_logz - exact).abs() <= 2 * eps * exact.abs() + 8 * eps).all()
    assert output_logit_sums(z).logz_max.item() == row_logz.max().item()


def test_log_z_of_infinite_rows_is_that_of_logsumexp():
    inf = math.inf
    z = torch.tensor([[1.0, -inf, 0.0], [-inf, -inf, -inf], [inf, 0.0, 1.0]])
    expected = torch.logsumexp(z, dim=-1)  # [log(e + 1), -inf, inf]
    assert output_logit_sums(z[:1]).logz_max.item() == pytest.approx(math.log(math.e + 1))
    assert output_logit_sums(z[1:2]).logz_max.item() == -inf == expected[1].item()
    assert output_logit_sums(z[2:]).logz_max.item() == inf == expected[2].item()
    assert output_logit_sums(z).logz_max.item() == inf


def test_half_precision_logits_are_measured_in_float32():
    z = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.bfloat16)
    sums = output_logit_sums(z)
    assert sums.logz_sum.dtype == torch.float32
    # float32's log(e³ + e² + e) = 3.40761; bfloat16 (8 significant bits) would give 3.40625
    assert sums.logz_sum.item() == pytest.approx(math.log(math.exp(3) + math.exp(2) + math.e))


@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.zeros(3, 0), torch.zeros(0, 4)])
def test_output_statistics_reject_shapes_without_samples_or_classes(bad):
    with pytest.raises(ValueError, match="Expected"):
        output_logit_sums(bad)


# ------------------------------------------------------------------------------- growth rate
def test_growth_rate_on_a_known_exponential():
    steps = list(range(0, 500, 25))
    values = [1.7 * math.exp(4.2e-3 * s) for s in steps]  # 4.2 e-folds per 1000 steps
    assert log_growth_rate(steps, values) == pytest.approx(4.2, rel=1e-9)
    assert log_growth_rate(steps, values, per=1.0) == pytest.approx(4.2e-3, rel=1e-9)
    shrinking = [100 * 2 ** (-s / 1000) for s in steps]  # halving every 1000 steps
    assert log_growth_rate(steps, shrinking) == pytest.approx(-math.log(2), rel=1e-9)


def test_growth_rate_is_a_least_squares_fit():
    steps, values = [0, 10, 20], [1.0, math.e**3, math.e**2]  # ln: 0, 3, 2
    # slope = Σ(x-10)(y-5/3) / Σ(x-10)² = (-10·-5/3 + 0 + 10·1/3) / 200 = 0.1
    assert log_growth_rate(steps, values) == pytest.approx(100.0)


def test_growth_rate_edge_cases():
    assert math.isnan(log_growth_rate([5], [2.0]))
    assert math.isnan(log_growth_rate([5, 5], [2.0, 3.0]))
    with pytest.raises(ValueError, match="positive"):
        log_growth_rate([0, 1], [1.0, 0.0])
    with pytest.raises(ValueError, match="as many"):
        log_growth_rate([0, 1], [1.0])


# ------------------------------------------------------------------------------- attention logits
def brute_force(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """SDPA's documented reference: the logits q·kᵀ·scale in float64 and which positions take
    part (attn_bias != -inf), then max and RMS over those."""
    length, keys = q.size(-2), k.size(-2)
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    bias = torch.zeros(length, keys, dtype=torch.float64)
    if is_causal:
        bias.masked_fill_(~torch.ones(length, keys, dtype=torch.bool).tril(), NEG_INF)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attn_mask, NEG_INF)
        else:
            bias = bias + attn_mask.double()
    if enable_gqa:
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
    z = q.double() @ k.double().transpose(-1, -2) * scale
    keep = (bias != NEG_INF).expand(z.shape)
    return z[keep].max().item(), z[keep].square().mean().sqrt().item(), int(keep.sum())


def check(sums, expected):
    max_logit, rms, count = expected
    assert sums.count.item() == count
    assert sums.max_logit.item() == pytest.approx(max_logit, rel=1e-5)
    assert sums.compute()["rms"].item() == pytest.approx(rms, rel=1e-5)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CASES = {
    "plain": dict(q=(2, 3, 5, 8), k=(2, 3, 7, 8)),
    "causal": dict(q=(2, 3, 6, 8), k=(2, 3, 6, 8), is_causal=True),
    "causal, fewer queries than keys": dict(q=(2, 3, 4, 8), k=(2, 3, 6, 8), is_causal=True),
    "bool mask": dict(q=(2, 3, 5, 8), k=(2, 3, 7, 8), mask=("bool", (2, 1, 5, 7))),
    "float mask": dict(q=(2, 3, 5, 8), k=(2, 3, 7, 8), mask=("float", (5, 7))),
    "gqa": dict(q=(2, 6, 5, 8), k=(2, 2, 7, 8), enable_gqa=True),
    "gqa, per-head mask": dict(
        q=(2, 6, 5, 8), k=(2, 2, 7, 8), enable_gqa=True, mask=("bool", (2, 6, 5, 7))
    ),
    "gqa, causal": dict(q=(1, 4, 6, 8), k=(1, 1, 6, 8), enable_gqa=True, is_causal=True),
    "scale": dict(q=(2, 3, 5, 8), k=(2, 3, 7, 8), scale=0.7),
    "3-d": dict(q=(4, 5, 8), k=(4, 7, 8)),
    "two batch dims": dict(q=(2, 3, 2, 5, 8), k=(2, 3, 2, 7, 8), mask=("bool", (3, 1, 5, 7))),
}


def make_mask(kind, shape, seed):
    keep = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.4
    if kind == "bool":
        return keep
    # an additive mask: -inf drops, finite biases keep their positions (and are not added)
    return torch.where(keep, randn(*shape, seed=seed + 1), torch.tensor(NEG_INF))


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_attention_statistics_match_brute_force(case):
    spec = CASES[case]
    q, k = randn(*spec["q"], seed=1), randn(*spec["k"], seed=2)
    mask = make_mask(*spec["mask"], seed=3) if "mask" in spec else None
    kwargs = {k_: spec[k_] for k_ in ("is_causal", "scale", "enable_gqa") if k_ in spec}
    # the inputs are valid SDPA calls
    F.scaled_dot_product_attention(q, k, k, attn_mask=mask, **kwargs)
    check(attention_logit_sums(q, k, mask, **kwargs), brute_force(q, k, mask, **kwargs))


def test_a_big_input_is_processed_in_several_chunks_with_the_same_result():
    q, k = randn(4, 8, 64, 16, seed=4), randn(4, 8, 64, 16, seed=5)
    mask = make_mask("bool", (4, 1, 64, 64), seed=6)
    whole = attention_logit_sums(q, k, mask, is_causal=True)
    assert whole.chunks == 1
    # 2**12 logits per chunk: one head of one sample (64·64) at a time -> 32 chunks
    chunked = attention_logit_sums(q, k, mask, is_causal=True, chunk_elements=2**12)
    assert chunked.chunks == 32
    # smaller than one head: blocks of query rows (64 rows of 64 keys, 10 rows a chunk)
    rows = attention_logit_sums(q, k, mask, is_causal=True, chunk_elements=640)
    assert rows.chunks == 32 * 7
    for sums in (chunked, rows):
        assert sums.max_logit.item() == pytest.approx(whole.max_logit.item(), rel=1e-6)
        assert torch.equal(sums.count, whole.count)
        assert sums.sum_squares.item() == pytest.approx(whole.sum_squares.item(), rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    length=st.integers(1, 9),
    keys=st.integers(1, 9),
    budget=st.integers(1, 400),
    causal=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunking_never_changes_the_result(
    batch, kv_heads, group, length, keys, budget, causal, masked, seed
):
    q = randn(batch, kv_heads * group, length, 4, seed=seed)
    k = randn(batch, kv_heads, keys, 4, seed=seed + 1)
    mask = make_mask("bool", (batch, 1, length, keys), seed) if masked else None
    gqa = group > 1
    whole = attention_logit_sums(q, k, mask, is_causal=causal, enable_gqa=gqa)
    part = attention_logit_sums(q, k, mask, is_causal=causal, enable_gqa=gqa, chunk_elements=budget)
    # the same up to float32 rounding: matmuls of other shapes may round the last bit otherwise
    assert torch.equal(part.count, whole.count)
    assert part.max_logit.item() == pytest.approx(whole.max_logit.item(), rel=1e-6)
    assert part.sum_squares.item() == pytest.approx(whole.sum_squares.item(), rel=1e-6, abs=1e-9)
    if whole.count.item() > 0:
        check(part, brute_force(q, k, mask, causal, enable_gqa=gqa))


def test_fully_masked_attention_counts_nothing():
    q = randn(1, 1, 3, 4)
    sums = attention_logit_sums(q, q, torch.zeros(3, 3, dtype=torch.bool))
    assert sums.count.item() == 0 and sums.max_logit.item() == NEG_INF


def test_half_precision_attention_is_measured_in_float32():
    q = torch.full((1, 1, 2, 64), 12.0, dtype=torch.float16)
    sums = attention_logit_sums(q, q)  # 64·144/8 = 1152 (float16 holds it; its squares would not)
    assert sums.max_logit.dtype == torch.float32 and sums.max_logit.item() == 1152.0
    assert sums.compute()["rms"].item() == pytest.approx(1152.0)


def test_measurement_leaves_no_autograd_trace():
    q = randn(1, 2, 3, 4).requires_grad_()
    sums = attention_logit_sums(q * 2, q)
    assert not sums.max_logit.requires_grad and q.grad is None


def test_bad_attention_inputs():
    q = randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="enable_gqa"):
        attention_logit_sums(q, randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="last dimension"):
        attention_logit_sums(q, randn(1, 4, 3, 6))
    with pytest.raises(ValueError, match="chunk_elements"):
        attention_logit_sums(q, q, chunk_elements=0)


# ------------------------------------------------------------------------- nn.MultiheadAttention
def mha_brute_force(mha, query, key, key_padding_mask=None, attn_mask=None):
    """q and k from the module's weights by hand, masks in MHA's convention (True = blocked)."""
    e, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight.detach().double(), mha.in_proj_bias.detach().double()
    q = query.double() @ w[:e].T + b[:e]  # (N, L, E), batch first
    k = key.double() @ w[e : 2 * e].T + b[e : 2 * e]
    n, length, _ = q.shape
    keys = k.shape[1]
    q = q.view(n, length, h, e // h).transpose(1, 2)
    k = k.view(n, keys, h, e // h).transpose(1, 2)
    z = q @ k.transpose(-1, -2) / math.sqrt(e // h)
    keep = torch.ones(n, h, length, keys, dtype=torch.bool)
    if attn_mask is not None:
        keep &= ~attn_mask
    if key_padding_mask is not None:
        keep &= ~key_padding_mask[:, None, None, :]
    return z[keep].max().item(), z[keep].square().mean().sqrt().item(), int(keep.sum())


def test_multi_head_attention_statistics_match_brute_force():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    query, key = randn(3, 5, 16, seed=1), randn(3, 6, 16, seed=2)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, -2:] = True
    blocked = make_mask("bool", (5, 6), seed=3).logical_not()
    blocked[:, 0] = False  # keep every query row attending to something
    expected = mha_brute_force(mha, query, key, padding, blocked)
    sums = multi_head_attention_logit_sums(
        query.transpose(0, 1),  # the functional is sequence-first
        key.transpose(0, 1),
        4,
        mha.in_proj_weight,
        mha.in_proj_bias,
        key_padding_mask=padding,
        attn_mask=blocked,
    )
    check(sums, expected)


def test_multi_head_attention_statistics_name_missing_projection_weights():
    query = randn(5, 2, 8, seed=1)
    with pytest.raises(ValueError, match="in_proj_weight"):
        multi_head_attention_logit_sums(query, query, 2, None, None)
    with pytest.raises(ValueError, match="k_proj_weight"):
        multi_head_attention_logit_sums(
            query, query, 2, None, None, use_separate_proj_weight=True, q_proj_weight=randn(8, 8)
        )


MHA_CASES = {
    "masks": dict(kwargs={}, padding=True, blocked="bool"),
    "float masks, per-head attn_mask": dict(kwargs={}, padding="float", blocked="float3d"),
    "bias_k and bias_v": dict(kwargs=dict(add_bias_kv=True), padding=True, blocked="bool"),
    "add_zero_attn": dict(kwargs=dict(add_zero_attn=True), padding=True, blocked=None),
    "kdim and vdim (separate projections)": dict(kwargs=dict(kdim=6, vdim=5), padding=False),
    "no bias": dict(kwargs=dict(bias=False), padding=True, blocked=None),
    "unbatched": dict(kwargs={}, unbatched=True, blocked="bool"),
}


@pytest.mark.parametrize("case", list(MHA_CASES), ids=list(MHA_CASES))
def test_multi_head_attention_matches_torchs_own_logits(case, monkeypatch):
    """The reference is PyTorch's own computation: with need_weights=True,
    multi_head_attention_forward forms the masked logits with torch.baddbmm/bmm, recorded here."""
    spec = MHA_CASES[case]
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, **spec["kwargs"])  # sequence-first
    kdim = spec["kwargs"].get("kdim", 16)
    n, length, keys = 3, 5, 6
    unbatched = spec.get("unbatched", False)
    query = randn(length, 16, seed=1) if unbatched else randn(length, n, 16, seed=1)
    key = randn(keys, kdim, seed=2) if unbatched else randn(keys, n, kdim, seed=2)
    value = randn(*key.shape[:-1], spec["kwargs"].get("vdim", 16), seed=3)
    padding = None
    if spec.get("padding"):
        padding = torch.zeros(n, keys, dtype=torch.bool)
        padding[0, -2:] = True
        if spec["padding"] == "float":
            padding = torch.zeros(n, keys).masked_fill(padding, NEG_INF)
    blocked = None
    if spec.get("blocked"):
        shape = (n * 4, length, keys) if spec["blocked"] == "float3d" else (length, keys)
        if unbatched and spec["blocked"] == "float3d":
            shape = (4, length, keys)
        blocked = make_mask("bool", shape, seed=4).logical_not()
        blocked[..., 0] = False
        if spec["blocked"].startswith("float"):
            blocked = torch.zeros(shape).masked_fill(blocked, NEG_INF)

    recorded = []
    for name in ("bmm", "baddbmm"):
        original = getattr(torch, name)

        def record(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            recorded.append(out.detach())
            return out

        monkeypatch.setattr(torch, name, record)
    mha(query, key, value, key_padding_mask=padding, attn_mask=blocked, need_weights=True)
    monkeypatch.undo()
    logits = recorded[0]  # the first product is q·kᵀ (+ mask); the second is weights·v
    kept = logits[torch.isfinite(logits)]
    # where a mask is finite it is 0 here, so the recorded entries are the logits themselves
    expected = (kept.max().item(), kept.double().square().mean().sqrt().item(), kept.numel())

    separate = not mha._qkv_same_embed_dim
    sums = multi_head_attention_logit_sums(
        query,
        key,
        4,
        mha.in_proj_weight,
        mha.in_proj_bias,
        bias_k=mha.bias_k,
        add_zero_attn=mha.add_zero_attn,
        key_padding_mask=padding,
        attn_mask=blocked,
        use_separate_proj_weight=separate,
        q_proj_weight=mha.q_proj_weight if separate else None,
        k_proj_weight=mha.k_proj_weight if separate else None,
    )
    check(sums, expected)


def test_pooling_output_sums_equals_merging_them_and_measuring_all_samples_at_once():
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 7, generator=gen, dtype=torch.float64) * 3 for n in (4, 1, 9)]
    parts = [output_logit_sums(b) for b in batches]
    pooled = OutputLogitSums.pool(parts)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    whole = output_logit_sums(torch.cat(batches))
    for name in (*OutputLogitSums.SUMS, *OutputLogitSums.MAXIMA):
        assert float(getattr(pooled, name)) == pytest.approx(float(getattr(merged, name)))
        assert float(getattr(pooled, name)) == pytest.approx(float(getattr(whole, name)))
    assert OutputLogitSums.pool(parts[:1]) is parts[0]
    with pytest.raises(ValueError, match="at least one"):
        OutputLogitSums.pool([])
