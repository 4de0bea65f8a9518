"""One summariser per monitor family, each checked against the pure function it must reuse."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from dynlens.continual import ContinualMetrics
from dynlens.grokking import detect_grokking
from dynlens.logits import log_growth_rate
from dynlens.report import build_report
from dynlens.report.family import Column, Context, Options, family, fmt_float
from dynlens.report.reader import read_run
from dynlens.report.registry import FAMILIES
from dynlens.report.summary import summarise_run


def f32(x: float) -> float:
    return float(np.float32(x))


def write(directory: Path, scalars: dict[str, dict[int, float]], texts=()) -> Path:
    writer = SummaryWriter(str(directory))
    for tag, points in scalars.items():
        for step, value in points.items():
            writer.add_scalar(tag, value, step)
    for tag, step, text in texts:
        writer.add_text(tag, text, step)
    writer.close()
    return directory


def summarise(directory: Path, **options) -> dict:
    summary = summarise_run(read_run(directory), Options(**options))
    return summary.families | {"__notes__": summary.notes}


G = "dynlens/grokking/"
C = "dynlens/collapse/"
H = "dynlens/hessian/"
T = "dynlens/continual/"


def test_grokking_is_detect_grokking_on_the_logged_curves(tmp_path):
    steps = [0, 100, 200, 1500, 2600]
    train = [0.1, 0.995, 1.0, 1.0, 1.0]
    val = [0.0, 0.02, 0.3, 0.5, 0.995]
    write(
        tmp_path,
        {
            G + "train_acc": dict(zip(steps, train, strict=True)),
            G + "val_acc": dict(zip(steps, val, strict=True)),
            G + "weight_norm": {2600: 12.5},
            G + "memorized_step": {100: 100},
        },
    )
    got = summarise(tmp_path)
    expected = detect_grokking(steps, [f32(a) for a in train], [f32(a) for a in val])
    assert got["grokking"] == {
        "evaluations": 5,
        "threshold": 0.99,
        "memorized_step": 100,
        "generalized_step": 2600,
        "delay": 2500,
        "kind": "grokking",
        "transition_steps": expected.transition_steps,
        "final_train_acc": 1.0,
        "final_val_acc": f32(0.995),
        "final_weight_norm": 12.5,
    }
    assert (expected.memorized_step, expected.generalized_step) == (100, 2600)
    assert got["__notes__"] == [] and set(got) == {"grokking", "__notes__"}
    # another threshold moves the steps, and the disagreement with the logged step is named
    other = summarise(tmp_path, threshold=0.999, grokking_delay=5000)
    assert other["grokking"]["memorized_step"] == 200
    assert other["grokking"]["kind"] == "memorization"
    (note,) = other["__notes__"]
    assert note.startswith(f"{tmp_path}: the monitor logged memorized_step 100")
    assert "--threshold" in note


def test_grokking_uses_only_steps_where_both_accuracies_exist(tmp_path):
    write(tmp_path, {G + "train_acc": {0: 0.5, 5: 1.0, 10: 1.0}, G + "val_acc": {0: 0.0, 10: 1.0}})
    got = summarise(tmp_path)["grokking"]
    assert got["evaluations"] == 2
    assert (got["memorized_step"], got["generalized_step"]) == (10, 10)


def test_collapse_onset_from_the_event_else_from_sc_fraction(tmp_path):
    scalars = {
        C + "sc_fraction": {0: 0.0, 10: 0.4, 20: 0.6, 30: 0.9, 40: 0.8},
        C + "headroom_median": {0: 10.0, 40: -2.5},
        C + "headroom_min": {0: 5.0, 40: -7.0},
        C + "threshold": {0: 36.7368005696771},
        C + "zero_loss_fraction": {0: 0.0, 30: 0.25},
        C + "nlm_cosine": {40: 0.9},
    }
    got = summarise(write(tmp_path / "scalars_only", scalars))["collapse"]
    assert got == {
        "measurements": 5,
        "onset_step": 20,
        "onset_source": "sc_fraction",
        "peak_sc_fraction": f32(0.9),
        "peak_step": 30,
        "final_sc_fraction": f32(0.8),
        "peak_zero_loss_fraction": 0.25,
        "final_headroom_median": -2.5,
        "final_headroom_min": -7.0,
        "threshold": f32(36.7368005696771),
        "dtype": "float64",
        "final_nlm_cosine": f32(0.9),
        "remedy_step": None,
    }
    # A monitor with onset_threshold=0.3 announced the onset at step 10: the event wins. These
    # texts carry no reason (as written before events did): read by their wording, the legacy path.
    events = [
        (C + "events", 0, "step 0: measuring softmax collapse in float64 (threshold 36.74)"),
        (C + "events", 10, "step 10: Softmax Collapse onset: 40.0% of samples collapsed (> 30%)"),
        (C + "events", 10, "step 10: switched 1 dynlens.CrossEntropyLoss to StableMax (remedy)"),
    ]
    got = summarise(write(tmp_path / "with_events", scalars, events))["collapse"]
    assert (got["onset_step"], got["onset_source"], got["remedy_step"]) == (10, "event", 10)
    # With their reasons the wording is not read: the onset and remedy events at step 12 count,
    # the old wording at step 10 under another reason does not.
    events = [
        (C + "events", 10, "`precision` · step 10: Softmax Collapse onset (remedy)"),
        (C + "events", 12, "`onset` · step 12: the logits outgrew float64"),
        (C + "events", 12, "`remedy` · step 12: switched to StableMax"),
    ]
    got = summarise(write(tmp_path / "with_reasons", scalars, events))["collapse"]
    assert (got["onset_step"], got["onset_source"], got["remedy_step"]) == (12, "event", 12)
    # never above the onset threshold: no onset
    got = summarise(write(tmp_path / "none", {C + "sc_fraction": {0: 0.1, 5: 0.5}}))["collapse"]
    assert (got["onset_step"], got["onset_source"], got["dtype"]) == (None, None, None)


def test_hessian_ratios_peak_final_and_share_at_or_above_one(tmp_path):
    write(
        tmp_path,
        {
            H + "lambda_max": {0: 10.0, 10: 40.0, 20: 25.0, 30: 20.0},
            H + "eos_ratio": {0: 0.5, 10: 2.0, 20: 1.25, 30: 1.0},
            H + "trace_ratio": {0: 0.1, 10: 0.2, 20: 0.3, 30: 0.25},
            H + "trace": {30: 50.0},
            H + "lr": {30: 0.1},
        },
    )
    got = summarise(tmp_path)
    assert got["hessian"] == {
        "measurements": 4,
        "peak_eos_ratio": 2.0,
        "final_eos_ratio": 1.0,
        "share_eos_ratio_at_least_1": 0.75,
        "peak_trace_ratio": f32(0.3),
        "final_trace_ratio": 0.25,
        "share_trace_ratio_at_least_1": 0.0,
        "peak_precond_ratio": None,
        "final_precond_ratio": None,
        "final_lambda_max": 20.0,
        "final_trace": 50.0,
        "final_lr": f32(0.1),
    }
    assert set(got) == {"hessian", "__notes__"}


def test_logits_peak_attention_growth_rate_and_log_z_drift(tmp_path):
    steps = [0, 100, 200, 300]
    max_abs = [2.0 * math.exp(0.003 * s) for s in steps]
    L = "dynlens/logits/"
    write(
        tmp_path,
        {
            L + "max_abs": dict(zip(steps, max_abs, strict=True)),
            L + "logz_mean": {0: 2.5, 100: 3.0, 200: -1.0, 300: 4.0},
            L + "growth_rate": {300: 3.0},
            L + "attn_max": {0: 5.0, 100: 900.0, 200: 1500.0, 300: 1200.0},
            L + "attn_max/blocks.0.attn": {0: 5.0, 200: 1500.0},
            L + "attn_max/blocks.1.attn": {0: 4.0, 200: 700.0},
        },
    )
    got = summarise(tmp_path)["logits"]
    rate = log_growth_rate(steps, [f32(v) for v in max_abs])
    assert rate == pytest.approx(3.0, abs=1e-4)
    assert got == {
        "measurements": 4,
        "peak_attention_logit": 1500.0,
        "peak_attention_step": 200,
        "peak_attention_layer": "blocks.0.attn",
        "final_attention_logit": 1200.0,
        "peak_max_abs": f32(max_abs[-1]),
        "final_max_abs": f32(max_abs[-1]),
        "growth_rate": rate,
        "final_growth_rate": 3.0,
        "first_logz_mean": 2.5,
        "final_logz_mean": 4.0,
        "logz_drift": 1.5,
        "max_abs_logz_mean": 4.0,
    }


def test_optimizer_gradient_range_fastest_block_spikes_and_eps_share(tmp_path):
    opt = "dynlens/optimizer/"
    write(
        tmp_path,
        {
            opt + "grad_norm": {0: 2.0, 10: 0.5, 20: float("nan"), 30: 8.0},
            opt + "update_to_weight": {0: 1e-3, 10: 2e-3, 30: 4e-3},
            opt + "update_to_weight/layers.0": {0: 1e-3, 10: 1e-3, 30: 1e-3},
            opt + "update_to_weight/head": {0: 5e-3, 10: 6e-3, 30: 9e-3},
            opt + "adam/eps_share": {10: 0.25, 30: 0.5},
        },
        texts=[(opt + "events", 30, "`gradient_spike` · step 30: the gradient norm 8 is ...")],
    )
    assert summarise(tmp_path)["optimizer"] == {
        "measurements": 3,  # finite values
        "grad_norm_min": 0.5,
        "grad_norm_median": 2.0,
        "grad_norm_max": 8.0,
        "update_to_weight_median": f32(2e-3),
        "largest_update_block": "head",
        "largest_update_to_weight": f32(6e-3),
        "spikes": 1,
        "first_spike_step": 30,
        "eps_share_final": 0.5,
    }


def test_continual_replays_continual_metrics_on_the_logged_accuracies(tmp_path):
    # The stability gap of task 0 while task 1 is learned (ContinualMetrics' docstring example),
    # logged as ContinualEvaluation logs it: acc_task_<t> and the current task at each step.
    a0 = {0: 0.5, 1: 0.8, 2: 1.0, 3: 0.6, 4: 0.5, 5: 0.8, 6: 0.95}
    a1 = {3: 0.3, 4: 0.6, 5: 0.8, 6: 0.9}
    task = {s: (0 if s < 3 else 1) for s in a0}
    write(
        tmp_path,
        {
            T + "acc_task_0": a0,
            T + "acc_task_1": a1,
            T + "task": task,
            T + "wf_10": {6: 0.5},
            T + "acc": {6: (0.95 + 0.9) / 2},
        },
    )
    got = summarise(tmp_path)
    reference = ContinualMetrics(windows=(10,))
    reference.start_task(0)
    for s in range(3):
        reference.update(s, {0: f32(a0[s])})
    reference.start_task(1)
    for s in range(3, 7):
        reference.update(s, {0: f32(a0[s]), 1: f32(a1[s])})
    r = reference.summary()
    c = got["continual"]
    assert c["tasks"] == [0, 1] and c["evaluations"] == 7
    assert (c["acc"], c["min_acc"], c["wc_acc"]) == (r["acc"], r["min_acc"], r["wc_acc"])
    assert c["acc"] == pytest.approx(0.925) and c["wc_acc"] == pytest.approx(0.7)
    assert c["wf"] == {"10": r["wf"][10]} and c["wp"] == {"10": r["wp"][10]}
    assert (c["worst_gap_task"], c["worst_gap"]) == (0, pytest.approx(0.5))
    assert c["worst_gap_recovery"] == pytest.approx(0.45)
    assert c["per_task"]["0"] == {
        "final_acc": f32(0.95),
        "gap": r["gap"][0],
        "recovery": r["recovery"][0],
        "recovery_steps": None,
    }
    assert c["per_task"]["1"]["gap"] is None
    assert got["__notes__"] == []


def test_a_run_shows_only_the_families_it_logged(tmp_path):
    write(tmp_path, {C + "sc_fraction": {0: 0.0}, "train_loss": {0: 1.0}})
    assert set(summarise(tmp_path)) == {"collapse", "__notes__"}
    assert set(summarise(tmp_path, prefix="other")) == {"__notes__"}


def test_every_registered_family_declares_its_columns_and_a_docstring():
    for fam in FAMILIES.values():
        assert fam.summarise.__doc__, fam.name
        if fam.rows is None:
            assert {c.field for c in fam.columns} <= set(fam.fields)
        else:  # the columns show keys of the items of one list-valued field
            assert fam.rows in fam.fields
    with pytest.raises(ValueError, match=r"columns \['nope'\]"):
        family("x", order=1, title="x", fields=("a",), columns=(Column("nope", "n"),), registry={})


def test_a_family_is_added_by_one_function(tmp_path):
    registry = dict(FAMILIES)

    @family(
        "spikes",
        order=65,
        title="Loss spikes",
        fields=("measurements", "largest_spike"),
        columns=(Column("largest_spike", "largest spike", fmt_float(1)),),
        registry=registry,
    )
    def spikes(ctx: Context):
        """Largest loss spike per layer."""
        layers = ctx.matching("spikes", r"loss_ratio/layer_\d+")
        if not layers:
            return None
        return {
            "measurements": len(layers),
            "largest_spike": max(ctx.peak(s) for s in layers.values()),
        }

    # at its declared place: after logits (60), before continual (70)
    assert list(registry)[-4:] == ["logits", "spikes", "continual", "warning"]
    write(tmp_path / "run", {"dynlens/spikes/loss_ratio/layer_0": {0: 3.0, 1: 250.5}})
    write(tmp_path / "other", {C + "sc_fraction": {0: 0.0}})
    report = build_report([tmp_path], families=registry)
    by_name = {r.name: r for r in report.runs}
    assert by_name["run"].families == {"spikes": {"measurements": 1, "largest_spike": 250.5}}
    assert "spikes" not in by_name["other"].families
    assert "spikes" not in FAMILIES
    out = Console(file=io.StringIO(), width=100)
    out.print(report)
    assert ["run", "250.5"] in [line.split() for line in out.file.getvalue().splitlines()]


def test_a_rows_family_shows_a_row_per_item_and_its_items_are_checked(tmp_path):
    registry: dict = {}
    with pytest.raises(ValueError, match=r"rows 'items' of family 'x'"):
        family("x", order=1, title="x", fields=("a",), columns=(), rows="items", registry=registry)

    @family(
        "spikes",
        order=1,
        title="Loss spikes",
        fields=("spikes",),
        columns=(Column("step", "step"), Column("ratio", "ratio", fmt_float(1))),
        rows="spikes",
        registry=registry,
    )
    def spikes(ctx: Context):
        """Every logged spike."""
        ratio = ctx.series("spikes", "loss_ratio")
        if ratio is None:
            return None
        points = zip(ratio.steps.tolist(), ratio.values.tolist(), strict=True)
        return {"spikes": [{"step": s, "ratio": v} for s, v in points if v > 10]}

    write(tmp_path / "two", {"dynlens/spikes/loss_ratio": {3: 12.5, 4: 1.0, 7: 250.5}})
    write(tmp_path / "none", {"dynlens/spikes/loss_ratio": {3: 1.0}})
    out = Console(file=io.StringIO(), width=100)
    out.print(build_report([tmp_path], families=registry))
    lines = [line.split() for line in out.file.getvalue().splitlines()]
    assert [line for line in lines if line[:1] in (["two"], ["none"])][-3:] == [
        ["none", "—", "—"],
        ["two", "3", "12.5"],
        ["two", "7", "250.5"],
    ]

    @family(
        "bad",
        order=2,
        title="b",
        fields=("items",),
        columns=(Column("k", "k"),),
        rows="items",
        registry=registry,
    )
    def bad(ctx: Context):
        """Items without the column's key: a programming error, raised."""
        return {"items": [{"other": 1}]}

    with pytest.raises(RuntimeError, match="not a list of mappings with the keys"):
        summarise_run(read_run(tmp_path / "two"), registry=registry)


def test_a_failing_summariser_becomes_a_note_and_the_others_still_report(tmp_path):
    registry = dict(FAMILIES)

    @family("broken", order=90, title="b", fields=("x",), columns=(), registry=registry)
    def broken(ctx: Context):
        """Always fails."""
        raise ZeroDivisionError("boom")

    write(tmp_path, {C + "sc_fraction": {0: 0.0}})
    summary = summarise_run(read_run(tmp_path), registry=registry)
    assert set(summary.families) == {"collapse"}
    assert summary.notes == [f"{tmp_path}: the broken summary failed: ZeroDivisionError: boom"]

    @family("liar", order=91, title="l", fields=("x",), columns=(), registry=registry)
    def liar(ctx: Context):
        """Returns an undeclared field: a programming error, raised."""
        return {"y": 1}

    with pytest.raises(RuntimeError, match="returned fields"):
        summarise_run(read_run(tmp_path), registry=registry)
