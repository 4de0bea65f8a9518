"""examples/edge_of_stability.py reproduces Cohen et al. (2021), fig. 1, shrunk: read from the logs.

Full-batch gradient descent on a tanh MLP: η·λ_max/2 climbs from about 0.65 to 1 (progressive
sharpening), overshoots for a few dozen steps (the catapult), then hovers just above 1. The
assertions are on the values HessianMonitor logged to TensorBoard, as a user would see them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import scalars

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "edge_of_stability.py"
RATIO = "dynlens/hessian/eos_ratio"


def load():
    spec = importlib.util.spec_from_file_location("edge_of_stability", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_and_says_where_its_logs_went(tmp_path, capsys):
    logdir = load().main(max_steps=3, logdir=tmp_path, every_n_steps=2, num_probes=3)
    assert [s for s, _ in scalars(logdir)[RATIO]] == [0, 2]
    assert scalars(logdir)["dynlens/hessian/eos_threshold"][0][1] == pytest.approx(2 / 0.4)
    assert f"tensorboard --logdir {tmp_path}" in capsys.readouterr().out


@pytest.mark.slow
def test_gradient_descent_reaches_and_stays_at_the_edge_of_stability(tmp_path):
    logdir = load().main(max_steps=700, logdir=tmp_path, every_n_steps=20)
    ratios = scalars(logdir)[RATIO]
    assert [s for s, _ in ratios] == list(range(0, 700, 20))
    assert ratios[0][1] < 0.8  # it starts well below the edge: the climb is the network's doing
    reached = next((step for step, ratio in ratios if ratio >= 0.9), None)
    assert reached is not None, ratios
    # after the catapult transient, every measurement stays near 1 for hundreds of steps
    settled = [ratio for step, ratio in ratios if step >= reached + 200]
    assert len(settled) >= 15
    assert all(0.8 <= ratio <= 1.25 for ratio in settled), settled
    thresholds = [value for _, value in scalars(logdir)["dynlens/hessian/eos_threshold"]]
    assert thresholds == pytest.approx([2 / 0.4] * len(ratios))
