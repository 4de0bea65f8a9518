"""The ``hessian`` families: what ``HessianMonitor`` logs, read as logged: the stability ratios
(``hessian``), the trace per block (``hessian_blocks``) and the spectrum (``hessian_spectrum``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..family import (
    Column,
    Context,
    family,
    fmt_float,
    fmt_int,
    fmt_percent,
    fmt_text,
    share_at_least,
)
from ..reader import Series


@family(
    "hessian",
    order=30,
    title="Curvature (ratios to the stability thresholds; 1 = at the threshold)",
    fields=(
        "measurements",
        "peak_eos_ratio",
        "final_eos_ratio",
        "share_eos_ratio_at_least_1",
        "peak_trace_ratio",
        "final_trace_ratio",
        "share_trace_ratio_at_least_1",
        "peak_precond_ratio",
        "final_precond_ratio",
        "final_lambda_max",
        "final_trace",
        "final_lr",
    ),
    columns=(
        Column("measurements", "meas.", fmt_int),
        Column("peak_eos_ratio", "ηλ/2 peak", fmt_float(2)),
        Column("final_eos_ratio", "ηλ/2 final", fmt_float(2)),
        Column("share_eos_ratio_at_least_1", "ηλ/2 ≥ 1", fmt_percent),
        Column("peak_trace_ratio", "η·tr/2 peak", fmt_float(2)),
        Column("final_trace_ratio", "η·tr/2 final", fmt_float(2)),
        Column("share_trace_ratio_at_least_1", "η·tr/2 ≥ 1", fmt_percent),
        Column("peak_precond_ratio", "Adam peak", fmt_float(2)),
    ),
)
def hessian(ctx: Context) -> dict[str, Any] | None:
    """Peak, final and share ≥ 1 of the stability ratios ``HessianMonitor`` logs:
    ``eos_ratio`` = λ_max / its threshold (η·λ_max/2 for gradient descent and Adam's GD
    reference), ``trace_ratio`` = η·tr(H)/2, ``precond_ratio`` (Adam's preconditioned sharpness
    against (2+2β₁)/((1−β₁)η))."""
    lam, trace = ctx.series("hessian", "lambda_max"), ctx.series("hessian", "trace")
    eos, tr = ctx.series("hessian", "eos_ratio"), ctx.series("hessian", "trace_ratio")
    if lam is None and trace is None and eos is None and tr is None:
        return None
    precond = ctx.series("hessian", "precond_ratio")
    return {
        "measurements": max(ctx.count(s) for s in (lam, trace, eos, tr)),
        "peak_eos_ratio": ctx.peak(eos),
        "final_eos_ratio": ctx.last(eos),
        "share_eos_ratio_at_least_1": share_at_least(eos, 1.0),
        "peak_trace_ratio": ctx.peak(tr),
        "final_trace_ratio": ctx.last(tr),
        "share_trace_ratio_at_least_1": share_at_least(tr, 1.0),
        "peak_precond_ratio": ctx.peak(precond),
        "final_precond_ratio": ctx.last(precond),
        "final_lambda_max": ctx.last(lam),
        "final_trace": ctx.last(trace),
        "final_lr": ctx.last(ctx.series("hessian", "lr")),
    }


def fmt_general(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


def fmt_floats(values: Any) -> str:
    """The first three of a list, 3 significant digits: ``"12.3, 4.56, 1.2"``."""
    if not values:
        return "—"
    return ", ".join(f"{v:.3g}" for v in values[:3]) + (", …" if len(values) > 3 else "")


def _last_step(series: Iterable[Series]) -> int | None:
    """The last step at which any of ``series`` has a finite value."""
    steps = [int(s.steps[np.isfinite(s.values)][-1]) for s in series if np.isfinite(s.values).any()]
    return max(steps) if steps else None


@family(
    "hessian_blocks",
    order=40,
    title="Curvature per block (last step)",
    fields=("step", "blocks"),
    columns=(
        Column("block", "block", fmt_text),
        Column("trace", "tr(H_bb)", fmt_general),
        Column("share", "share of tr(H)", fmt_percent),
    ),
    rows="blocks",
)
def hessian_blocks(ctx: Context) -> dict[str, Any] | None:
    """``HessianMonitor(blocks=...)``: at the last step the blocks were measured, each block's
    trace ``trace/<block>`` and its share ``trace_share/<block>`` of the total, as logged,
    largest share first."""
    traces = ctx.matching("hessian", r"trace/.+")
    if not traces:
        return None
    shares = ctx.matching("hessian", r"trace_share/.+")
    step = _last_step(traces.values())
    if step is None:
        return {"step": None, "blocks": []}
    blocks: list[dict[str, Any]] = [
        {
            "block": quantity[len("trace/") :],
            "trace": ctx.at(series, step),
            "share": ctx.at(shares.get("trace_share/" + quantity[len("trace/") :]), step),
        }
        for quantity, series in traces.items()
    ]
    blocks.sort(key=lambda b: (b["share"] is None, -(b["share"] or 0.0), b["block"]))
    return {"step": step, "blocks": blocks}


def top_eigenvalues(ctx: Context, step: int) -> list[float]:
    """``spectrum_top/1`` … at ``step``, descending, as logged (stopping at the first missing)."""
    found = ctx.matching("hessian", r"spectrum_top/\d+")
    values = []
    for i in range(1, len(found) + 1):
        value = ctx.at(found.get(f"spectrum_top/{i}"), step)
        if value is None:
            break
        values.append(value)
    return values


@family(
    "hessian_spectrum",
    order=50,
    title="Hessian spectrum (top eigenvalues)",
    fields=(
        "measurements",
        "histograms",
        "first_step",
        "last_step",
        "first_top_eigenvalues",
        "final_top_eigenvalues",
    ),
    columns=(
        Column("measurements", "meas.", fmt_int),
        Column("first_step", "first step", fmt_int),
        Column("last_step", "last step", fmt_int),
        Column("first_top_eigenvalues", "λ_1 … first", fmt_floats),
        Column("final_top_eigenvalues", "λ_1 … last", fmt_floats),
    ),
)
def hessian_spectrum(ctx: Context) -> dict[str, Any] | None:
    """``HessianMonitor(density=True)``: how many measurements logged top eigenvalues
    (``spectrum_top/<i>``) and spectrum histograms (``spectrum``), the first and last such
    step, and the top eigenvalues λ_1 ≥ λ_2 ≥ … at each, as logged."""
    top = ctx.series("hessian", "spectrum_top/1")
    histograms = ctx.run.histograms.get(ctx.options.key("hessian", "spectrum"), [])
    if top is None and not histograms:
        return None
    ok = top.steps[np.isfinite(top.values)] if top is not None else np.zeros(0, dtype=np.int64)
    first = int(ok[0]) if ok.size else None
    last = int(ok[-1]) if ok.size else None
    return {
        "measurements": int(ok.size),
        "histograms": len(histograms),
        "first_step": first,
        "last_step": last,
        "first_top_eigenvalues": None if first is None else top_eigenvalues(ctx, first),
        "final_top_eigenvalues": None if last is None else top_eigenvalues(ctx, last),
    }
