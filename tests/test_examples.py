"""The example scripts run as users run them (shortened)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from dynlens.callbacks.schedule import dense_cadence
from dynlens.early_warning import DENSE_POINTS
from tests.helpers import scalars

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # registered like an imported module, so dataclasses and pickling inside examples work
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_grokking_example_logs_the_monitor(tmp_path, capsys):
    report = load("grokking").main(max_steps=20, logdir=str(tmp_path))
    assert report.kind == "confusion"  # 20 steps: nothing reached yet
    logged = scalars(tmp_path / "grokking")
    assert [s for s, _ in logged["dynlens/grokking/val_acc"]] == [9, 19]
    assert f"tensorboard --logdir {tmp_path}" in capsys.readouterr().out


def test_softmax_collapse_example_logs_the_monitor(tmp_path, capsys):
    monitor = load("softmax_collapse").main(max_steps=12, logdir=str(tmp_path))
    assert monitor.onset_step is None  # 12 steps: long before collapse
    logged = scalars(tmp_path / "softmax_collapse")
    assert [s for s, _ in logged["dynlens/collapse/sc_fraction"]] == [0, 5, 10]
    assert "dynlens/collapse/nlm_cosine/net.0.weight" in logged
    assert "loss now uses softmax" in capsys.readouterr().out


def test_hf_causal_lm_example_logs_every_monitor_with_nothing_named(tmp_path, capsys):
    collapse, logits, *_ = load("hf_causal_lm").main(
        max_steps=6, attention="eager", logdir=str(tmp_path)
    )
    logged = scalars(tmp_path / "hf_causal_lm_eager")
    layers = ["model.transformer.h.0.attn", "model.transformer.h.1.attn"]
    assert logits.layers == layers
    assert all(f"dynlens/logits/attn_max/{layer}" in logged for layer in layers)
    assert "dynlens/collapse/zero_loss_fraction" in logged and "dynlens/hessian/trace" in logged
    assert collapse.capture.causal_lm and logits.capture.found[0] == "model"
    out = capsys.readouterr().out
    assert "batch['labels'], shifted by one position" in out and "reproduces the loss" in out
    assert f"tensorboard --logdir {tmp_path}" in out


def test_litgpt_example_logs_every_monitor_with_nothing_named(tmp_path, capsys):
    collapse, logits, _, early, *_ = load("litgpt_pretrain").main(
        max_steps=6, chunk=4, logdir=str(tmp_path)
    )
    logged = scalars(tmp_path / "litgpt_pretrain_chunk4")
    layers = ["model.transformer.h.0.attn", "model.transformer.h.1.attn"]
    assert logits.layers == layers
    assert all(f"dynlens/logits/attn_max/{layer}" in logged for layer in layers)
    assert "dynlens/collapse/zero_loss_fraction" in logged and "dynlens/hessian/trace" in logged
    assert "dynlens/warning/collapse/gap_median" in logged
    for monitor in (collapse, logits, early):
        assert monitor.capture.found[0] == "model" and monitor.capture.how == "chunks"
    assert collapse.capture.alignment.key is None and collapse.capture.alignment.shift
    out = capsys.readouterr().out
    assert "targets: the batch, shifted by one position" in out


def test_early_warning_example_logs_the_forecast(tmp_path, capsys):
    monitor = load("early_warning").main(max_steps=200, logdir=str(tmp_path))
    assert monitor.happened == {"collapse": None}  # 200 steps: long before collapse
    logged = scalars(tmp_path / "early_warning")
    steps = [s for s, _ in logged["dynlens/warning/collapse/gap_median"]]
    # measured densely early on (every step at first), then every 10 steps
    dense = [s for s in range(200) if s % dense_cadence(s, 10, DENSE_POINTS) == 0]
    assert steps == dense and steps[:4] == [0, 1, 2, 3] and steps[-3:] == [170, 180, 190]
    assert logged["dynlens/warning/collapse/threshold"][0][1] == pytest.approx(24 * math.log(2))
    assert "collapse happened at step None" in capsys.readouterr().out
