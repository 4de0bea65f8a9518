"""The example scripts run as users run them (shortened)."""

import importlib.util
from pathlib import Path

from tests.helpers import scalars

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grokking_example_logs_the_monitor(tmp_path, capsys):
    report = load("grokking").main(max_steps=20, logdir=str(tmp_path))
    assert report.kind == "confusion"  # 20 steps: nothing reached yet
    logged = scalars(tmp_path / "grokking")
    assert [s for s, _ in logged["dynlens/grokking/val_acc"]] == [9, 19]
    assert f"tensorboard --logdir {tmp_path}" in capsys.readouterr().out
