import subprocess
import sys

import pytest
from rich.console import Console

from dynlens.cli import main
from dynlens.demo import RUNS, DemoResult, DemoRun, results_table, run_demo
from dynlens.grokking import detect_grokking
from tests.helpers import scalars


def test_table_renders_what_the_reports_say():
    console = Console(width=80, record=True)
    grokked = detect_grokking([0, 209, 4609], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0])
    memorised = detect_grokking([0, 69], [0.0, 1.0], [0.0, 0.001])
    results = [
        DemoResult(RUNS[0], grokked, 0.0, 12.25),
        DemoResult(RUNS[1], memorised, 0.125, -0.3),
        DemoResult(RUNS[2], memorised, None, None),
    ]
    console.print(results_table(results, "(a + b) mod 113"))
    lines = console.export_text().splitlines()
    assert next(line for line in lines if line.startswith("wd ")).split() == [
        "wd",
        "209",
        "4,609",
        "4,400",
        "grokking",
        "0%",
        "12.2",
    ]
    assert next(line for line in lines if line.startswith("no_wd ")).split() == [
        "no_wd",
        "69",
        "—",
        "—",
        "memorization",
        "12%",
        "-0.3",
    ]
    assert next(line for line in lines if line.startswith("stablemax ")).split()[-2:] == [
        "—",
        "—",
    ]
    text = " ".join(line.strip() for line in lines)
    assert "orthograd" not in text and "no_wd: AdamW lr 0.005, wd 0" in text
    assert max(len(line) for line in lines) <= 80


def test_cli_lists_the_demo():
    out = subprocess.run(
        [sys.executable, "-m", "dynlens.cli", "demo", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--logdir" in out.stdout
    with pytest.raises(SystemExit):
        main(["unknown-command"])


@pytest.mark.slow
def test_shrunken_demo_groks_with_weight_decay_and_memorises_without(tmp_path, capsys):
    # The demo's recipe at p = 59 with half the pairs for training: weight decay groks (memorised
    # at ~66, generalised at ~1940 in a plain-torch trial) while no weight decay only memorises.
    runs = (DemoRun("wd", 3e-3, 1.0, 3000), DemoRun("no_wd", 5e-3, 0.0, 300))
    grok, memo = (r.report for r in run_demo(tmp_path, runs=runs, p=59, train_fraction=0.5))
    assert grok.kind == "grokking" and grok.delay >= 1000
    assert memo.kind == "memorization" and memo.memorized_step < 300
    out = capsys.readouterr().out
    assert "grokking" in out and "memorization" in out
    assert f"tensorboard --logdir {tmp_path}" in out
    # both runs logged their curves to TensorBoard, and the table matches what was logged
    logged = scalars(tmp_path / "wd")
    val = logged["dynlens/grokking/val_acc"]
    assert next(s for s, v in val if v >= 0.99) == grok.generalized_step
    assert "dynlens/grokking/train_acc" in scalars(tmp_path / "no_wd")
