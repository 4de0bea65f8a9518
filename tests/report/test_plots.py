"""Figures: what each one marks, checked on the matplotlib objects, and the files written."""

from __future__ import annotations

import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from dynlens.report import build_report
from dynlens.report.family import Context, Options
from dynlens.report.plots import DRAWERS, plot_report


def synthetic_run(directory):
    """Three tasks with a stability gap on tasks 0 and 1; λ_max crossing its threshold."""
    writer = SummaryWriter(str(directory))
    acc = {
        0: [0.5, 0.9, 1.0, 0.4, 0.7, 0.9, 0.9, 0.5, 0.8],
        1: [None, None, None, 0.5, 0.8, 1.0, 0.6, 0.9, 0.95],
        2: [None] * 6 + [0.3, 0.7, 0.9],
    }
    for step in range(9):
        writer.add_scalar("dynlens/continual/task", step // 3, step)
        for task, values in acc.items():
            if values[step] is not None:
                writer.add_scalar(f"dynlens/continual/acc_task_{task}", values[step], step)
        writer.add_scalar("dynlens/hessian/lambda_max", 5.0 * step, step)
        writer.add_scalar("dynlens/hessian/lr", 0.1, step)
        writer.add_scalar("dynlens/hessian/eos_ratio", 0.25 * step, step)
    writer.close()


def draw(report, family):
    run, summary = report.data[0], report.runs[0]
    fig = Figure()
    DRAWERS[family](fig, Context(run, Options()), summary.families[family])
    return fig


def test_continual_figure_shades_one_gap_per_previous_task(tmp_path):
    synthetic_run(tmp_path / "run")
    report = build_report([tmp_path / "run"])
    assert report.runs[0].families["continual"]["tasks"] == [0, 1, 2]
    (ax,) = draw(report, "continual").axes
    shaded = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(shaded) == 2  # tasks 0 and 1; task 2 is still being trained
    assert [line.get_label() for line in ax.get_lines() if line.get_label()[0] != "_"] == [
        "task 0",
        "task 1",
        "task 2",
    ]


def test_hessian_figure_draws_two_over_eta_from_the_learning_rate(tmp_path):
    synthetic_run(tmp_path / "run")
    top, bottom = draw(build_report([tmp_path / "run"]), "hessian").axes
    threshold = next(line for line in top.get_lines() if line.get_label() == "2/η")
    # 2/η by curvature.gd_sharpness_threshold, η the logged lr (0.1 as float32)
    assert threshold.get_ydata().tolist() == [2 / float(np.float32(0.1))] * 9
    assert [line.get_label() for line in bottom.get_lines()][:1] == ["λ_max / threshold"]


def test_grokking_figure_marks_the_detected_steps(monitored_run):
    report = build_report([monitored_run[0]])
    (ax,) = draw(report, "grokking").axes
    marks = {line.get_label(): line.get_xdata()[0] for line in ax.get_lines()}
    assert marks["memorised (9)"] == 9 and marks["generalised (19)"] == 19


def test_plot_report_writes_only_the_families_present(tmp_path):
    synthetic_run(tmp_path / "logs" / "a/b")
    written = plot_report(build_report([tmp_path / "logs"]), tmp_path / "fig")
    assert sorted(p.name for p in written) == ["a_b_continual.png", "a_b_hessian.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
