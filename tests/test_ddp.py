"""DDP: every monitor in real two-process CPU (gloo) runs — no hang, one writer, same decisions,
and the values a single process computes on the same global batches."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_run.py")


def launch(out: Path, mode: str, devices: int) -> list[dict]:
    # a hang would be a collective reached on one rank only: the timeout turns it into a failure
    out.mkdir()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), mode, str(devices)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def logged(out: Path) -> dict[str, dict[int, float]]:
    """Rank 0's CSV: every dynlens value by step; fails if one was written twice at a step."""
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    found: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(("dynlens/", "budget/")) and value != "":
                step = int(row["step"])
                assert step not in found.setdefault(key, {}), (key, step)
                found[key][step] = float(value)
    return found


def test_every_monitor_under_two_process_ddp(tmp_path):
    rank0, rank1 = launch(tmp_path / "ddp", "contract", 2)
    # every quantity is reduced before it is used: both ranks hold the same values
    assert set(rank0["values"]) == set(rank1["values"]) and rank0["values"]
    for key, a in rank0["values"].items():
        if "overhead" in key:  # each rank's own clock
            continue
        b = rank1["values"][key]
        assert (math.isnan(a) and math.isnan(b)) or a == b, key
    families = {key.split("/")[1] for key in rank0["values"]}
    assert families == {
        "grokking", "collapse", "hessian", "logits", "continual", "warning", "optimizer"
    }  # fmt: skip
    # rank 0 decides the budget schedule and broadcasts it: the same steps on every rank
    assert rank0["budget_steps"] and rank0["budget_steps"] == rank1["budget_steps"]
    evaluated = rank0["continual_budget_steps"]
    assert evaluated and evaluated == rank1["continual_budget_steps"]
    # side effects on rank 0 only: one CSV, each value once per step (checked by `logged`)
    values = logged(tmp_path / "ddp")
    assert any(key.startswith("dynlens/hessian/") for key in values)
    assert sorted(values["budget/hessian/trace"]) == rank0["budget_steps"]
    # per-block traces are reduced with the total: every block at every measured step
    blocks = [key for key in values if key.startswith("budget/hessian/trace/")]
    assert blocks and all(sorted(values[key]) == rank0["budget_steps"] for key in blocks)
    # the spectral density: the ranks' quadratures pooled in one collective, the same on both
    # (its top eigenvalues are among the values compared above), at every measured step
    for i in (1, 2):
        assert sorted(values[f"budget/hessian/spectrum_top/{i}"]) == rank0["budget_steps"]
    spectrum = rank0["spectrum"]
    assert spectrum is not None and spectrum == rank1["spectrum"]
    assert spectrum["step"] == rank0["budget_steps"][-1]
    # each rank's run of 4 Lanczos steps gives at most 4 nodes, each rank's weights sum to 1/2
    assert 2 < len(spectrum["nodes"]) <= 8
    assert sum(spectrum["weights"]) == pytest.approx(1.0, rel=1e-9)
    # an evaluation after optimizer step k is logged at Lightning's step k - 1
    assert sorted(values["budget/continual/acc_task_0"]) == [k - 1 for k in evaluated]


# Quantities that do not decompose over shards: each rank's median of its own samples (their
# mean is logged), each rank's own Hessian probes (checked separately), wall-clock ratios.
NOT_DECOMPOSABLE = (
    "dynlens/collapse/headroom_median",
    "dynlens/hessian/",
    "overhead",
    "dynlens/warning/collapse/gap_median",
    "dynlens/warning/collapse/steps_to",
)


def test_ddp_values_equal_one_process_on_the_same_global_batch(tmp_path):
    ranks = launch(tmp_path / "ddp", "values", 2)
    launch(tmp_path / "single", "values", 1)
    ddp, single = logged(tmp_path / "ddp"), logged(tmp_path / "single")
    assert set(ddp) == set(single)
    compared = set()
    for key, points in single.items():
        if key.startswith(NOT_DECOMPOSABLE) or key.endswith(NOT_DECOMPOSABLE):
            continue
        # shard sums, counts and maxima, reduced: the global batch's value up to the rounding of
        # DDP's averaged gradients after the first step
        assert ddp[key] == pytest.approx(points, rel=1e-4, abs=1e-6), key
        compared.add(key.split("/")[1])
    assert compared == {"grokking", "collapse", "logits", "continual", "warning", "optimizer"}
    # two steps per logging interval: collapse and logit statistics pooled over both
    assert sorted(ddp["dynlens/collapse/sc_fraction"]) == [1, 3]
    assert sorted(ddp["dynlens/logits/attn_max/block"]) == [1, 3]
    assert "dynlens/logits/attn_max/block" in single, "attention maxima not compared"
    # the trace does not decompose into shards with shared probes: it is the mean of the ranks'
    # own estimates, each recomputed here with the pure estimator and the same probes
    trace = ddp["dynlens/hessian/trace"]
    assert trace
    for step, value in trace.items():
        own = [rank["local_trace"][str(step)] for rank in ranks]
        assert value == pytest.approx(sum(own) / len(own), rel=1e-5), step
