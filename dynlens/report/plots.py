"""PNG figures of a report (``dynlens report --plot DIR``); needs ``pip install "dynlens[plot]"``.

One figure per run and monitor family whose data exist, named ``<run>_<family>.png`` (the run's
name with every character other than letters, digits, ``.``, ``-`` and ``_`` replaced by ``_``):

* ``grokking``: training and validation accuracy, the threshold, and the detected memorisation
  and generalisation steps marked;
* ``collapse``: the Softmax Collapse share (and exact-zero-loss share) above, the headroom to the
  collapse threshold below (0 = collapse), the onset marked;
* ``hessian``: λ_max against its stability threshold (``eos_threshold``, else 2/η from the
  logged learning rate) above, the stability ratios against 1 below;
* ``hessian_spectrum``: the Hessian's eigenvalue density at the first and the last measured step
  (the ``spectrum`` histograms ``HessianMonitor(density=True)`` writes, smoothed as
  :func:`dynlens.curvature.smoothed_density` smooths them, σ = 1% of their span; log scale), the
  top eigenvalues marked;
* ``continual``: every task's accuracy, task starts marked, and each stability gap shaded — the
  area between a task's end-of-task accuracy and its accuracy afterwards, where lower.

matplotlib is imported only here and only when a figure is drawn, through its object-oriented
``Figure`` API (no pyplot, no global state, no display needed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..curvature import gd_sharpness_threshold, smoothed_density
from .eventfile import Histogram
from .families.continual import task_boundaries
from .family import Context, Options
from .reader import RunData, Series
from .summary import RunSummary

if TYPE_CHECKING:
    from . import Report

__all__ = ["PlotError", "plot_report", "require_matplotlib"]

MISSING_MATPLOTLIB = (
    'plotting needs matplotlib, which is not installed: pip install "dynlens[plot]" '
    "(or pip install matplotlib)"
)


class PlotError(RuntimeError):
    """Figures cannot be drawn (matplotlib missing); the message says how to fix it."""


def require_matplotlib() -> Any:
    """matplotlib's ``Figure`` class, imported now; :class:`PlotError` saying how to install it
    when it is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotError(MISSING_MATPLOTLIB) from exc
    return Figure


def slug(name: str) -> str:
    """File-name-safe version of a run name.

    >>> slug("wd/version_0")
    'wd_version_0'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _line(ax: Any, series: Series | None, label: str, **kwargs: Any) -> None:
    if series is not None and len(series):
        ok = np.isfinite(series.values)
        ax.plot(series.steps[ok], series.values[ok], label=label, **kwargs)


def _mark(ax: Any, step: int | None, label: str, color: str) -> None:
    if step is not None:
        ax.axvline(step, color=color, linestyle="--", linewidth=1, label=f"{label} ({step:,})")


def _grokking(fig: Any, ctx: Context, summary: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    _line(ax, ctx.series("grokking", "train_acc"), "train accuracy", color="tab:blue")
    _line(ax, ctx.series("grokking", "val_acc"), "validation accuracy", color="tab:orange")
    ax.axhline(summary["threshold"], color="grey", linestyle=":", linewidth=1, label="threshold")
    _mark(ax, summary["memorized_step"], "memorised", "tab:blue")
    _mark(ax, summary["generalized_step"], "generalised", "tab:orange")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    delay = "" if summary["delay"] is None else f", delay {summary['delay']:,} steps"
    ax.set_title(f"{ctx.run.name}: {summary['kind']}{delay}")


def _collapse(fig: Any, ctx: Context, summary: dict[str, Any]) -> None:
    top, bottom = fig.subplots(2, 1, sharex=True)
    _line(top, ctx.series("collapse", "sc_fraction"), "SC fraction", color="tab:red")
    _line(
        top, ctx.series("collapse", "zero_loss_fraction"), "zero-loss fraction", color="tab:purple"
    )
    _mark(top, summary["onset_step"], "SC onset", "black")
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("share of samples")
    dtype = f" ({summary['dtype']})" if summary["dtype"] else ""
    top.set_title(f"{ctx.run.name}: Softmax Collapse{dtype}")
    _line(bottom, ctx.series("collapse", "headroom_median"), "headroom (median)", color="tab:green")
    _line(
        bottom, ctx.series("collapse", "headroom_min"), "headroom (worst sample)", color="tab:olive"
    )
    bottom.axhline(0.0, color="black", linewidth=1, label="collapse")
    bottom.set_ylabel("threshold − logit gap")
    bottom.legend(loc="best", fontsize="small")


def _hessian(fig: Any, ctx: Context, summary: dict[str, Any]) -> None:
    top, bottom = fig.subplots(2, 1, sharex=True)
    _line(top, ctx.series("hessian", "lambda_max"), "λ_max", color="tab:blue")
    threshold = ctx.series("hessian", "eos_threshold")
    label = "stability threshold (2/η for GD)"
    if threshold is None:
        lr = ctx.series("hessian", "lr")
        if lr is not None:
            values = np.array([gd_sharpness_threshold(v) if v > 0 else math.nan for v in lr.values])
            threshold, label = Series(lr.steps, values), "2/η"
    _line(top, threshold, label, color="black", linestyle="--")
    top.set_ylabel("sharpness")
    top.set_title(f"{ctx.run.name}: curvature against the stability thresholds")
    _line(bottom, ctx.series("hessian", "eos_ratio"), "λ_max / threshold", color="tab:blue")
    _line(bottom, ctx.series("hessian", "trace_ratio"), "η·tr(H)/2", color="tab:green")
    _line(bottom, ctx.series("hessian", "precond_ratio"), "Adam preconditioned", color="tab:purple")
    bottom.axhline(1.0, color="black", linewidth=1, label="1 (at the threshold)")
    bottom.set_ylabel("ratio")
    bottom.legend(loc="best", fontsize="small")


def spectrum_masses(histogram: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """The point masses of a ``spectrum`` histogram: each non-empty bucket's right edge (where
    :func:`dynlens.curvature.spectrum_histogram` puts its Ritz value) and its share of the
    counts."""
    full = histogram.counts > 0
    return histogram.rights[full], histogram.counts[full] / histogram.counts[full].sum()


def _spectrum(fig: Any, ctx: Context, summary: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    events = ctx.run.histograms.get(ctx.options.key("hessian", "spectrum"), [])
    shown = [e for e in (events[:1] + events[-1:] if len(events) > 1 else events) if e.total > 0]
    masses = [spectrum_masses(e) for e in shown]
    if masses:
        everything = np.concatenate([nodes for nodes, _ in masses])
        lo, hi = float(everything.min()), float(everything.max())
        sigma = 0.01 * ((hi - lo) or max(abs(lo), abs(hi)) or 1.0)
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, 1000, dtype=torch.float64)
        colors = ("tab:grey", "tab:red")[-len(shown) :]  # the last step in red
        peak = 0.0
        for event, (nodes, weights), color in zip(shown, masses, colors, strict=True):
            phi = smoothed_density(torch.from_numpy(nodes), torch.from_numpy(weights), grid, sigma)
            peak = max(peak, float(phi.max()))
            # the floor keeps the log scale readable where a Gaussian tail underflows
            ax.plot(
                grid.numpy(),
                np.maximum(phi.numpy(), 1e-12),
                color=color,
                label=f"step {event.step:,}",
            )
            ax.axvline(nodes.max(), color=color, linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-6 * peak)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density φ_σ(λ)")
    ax.set_title(f"{ctx.run.name}: Hessian eigenvalue density (dotted: largest Ritz value)")


def _continual(fig: Any, ctx: Context, summary: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    accs = {
        int(q[len("acc_task_") :]): s for q, s in ctx.matching("continual", r"acc_task_\d+").items()
    }
    boundaries = task_boundaries(ctx, accs)
    starts = dict((t, step) for step, t in boundaries)
    order = [t for _, t in boundaries]
    colors = [f"C{i % 10}" for i in range(len(order))]
    for i, t in enumerate(order):
        s = accs.get(t)
        if s is None:
            continue
        _line(ax, s, f"task {t}", color=colors[i])
        ax.axvline(starts[t], color=colors[i], linestyle=":", linewidth=1)
        if i + 1 >= len(order):
            continue  # the task being trained has no gap yet
        end = starts[order[i + 1]]
        before = s.steps < end
        ok = np.isfinite(s.values)
        if not (before & ok).any():
            continue
        end_acc = float(s.values[before & ok][-1])
        after = (s.steps >= end) & ok
        x, y = s.steps[after], s.values[after]
        ax.fill_between(x, y, end_acc, where=y < end_acc, color=colors[i], alpha=0.2, step=None)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    title = f"{ctx.run.name}: accuracy per task (shaded: stability gap)"
    if summary["worst_gap"] is not None:
        gap, task = 100 * summary["worst_gap"], summary["worst_gap_task"]
        title += f"; worst gap {gap:.1f} points (task {task})"
    ax.set_title(title, fontsize="medium")


#: family name → function drawing its figure; a family without an entry gets no figure.
DRAWERS: dict[str, Callable[[Any, Context, dict[str, Any]], None]] = {
    "grokking": _grokking,
    "collapse": _collapse,
    "hessian": _hessian,
    "hessian_spectrum": _spectrum,
    "continual": _continual,
}
#: Families whose x-axis is not the step.
NOT_STEPS = frozenset({"hessian_spectrum"})


def plot_run(
    run: RunData, summary: RunSummary, directory: Path, options: Options | None = None
) -> list[Path]:
    """Draw every figure whose family the run has; return the files written."""
    figure = require_matplotlib()
    ctx = Context(run, options or Options())
    written: list[Path] = []
    for name, values in summary.families.items():
        draw = DRAWERS.get(name)
        if draw is None:
            continue
        fig = figure(figsize=(8, 5), layout="constrained")
        draw(fig, ctx, values)
        for ax in fig.axes:
            ax.grid(True, alpha=0.3)
            if ax is fig.axes[-1] and name not in NOT_STEPS:
                ax.set_xlabel("step")
            if not ax.get_legend() and ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", fontsize="small")
        path = directory / f"{slug(run.name)}_{name}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def plot_report(report: Report, directory: str | Path) -> list[Path]:
    """Write the figures of every run of ``report`` into ``directory`` (created if needed).

    Raises:
        PlotError: matplotlib is not installed (checked before anything is written).
    """
    require_matplotlib()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for run, summary in zip(report.data, report.runs, strict=True):
        written.extend(plot_run(run, summary, directory, report.options))
    return written
