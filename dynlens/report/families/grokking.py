"""The ``grokking`` family: :func:`dynlens.grokking.detect_grokking` on the logged accuracies."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...grokking import detect_grokking
from ..family import Column, Context, family, fmt_int, fmt_percent, fmt_text


def _int_or_none(value: float | None) -> int | None:
    return None if value is None or not math.isfinite(value) else round(value)


def _kind_style(kind: Any) -> str:
    return {"grokking": "bold green", "memorization": "yellow", "confusion": "red"}.get(kind, "")


@family(
    "grokking",
    order=10,
    title="Grokking (detect_grokking on the logged accuracies)",
    fields=(
        "evaluations",
        "threshold",
        "memorized_step",
        "generalized_step",
        "delay",
        "kind",
        "transition_steps",
        "final_train_acc",
        "final_val_acc",
        "final_weight_norm",
    ),
    columns=(
        Column("memorized_step", "memorised", fmt_int),
        Column("generalized_step", "generalised", fmt_int),
        Column("delay", "delay", fmt_int),
        Column("kind", "kind", fmt_text, _kind_style),
        Column("transition_steps", "transition", fmt_int),
        Column("final_train_acc", "train acc", fmt_percent),
        Column("final_val_acc", "val acc", fmt_percent),
    ),
)
def grokking(ctx: Context) -> dict[str, Any] | None:
    """Memorisation/generalisation steps, delay and kind, recomputed from ``train_acc`` and
    ``val_acc`` at the steps where both were logged."""
    train, val = ctx.series("grokking", "train_acc"), ctx.series("grokking", "val_acc")
    if train is None or val is None:
        return None
    train, val = train.per_step(), val.per_step()
    steps, ti, vi = np.intersect1d(train.steps, val.steps, return_indices=True)
    if steps.size == 0:
        ctx.note("grokking train_acc and val_acc share no step; nothing to detect")
        return None
    opts = ctx.options
    report = detect_grokking(
        steps,
        train.values[ti],
        val.values[vi],
        threshold=opts.threshold,
        grokking_delay=opts.grokking_delay,
    )
    for name in ("memorized_step", "generalized_step"):
        logged = _int_or_none(ctx.last(ctx.series("grokking", name)))
        if logged is not None and logged != getattr(report, name):
            ctx.note(
                f"the monitor logged {name} {logged} but the accuracies give "
                f"{getattr(report, name)} at threshold {opts.threshold:g}: was the monitor's "
                "`threshold` different? Pass it with --threshold"
            )
    return {
        "evaluations": int(steps.size),
        "threshold": report.threshold,
        "memorized_step": report.memorized_step,
        "generalized_step": report.generalized_step,
        "delay": report.delay,
        "kind": report.kind,
        "transition_steps": report.transition_steps,
        "final_train_acc": ctx.last(train),
        "final_val_acc": ctx.last(val),
        "final_weight_norm": ctx.last(ctx.series("grokking", "weight_norm")),
    }
