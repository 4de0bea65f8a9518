"""Every monitor at its defaults, nothing named, on code people train (``clients``): the logits are
found by what they do, the targets aligned by agreement with the loss, attention maxima equal a
float64 brute force, and training is bit-identical with and without the monitors, compiled too."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import dynlens
from dynlens.callbacks.capture import Alignment
from tests.helpers import trainer as make_trainer

from .clients import (
    BATCH,
    CLIENTS,
    SEQ,
    Client,
    ConventionLM,
    ConventionModule,
    LitGPTPretrain,
    NanoGPT,
    NanoModule,
    litgpt_config,
    tokens,
)

BY_NAME = {c.name: c for c in CLIENTS}


def monitors() -> list[dynlens.Monitor]:
    return [
        dynlens.SoftmaxCollapseMonitor(every_n_steps=1, verbose=False),
        dynlens.LogitGrowthMonitor(every_n_steps=1, attention_every_n_steps=1, verbose=False),
        dynlens.HessianMonitor(every_n_steps=2, num_probes=2, max_iter=3, verbose=False),
        dynlens.EarlyWarningMonitor(every_n_steps=1, verbose=False),
        dynlens.GrokkingMonitor(verbose=False),
    ]


def fit(module: pl.LightningModule, batches: list, callbacks: list, steps: int = 2):
    loader = DataLoader(batches, batch_size=BATCH)
    trainer = make_trainer(max_steps=steps, callbacks=callbacks, logger=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*GrokkingMonitor")  # no accuracies logged
        trainer.fit(module, loader)
    return module


def make(client: Client) -> pl.LightningModule:
    torch.manual_seed(0)
    return client.make()


class AttentionRecorder(pl.Callback):
    """The q, k of every attention call of the first training step, in float64: the attention
    layers' own (``seen``, nanoGPT-style models) or SDPA's arguments (LitGPT)."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self._sdpa = F.scaled_dot_product_attention

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.calls = []  # the last step's

        def sdpa(q, k, v, *args, scale=None, **kwargs):
            if torch.is_grad_enabled():
                s = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
                self.calls.append((q.detach().double(), k.detach().double(), s))
            return self._sdpa(q, k, v, *args, scale=scale, **kwargs)

        F.scaled_dot_product_attention = sdpa

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        F.scaled_dot_product_attention = self._sdpa
        for layer in module.modules():
            seen = getattr(layer, "seen", None)
            if seen is not None and getattr(layer, "flash", True) is False:
                self.calls.append((*seen, 1 / math.sqrt(seen[0].shape[-1])))

    def maxima(self) -> list[float]:
        found = []
        for q, k, scale in self.calls:
            if k.shape[1] != q.shape[1]:  # grouped-query: each k head serves several q heads
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = q @ k.transpose(-2, -1) * scale
            t = scores.shape[-1]
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            found.append(scores.masked_fill(~causal, -math.inf).max().item())
        return sorted(found)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_every_monitor_finds_the_logits_and_targets_and_changes_nothing(name):
    client = BY_NAME[name]
    batches = client.batches(0)
    reference = [p.detach().clone() for p in fit(make(client), batches, []).parameters()]
    attached, recorder = monitors(), AttentionRecorder()
    trained = fit(make(client), batches, [recorder, *attached]).parameters()
    assert all(torch.equal(a, b) for a, b in zip(trained, reference, strict=True))
    assert all(m.disabled_reason is None for m in attached), [m.disabled_reason for m in attached]
    collapse, growth, hessian, early, _ = attached
    for monitor in (collapse, growth, early):
        assert monitor.capture.found is not None and monitor.capture.found[0] == client.found
        assert "reproduces the loss" in monitor.capture.found[1]
        assert monitor.capture.alignment == Alignment(client.key, client.shift)
    (said,) = [e["message"] for e in collapse.events if e["reason"] == "targets"]
    assert ("shifted" in said) is client.shift and "reproduces the loss" in said
    assert "zero_loss_fraction" in collapse.latest
    assert math.isfinite(growth.latest["logz_mean"]) and math.isfinite(hessian.latest["trace"])
    # the last step's attention maxima, layer by layer, against q·kᵀ in float64
    logged = sorted(growth.latest[f"attn_max/{n}"] for n in growth.layers)
    assert len(logged) == 2 and logged == pytest.approx(recorder.maxima(), rel=1e-5)


def _confident(model: ConventionLM, ids: torch.Tensor) -> torch.Tensor:
    """Embeddings × 100 (tied to the head): almost every position's loss is exactly 0 against the
    model's own predictions, which the labels then hold at their shifted positions."""
    with torch.no_grad():
        model.wte.weight.mul_(100.0)
        predicted = model(ids).logits.argmax(-1)
    labels = ids.clone()
    labels[:, 1:] = predicted[:, :-1]
    return labels


def test_a_custom_hugging_face_convention_model_is_read_shifted():
    # the convention's own output class, not a transformers model: nothing in its class says
    # causal LM, the agreement with its loss does; shifted, almost every position has a loss of
    # exactly 0, unshifted almost none
    torch.manual_seed(0)
    model = ConventionLM()
    ids = tokens(3, n=BATCH)
    ids[:, 0] = torch.arange(BATCH)
    labels = _confident(model, ids)
    with torch.no_grad():
        logits = model(ids).logits
    shifted = (
        F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
        == 0
    ).sum().item() / labels.numel()
    unshifted = (
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none") == 0
    ).sum().item() / labels.numel()
    assert shifted > 0.8 and unshifted < 0.3
    collapse = dynlens.SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
    batches = [{"input_ids": i, "labels": j} for i, j in zip(ids, labels, strict=True)]
    fit(ConventionModule(model), batches, [collapse], steps=1)
    assert collapse.capture.causal_lm is False  # its class is no hint
    assert collapse.capture.alignment == Alignment("labels", True)
    assert collapse.latest["zero_loss_fraction"] == pytest.approx(shifted, abs=1e-12)


def test_a_loss_with_other_terms_counts_collapse_from_the_logits_alone():
    # a z-loss term: no alignment reproduces the loss; the (B, T) labels fit both ways, so none
    # is guessed, and the event gives the two values
    class ZLoss(NanoModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits, loss = self.model(x, y)
            return loss + 1e-2 * torch.logsumexp(logits, -1).square().mean()

    torch.manual_seed(0)
    collapse = dynlens.SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
    client = BY_NAME["nanogpt-flash"]
    fit(ZLoss(NanoGPT()), client.batches(0), [collapse], steps=1)
    assert collapse.capture.alignment is None and collapse.capture.disagreement is not None
    assert "sc_fraction" in collapse.latest and "zero_loss_fraction" not in collapse.latest
    (said,) = [e["message"] for e in collapse.events if e["reason"] == "targets"]
    miss = collapse.capture.disagreement
    assert f"{miss.loss:.6g}" in said and f"{miss.value:.6g}" in said
    assert miss.value < miss.loss  # the z-loss term adds to the cross-entropy


def test_a_chunked_head_is_pooled_by_every_monitor():
    # LitGPT's head in chunks of 3 over 8 positions: every chunk counts, the last one too
    client = BY_NAME["litgpt-llama-gqa-chunked"]
    outputs: list = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.handle = module.model.register_forward_hook(
                lambda m, a, out: outputs.append([x.detach().clone() for x in out])
            )

        def on_train_batch_end(self, trainer, module, *args):
            self.handle.remove()

    collapse = dynlens.SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
    early = dynlens.EarlyWarningMonitor(every_n_steps=1, verbose=False)
    fit(make(client), client.batches(0), [Record(), collapse, early], steps=1)
    (chunks,) = outputs
    assert [c.shape[1] for c in chunks] == [3, 3, 2]
    logits = torch.cat(chunks, dim=1).flatten(0, 1)
    top = logits.float().topk(2, dim=-1).values
    assert early.latest["collapse/gap_median"] == pytest.approx(
        (top[:, 0] - top[:, 1]).median().item(), rel=1e-5
    )
    assert early.latest["collapse/sc_fraction"] == collapse.latest["sc_fraction"]


def test_gradient_accumulation_divides_the_returned_loss_and_the_agreement_holds():
    client = BY_NAME["nanogpt-manual"]
    collapse = dynlens.SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
    loader = DataLoader(client.batches(0), batch_size=BATCH // 2)
    trainer = make_trainer(
        max_steps=1, callbacks=[collapse], logger=False, accumulate_grad_batches=2
    )
    trainer.fit(make(client), loader)
    assert collapse.capture.alignment == Alignment(1, False)


class Counting:
    """aot_eager (AOTAutograd, the backward compiled too), counting its graphs."""

    def __init__(self) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs, self._aot = 0, lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self._aot(gm, example_inputs)


def _compiled(seed: int, callbacks: list) -> tuple[list[torch.Tensor], int]:
    """One step of a compiled LitGPT Llama (grouped-query attention) under aot_eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    backend = Counting()
    module = LitGPTPretrain(litgpt_config("llama-gqa"))
    module.model = torch.compile(module.model, backend=backend)
    fit(module, list(tokens(seed, length=SEQ + 1)), callbacks, steps=1)
    return [p.detach().clone() for p in module.parameters()], backend.graphs


def test_compiled_models_train_bit_identically_with_every_monitor():
    # the logits' hooks are invisible to Dynamo: the same graphs, the same weights (with the
    # search hook traced, this step compiled into 6 graphs, and the weights moved in the 8th
    # digit); with every monitor (the attention capture breaks the graphs where it measures),
    # the same weights; and a second compiled model in the same process trains too
    alone, graphs = _compiled(0, [])
    collapse = dynlens.SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
    watched, watched_graphs = _compiled(0, [collapse])
    assert watched_graphs == graphs
    assert all(torch.equal(a, b) for a, b in zip(alone, watched, strict=True))
    assert collapse.capture.found[0] == "model"  # the compiled module, which runs eagerly
    assert collapse.capture.alignment == Alignment(None, True)
    attached = [*monitors()[:2], dynlens.EarlyWarningMonitor(every_n_steps=1, verbose=False)]
    every, _ = _compiled(0, attached)
    assert all(torch.equal(a, b) for a, b in zip(alone, every, strict=True))
    second = monitors()[:2]
    _compiled(1, second)
    assert all(m.disabled_reason is None for m in [collapse, *attached, *second])
    assert "zero_loss_fraction" in second[0].latest


def test_soft_capped_attention_is_reported_raw_and_said():
    # Gemma 2's cap tanh(s / c) · c before the softmax: the raw q·kᵀ·scale, as SDPA layers
    # report theirs, so that the 1e3/1e4 levels can be reached at all
    torch.manual_seed(0)
    module = LitGPTPretrain(litgpt_config("gemma-2"))
    calls: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    for layer in module.model.modules():
        if hasattr(layer, "scaled_dot_product_attention") and hasattr(layer, "qkv"):
            original = layer.scaled_dot_product_attention
            scale = 1 / math.sqrt(layer.config.head_size)

            def record(q, k, v, mask=None, original=original, scale=scale):
                if torch.is_grad_enabled():
                    calls.append((q.detach().double(), k.detach().double(), scale))
                return original(q, k, v, mask)

            layer.scaled_dot_product_attention = record
    growth = dynlens.LogitGrowthMonitor(every_n_steps=1, attention_every_n_steps=1, verbose=False)
    fit(module, list(tokens(0, length=SEQ + 1)), [growth], steps=1)
    recorder = AttentionRecorder()
    recorder.calls = calls
    raw = recorder.maxima()
    logged = sorted(growth.latest[f"attn_max/{n}"] for n in growth.layers)
    assert len(logged) == 2 and logged == pytest.approx(raw, rel=1e-5)
    assert max(raw) > 0.5  # above the cap: capped scores could not show it
    assert set(growth.attention_capture.capped.values()) == {0.5}
    (said,) = [e["message"] for e in growth.events if e["reason"] == "soft_cap"]
    assert "2 layer(s)" in said and "c = 0.5" in said
