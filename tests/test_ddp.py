"""DDP: every monitor in a real two-process CPU (gloo) run — no hang, one writer, same decisions."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("ddp_run.py")


def test_every_monitor_under_two_process_ddp(tmp_path):
    # a hang would be a collective reached on one rank only: the timeout turns it into a failure
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # every quantity is reduced before it is used: both ranks hold the same values
    assert set(rank0) == set(rank1) and rank0
    for key in rank0:
        if "overhead" in key:  # each rank's own clock
            continue
        a, b = rank0[key], rank1[key]
        assert (math.isnan(a) and math.isnan(b)) or a == b, key
    families = {key.split("/")[1] for key in rank0}
    assert families == {"grokking", "collapse", "hessian", "logits", "continual"}
    # side effects on rank 0 only: one CSV, each dynlens value once per step
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    seen: set[tuple[str, str]] = set()
    for row in rows:
        for key, value in row.items():
            if key.startswith("dynlens/") and value != "":
                assert (key, row["step"]) not in seen, (key, row["step"])
                seen.add((key, row["step"]))
    assert any(key.startswith("dynlens/hessian/") for key, _ in seen)
