"""Finding logits and attention in models as users write them: logits_module='auto', causal-LM
targets, attention written by hand, masks at the dtype's minimum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynlens import ConfigurationError
from dynlens.attention import attention_logit_sums, softmax_logit_sums
from dynlens.callbacks.capture import LogitsCapture, batch_targets, shift_targets_left
from dynlens.callbacks.capture.attention import AttentionCapture

MIN = torch.finfo(torch.float32).min


def dense(z: torch.Tensor, keep: torch.Tensor) -> tuple[float, float, int]:
    kept = z.double()[keep]
    return kept.max().item(), kept.square().mean().sqrt().item(), int(keep.sum())


def check(sums, expected) -> None:
    maximum, rms, count = expected
    assert sums.count.item() == count
    assert sums.max_logit.item() == pytest.approx(maximum, rel=1e-6)
    assert sums.compute()["rms"].item() == pytest.approx(rms, rel=1e-6)


# --------------------------------------------------------------------- pure: softmax scores
@pytest.mark.parametrize("chunk", [2**22, 7, 1])
def test_softmax_scores_leave_out_minus_inf_and_the_dtypes_minimum(chunk):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, 6, generator=g) * 4
    causal = torch.ones(5, 6, dtype=torch.bool).tril()
    padded = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    padded[1, ..., 4:] = False
    scores = z.masked_fill(~causal, -math.inf) + torch.where(padded, 0.0, MIN)
    keep = (causal & padded).expand_as(z)
    check(softmax_logit_sums(scores, chunk_elements=chunk), dense(z, keep))


def test_softmax_scores_in_half_precision_and_all_masked_rows():
    z = torch.tensor([[[[1.5, -2.0, 3.0], [0.0, 0.0, 0.0]]]], dtype=torch.float16)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    scores = z.masked_fill(~mask, torch.finfo(torch.float16).min)
    check(softmax_logit_sums(scores), dense(z.float(), mask[None, None]))
    empty = softmax_logit_sums(torch.full((1, 1, 2, 2), -math.inf))
    assert empty.count.item() == 0 and empty.max_logit.item() == -math.inf
    with pytest.raises(ValueError, match="chunk_elements"):
        softmax_logit_sums(z, chunk_elements=0)


def test_sdpa_additive_mask_at_the_dtypes_minimum_drops_its_positions():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 2, 4, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    keep[0, ..., 3:] = False
    additive = torch.where(keep, 0.0, MIN)
    z = q @ k.transpose(-1, -2) / math.sqrt(8)
    check(attention_logit_sums(q, k, additive), dense(z, keep.expand_as(z)))
    soft = torch.where(keep, 0.0, -1e9)  # a soft mask is a bias: its positions stay in
    check(attention_logit_sums(q, k, soft), dense(z, torch.ones_like(z, dtype=torch.bool)))


# --------------------------------------------------------------- attention written by hand
class HandWritten(nn.Module):
    """nanoGPT's non-flash attention: masked_fill(-inf), then softmax."""

    def __init__(self, d: int = 8, heads: int = 2, softmax_module: bool = False) -> None:
        super().__init__()
        self.qkv, self.heads = nn.Linear(d, 3 * d), heads
        self.softmax = nn.Softmax(dim=-1) if softmax_module else None
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        self.seen.append((q.detach(), k.detach()))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        att = self.softmax(att) if self.softmax is not None else F.softmax(att, dim=-1)
        return (att @ v).transpose(1, 2).reshape(b, t, d)


class Net(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.attn = HandWritten(**kwargs)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(x)
        logits = self.head(h)
        # not attention: an output softmax, a 4-D softmax over another dimension
        F.softmax(logits, dim=-1)
        F.softmax(h[:, None].expand(-1, 2, -1, -1), dim=1)
        return logits


@pytest.mark.parametrize("softmax_module", [False, True])
def test_hand_written_attention_equals_a_brute_force_from_q_and_k(softmax_module):
    torch.manual_seed(0)
    net = Net(softmax_module=softmax_module)
    capture = AttentionCapture()
    capture.attach(nn.ModuleDict({"net": net}))
    x = torch.randn(3, 4, 8)
    capture.arm()
    net(x)
    with torch.no_grad():
        net(x)  # not a gradient-recording call: not measured
    sums = capture.take()
    assert list(sums) == ["net.attn"] and capture.calls_seen == 0  # reset by take
    q, k = net.attn.seen[0]
    z = q @ k.transpose(-1, -2) / math.sqrt(4)
    keep = torch.ones(4, 4, dtype=torch.bool).tril().expand_as(z)
    check(sums["net.attn"], dense(z, keep))
    assert not torch._C._is_torch_function_mode_enabled()


# ------------------------------------------------------------------- logits_module="auto"
class Output(dict):
    """A ModelOutput stand-in: a dict with attribute access."""

    def __getattr__(self, name):
        return self[name]


class TaskModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.lm_head = nn.Linear(4, 4), nn.Linear(4, 6)

    def forward(self, x):
        return Output(logits=self.lm_head(self.body(x)))


class Wrapper(nn.Module):
    """What a LightningModule around a task model is: training_step calls self.model."""

    def __init__(self, models: int = 1) -> None:
        super().__init__()
        self.model = TaskModel()
        if models == 2:
            self.teacher = TaskModel()


def discover(module: nn.Module, step, outputs=None) -> tuple[LogitsCapture, list]:
    capture = LogitsCapture()
    capture.attach(module, "Monitor")
    capture.arm()
    step()
    return capture, capture.take(outputs, "Monitor")


def test_auto_prefers_the_logits_training_step_returns():
    wrapper = Wrapper()
    mine = torch.randn(2, 6)
    capture, taken = discover(wrapper, lambda: wrapper.model(torch.randn(2, 4)), {"logits": mine})
    assert capture.found[0] is None and torch.equal(taken[0], mine) and not capture.hooked


def test_auto_finds_the_outermost_model_output_and_keeps_it():
    wrapper = Wrapper()
    x = torch.randn(2, 4)
    seen = []
    capture, taken = discover(wrapper, lambda: seen.append(wrapper.model(x)), {"loss": 0})
    assert capture.found == ("model", "the output of `model` (TaskModel, its logits by name)")
    assert torch.equal(taken[0], seen[0].logits) and capture.hooked
    capture.arm()  # later steps: the forward hook on `model`
    out = wrapper.model(x)
    (later,) = capture.take({"loss": 0})
    assert torch.equal(later, out.logits)
    capture.detach()
    assert not torch.nn.modules.module._global_forward_hooks


def test_auto_reads_the_lightning_modules_own_forward_then_a_single_called_submodule():
    net = nn.Sequential(nn.Linear(4, 3))
    capture, taken = discover(net, lambda: net(torch.randn(2, 4)))
    assert capture.found[0] == "" and taken[0].shape == (2, 3)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    holder = Holder()
    capture, taken = discover(holder, lambda: holder.net(torch.randn(2, 4)))
    assert capture.found[0] == "net" and taken[0].shape == (2, 3)


def test_auto_fails_loud_with_the_candidates():
    wrapper = Wrapper(models=2)
    x = torch.randn(2, 4)
    with pytest.raises(ConfigurationError, match=r"Several modules.*`model`, `teacher`"):
        discover(wrapper, lambda: (wrapper.model(x), wrapper.teacher(x)))
    assert not torch.nn.modules.module._global_forward_hooks  # nothing left behind

    def frozen_teacher():
        wrapper.model(x)
        with torch.no_grad():
            wrapper.teacher(x)

    capture, _ = discover(wrapper, frozen_teacher)
    assert capture.found[0] == "model"  # a teacher under no_grad is not a candidate

    class TwoParts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = nn.Linear(4, 4), nn.Linear(4, 3)

    parts = TwoParts()
    with pytest.raises(ConfigurationError, match=r"logits_module='head'.*decoder \(2, 3\)"):
        discover(parts, lambda: parts.decoder(parts.encoder(x)))
    with pytest.raises(ConfigurationError, match="No module returned a floating tensor"):
        discover(parts, lambda: None)


# ---------------------------------------------------------------------------------- targets
def test_causal_targets_shift_left_and_flattened_logits_take_unflattened_labels():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert shift_targets_left(labels).tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]
    logits = torch.randn(2, 4, 9)
    batch = {"input_ids": labels, "labels": labels}
    assert torch.equal(batch_targets(batch, "auto", logits, shift=True), shift_targets_left(labels))
    assert torch.equal(batch_targets(batch, "auto", logits), labels)
    flat = batch_targets(batch, "auto", logits.flatten(0, 1))
    assert torch.equal(flat, labels.flatten())
    assert batch_targets({"labels": labels[:, :3]}, "auto", logits) is None  # other tokens
