"""Every monitor on the models people train: Hugging Face GPT-2, Llama (grouped-query attention,
RoPE), BERT (padding mask), a BatchNorm ResNet, and Lightning's demo Transformer, each built from
a tiny config and wrapped as a user wraps it, with nothing named for the monitors."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import dynlens
from tests.helpers import custom_scalars_layout, tb_logger
from tests.helpers import trainer as make_trainer

from .models import CASES, SEQ, Case, Recorder, Wrapped, gpt2, lm_batches

BY_NAME = {case.name: case for case in CASES}


def every_monitor(case: Case, every: int = 1) -> list[dynlens.Monitor]:
    return [
        dynlens.SoftmaxCollapseMonitor(every_n_steps=every, verbose=False),
        dynlens.LogitGrowthMonitor(
            every_n_steps=every, attention_every_n_steps=every, verbose=False
        ),
        dynlens.HessianMonitor(every_n_steps=every, num_probes=2, max_iter=3, verbose=False),
        dynlens.ContinualEvaluation(
            {0: DataLoader(case.batches(1), batch_size=4)},
            forward_fn=case.forward_fn,
            subset_size=4,
            verbose=False,
        ),
        dynlens.GrokkingMonitor(verbose=False),
    ]


def fit(case: Case, callbacks: list, max_steps: int = 3, **kwargs) -> pl.LightningModule:
    torch.manual_seed(0)
    module = case.make()
    loader = DataLoader(
        case.batches(0), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    trainer = make_trainer(max_steps=max_steps, callbacks=callbacks, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*saw no attention call")  # the ResNet
        warnings.filterwarnings("ignore", message=".*GrokkingMonitor")  # no accuracies logged
        trainer.fit(module, loader)
    return module


@pytest.fixture(scope="module", params=[c.name for c in CASES])
def case(request) -> Case:
    return BY_NAME[request.param]


def test_every_monitor_changes_nothing_and_logs(case):
    reference = [p.detach().clone() for p in fit(case, [], logger=False).parameters()]
    monitors = every_monitor(case)
    module = fit(case, monitors, logger=False)
    trained = list(module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(trained, reference, strict=True))
    buffers = {n: b for n, b in module.named_buffers() if "running" in n}
    assert all(torch.isfinite(b).all() for b in buffers.values())  # BatchNorm: trained normally
    collapse, logits, hessian, continual, _ = monitors
    assert all(m.disabled_reason is None for m in monitors), [m.disabled_reason for m in monitors]
    for monitor in (collapse, logits):
        (found,) = [e for e in monitor.events if e["reason"] == "logits_found"]
        assert monitor.capture.found[0] == case.found, found
    assert 0.0 <= collapse.latest["sc_fraction"] <= 1.0
    assert math.isfinite(logits.latest["logz_mean"])
    assert math.isfinite(hessian.latest["trace"]) and math.isfinite(hessian.latest["lambda_max"])
    assert 0.0 <= continual.metrics.summary()["acc"] <= 1.0
    assert collapse.capture.causal_lm is case.causal_lm
    if case.name == "resnet":
        assert logits.attention_seen is False and not logits.layers
    else:
        assert logits.attention_seen and logits.layers
        assert all(math.isfinite(logits.latest[f"attn_max/{n}"]) for n in logits.layers)


@pytest.mark.parametrize("name", [c.name for c in CASES if c.attention])
def test_attention_maxima_equal_a_brute_force_from_each_layers_q_and_k(name):
    case = BY_NAME[name]
    monitor = dynlens.LogitGrowthMonitor(every_n_steps=1, attention_every_n_steps=1, verbose=False)
    recorders = []

    class Record(pl.Callback):  # the same forward the monitor measures: dropout masks and all
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            recorders.append(Recorder(module, case.attention, batch))

        def on_train_batch_end(self, trainer, module, *args):
            recorders[-1].close()

    fit(case, [Record(), monitor], max_steps=1, logger=False)
    expected = recorders[0].statistics()
    assert sorted(monitor.layers) == sorted(expected)
    for layer, (maximum, rms) in expected.items():
        assert monitor.latest[f"attn_max/{layer}"] == pytest.approx(maximum, rel=1e-5)
        assert monitor.latest[f"attn_rms/{layer}"] == pytest.approx(rms, rel=1e-5)


def _confident_lm() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A GPT-2 whose logits are huge (embeddings × 100, tied to the head), and labels whose
    shifted reading is the model's own prediction: shifted, almost every position has a loss of
    exactly 0; unshifted, few do."""
    torch.manual_seed(0)
    model = gpt2("sdpa", dropout=0.0)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(100.0)
        ids = lm_batches(0)[0]["input_ids"][None].repeat(4, 1)
        ids[:, 0] = torch.arange(4)
        predicted = model(input_ids=ids).logits.argmax(-1)
    labels = ids.clone()
    labels[:, 1:] = predicted[:, :-1]
    return model, {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("shift", ["auto", False])
def test_causal_lm_targets_are_shifted(shift):
    model, batch = _confident_lm()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"]
    per_position = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none"
    )
    shifted = (per_position == 0).sum().item() / labels.numel()  # the last position: no target
    unshifted = (
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none") == 0
    ).sum().item() / labels.numel()
    assert shifted > 0.8 and unshifted < 0.5  # the two readings differ

    monitor = dynlens.SoftmaxCollapseMonitor(every_n_steps=1, shift_targets=shift, verbose=False)
    module = Wrapped(model)
    trainer = make_trainer(max_steps=1, callbacks=[monitor], logger=False)
    trainer.fit(module, DataLoader([{k: v[i] for k, v in batch.items()} for i in range(4)], 4))
    expected = shifted if shift == "auto" else unshifted
    assert monitor.latest["zero_loss_fraction"] == pytest.approx(expected, abs=1e-12)
    (said,) = [e["message"] for e in monitor.events if e["reason"] == "targets"]
    assert ("shifted by one position" in said) is (shift == "auto")
    assert ("reproduces the loss" in said) is (shift == "auto")  # False: by hand


def test_shift_is_decided_by_the_model_not_the_shape():
    # BERT's masked-LM logits are (B, T, V) like a causal LM's, but scored position by position
    monitor = dynlens.SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
    fit(BY_NAME["bert-eager"], [monitor], max_steps=1, logger=False)
    assert monitor.capture.causal_lm is False
    assert SEQ > 1 and "zero_loss_fraction" in monitor.latest


def test_layout_charts_only_what_the_run_logs(tmp_path):
    def charts(case: Case, where) -> set[str]:
        monitor = dynlens.LogitGrowthMonitor(
            every_n_steps=1, attention_every_n_steps=1, verbose=False
        )
        fit(case, [monitor], max_steps=2, logger=tb_logger(where))
        layout = custom_scalars_layout(where)
        assert [c.title for c in layout.category] == ["dynlens/logits"]  # one merged layout
        return {chart.title for c in layout.category for chart in c.chart}

    cnn = charts(BY_NAME["resnet"], tmp_path / "cnn")
    lm = charts(BY_NAME["gpt2-eager"], tmp_path / "lm")
    assert "max attention logit per layer" not in cnn and "output logits" in cnn
    assert "max attention logit per layer" in lm and "output logits" in lm
