"""The ``hessian`` family: the stability ratios ``HessianMonitor`` logs, read as logged."""

from __future__ import annotations

from typing import Any

from ..summary import Column, Context, family, fmt_float, fmt_int, fmt_percent, share_at_least


@family(
    "hessian",
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
