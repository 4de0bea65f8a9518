import subprocess
import sys

import pytest
from rich.console import Console

from dynlens.cli import main
from dynlens.demo import RUNS, DemoRun, results_table, run_demo
from dynlens.grokking import detect_grokking
from tests.helpers import scalars


def test_table_renders_what_the_reports_say():
    console = Console(width=80, record=True)
    grokked = detect_grokking([0, 209, 4609], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0])
    memorised = detect_grokking([0, 69], [0.0, 1.0], [0.0, 0.001])
    console.print(results_table([(RUNS[0], grokked), (RUNS[1], memorised)], "(a + b) mod 113"))
    lines = console.export_text().splitlines()
    row = next(line for line in lines if "adamw_wd1" in line).split()
    assert row == ["adamw_wd1", "0.001", "1", "209", "4,609", "4,400", "grokking"]
    row = next(line for line in lines if "adamw_no_wd" in line).split()
    assert row == ["adamw_no_wd", "0.005", "0", "69", "—", "—", "memorization"]
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
    results = run_demo(tmp_path, runs=runs, p=59, train_fraction=0.5)
    (_, grok), (_, memo) = results
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
