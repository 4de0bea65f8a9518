"""The ``logits`` family: peak attention logit, output-logit growth and the drift of log Z."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..family import Column, Context, family, fmt_float, fmt_int
from ..reader import Series


def _positive_points(series: Series) -> tuple[list[int], list[float]]:
    ok = np.isfinite(series.values) & (series.values > 0)
    return series.steps[ok].tolist(), series.values[ok].tolist()


@family(
    "logits",
    order=60,
    title="Logit growth (Wortsman et al. 2023)",
    fields=(
        "measurements",
        "peak_attention_logit",
        "peak_attention_step",
        "peak_attention_layer",
        "final_attention_logit",
        "peak_max_abs",
        "final_max_abs",
        "growth_rate",
        "final_growth_rate",
        "first_logz_mean",
        "final_logz_mean",
        "logz_drift",
        "max_abs_logz_mean",
    ),
    columns=(
        Column("peak_attention_logit", "peak attn logit", fmt_float(1)),
        Column("peak_attention_layer", "layer"),
        Column("peak_attention_step", "at step", fmt_int),
        Column("peak_max_abs", "peak |z|", fmt_float(1)),
        Column("growth_rate", "growth /1k", fmt_float(2)),
        Column("final_logz_mean", "log Z final", fmt_float(2)),
        Column("logz_drift", "log Z drift", fmt_float(2)),
    ),
)
def logits(ctx: Context) -> dict[str, Any] | None:
    """Peak attention logit (and the layer that reached it), output-logit growth — the run's
    e-folds of ``max_abs`` per 1000 steps by :func:`dynlens.logits.log_growth_rate`, the same fit
    the monitor logs over its window — and the drift of the mean log Z (final − first)."""
    # Imported here, not at the top: should dynlens.logits ever fail to import, only this
    # family is lost (its failure becomes a note), never the whole report.
    from ...logits import log_growth_rate

    attn, max_abs = ctx.series("logits", "attn_max"), ctx.series("logits", "max_abs")
    logz = ctx.series("logits", "logz_mean")
    if attn is None and max_abs is None and logz is None:
        return None
    layers = ctx.matching("logits", r"attn_max/.+")
    peak_layer = None
    if layers:
        peaks = {name: ctx.peak(s) for name, s in layers.items()}
        finite = {name: p for name, p in peaks.items() if p is not None}
        if finite:
            peak_layer = max(finite, key=finite.__getitem__).removeprefix("attn_max/")
    growth = None
    if max_abs is not None:
        steps, values = _positive_points(max_abs.per_step())
        if len(steps) >= 2:
            growth = log_growth_rate(steps, values)
    first_logz = None
    if logz is not None:
        finite_logz = logz.values[np.isfinite(logz.values)]
        first_logz = float(finite_logz[0]) if finite_logz.size else None
    final_logz = ctx.last(logz)
    abs_logz = None if logz is None else ctx.peak(Series(logz.steps, np.abs(logz.values)))
    return {
        "measurements": max(ctx.count(s) for s in (attn, max_abs, logz)),
        "peak_attention_logit": ctx.peak(attn),
        "peak_attention_step": ctx.peak_step(attn),
        "peak_attention_layer": peak_layer,
        "final_attention_logit": ctx.last(attn),
        "peak_max_abs": ctx.peak(max_abs),
        "final_max_abs": ctx.last(max_abs),
        "growth_rate": growth,
        "final_growth_rate": ctx.last(ctx.series("logits", "growth_rate")),
        "first_logz_mean": first_logz,
        "final_logz_mean": final_logz,
        "logz_drift": None if first_logz is None or final_logz is None else final_logz - first_logz,
        "max_abs_logz_mean": abs_logz,
    }
