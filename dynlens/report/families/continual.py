"""The ``continual`` family: :class:`dynlens.continual.ContinualMetrics` replayed on the logged
per-task accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ...continual import ContinualMetrics
from ..family import Column, Context, family, fmt_int, fmt_percent
from ..reader import Series


def task_boundaries(ctx: Context, accs: Mapping[int, Series]) -> list[tuple[int, int]]:
    """``[(step, task), ...]``: where each task started, from the logged ``task`` scalar, else
    from each task's first evaluation."""
    task = ctx.series("continual", "task")
    starts: dict[int, int] = {}
    if task is not None:
        for step, value in zip(task.steps.tolist(), task.values.tolist(), strict=True):
            if math.isfinite(value):
                starts.setdefault(round(value), int(step))
    for t, s in accs.items():
        if t not in starts and len(s):
            starts[t] = int(s.steps[0])
    return sorted((step, t) for t, step in starts.items())


def _windows(ctx: Context) -> tuple[int, ...]:
    found = {int(q[3:]) for q in ctx.matching("continual", r"w[fp]_\d+")}
    return tuple(sorted(w for w in found if w > 0)) or (10, 100)


def replay_continual(ctx: Context) -> tuple[ContinualMetrics, dict[int, Series]] | None:
    """Feed the logged ``acc_task_<t>`` curves through :class:`ContinualMetrics`, in step order,
    starting each task where the logged ``task`` scalar first names it."""
    accs = {
        int(q[len("acc_task_") :]): s for q, s in ctx.matching("continual", r"acc_task_\d+").items()
    }
    if not accs:
        return None
    metrics = ContinualMetrics(windows=_windows(ctx))
    boundaries = task_boundaries(ctx, accs)
    by_step: dict[int, dict[int, float]] = {}
    for t, s in accs.items():
        for step, value in zip(s.steps.tolist(), s.values.tolist(), strict=True):
            if math.isfinite(value):
                by_step.setdefault(int(step), {})[t] = min(max(value, 0.0), 1.0)
    started: set[int] = set()
    pending = list(boundaries)
    for step in sorted(by_step):
        while pending and pending[0][0] <= step:
            metrics.start_task(pending.pop(0)[1])
            started.add(metrics.current_task)  # type: ignore[arg-type]
        known = {t: a for t, a in by_step[step].items() if t in started}
        if known:
            metrics.update(step, known)
    return metrics, accs


@family(
    "continual",
    order=70,
    title="Continual evaluation (ContinualMetrics replayed on the logged accuracies)",
    fields=(
        "evaluations",
        "tasks",
        "acc",
        "min_acc",
        "wc_acc",
        "wf",
        "wp",
        "worst_gap_task",
        "worst_gap",
        "worst_gap_recovery",
        "per_task",
    ),
    columns=(
        Column("tasks", "tasks", lambda v: "—" if not v else str(len(v))),
        Column("acc", "ACC", fmt_percent),
        Column("min_acc", "min-ACC", fmt_percent),
        Column("wc_acc", "WC-ACC", fmt_percent),
        Column("worst_gap_task", "worst gap task", fmt_int),
        Column("worst_gap", "gap", fmt_percent),
        Column("worst_gap_recovery", "recovery", fmt_percent),
        Column(
            "per_task",
            "gap / recovery per task",
            lambda v: (
                "—"
                if not v
                else "  ".join(
                    f"{t}: {fmt_percent(d['gap'])}/{fmt_percent(d['recovery'])}"
                    for t, d in v.items()
                    if d["gap"] is not None
                )
                or "—"
            ),
        ),
    ),
)
def continual(ctx: Context) -> dict[str, Any] | None:
    """Final ACC, min-ACC, WC-ACC, windowed forgetting/plasticity, and each previous task's
    stability gap (end-of-task accuracy − later minimum) and recovery (final − minimum)."""
    replayed = replay_continual(ctx)
    if replayed is None:
        return None
    metrics, accs = replayed
    s = metrics.summary()
    per_task = {
        str(t): {
            "final_acc": s["task_acc"].get(t),
            "gap": s["gap"].get(t),
            "recovery": s["recovery"].get(t),
            "recovery_steps": s["recovery_steps"].get(t),
        }
        for t in metrics.tasks
    }
    worst = max(s["gap"], key=lambda t: s["gap"][t]) if s["gap"] else None
    logged_acc = ctx.last(ctx.series("continual", "acc"))
    if logged_acc is not None and s["acc"] is not None and abs(logged_acc - s["acc"]) > 1e-4:
        ctx.note(
            f"the monitor logged ACC {logged_acc:.4f} but replaying the per-task accuracies "
            f"gives {s['acc']:.4f}"
        )
    return {
        "evaluations": len({int(x) for a in accs.values() for x in a.steps.tolist()}),
        "tasks": [int(t) for t in metrics.tasks],
        "acc": s["acc"],
        "min_acc": s["min_acc"],
        "wc_acc": s["wc_acc"],
        "wf": {str(w): v for w, v in s["wf"].items()},
        "wp": {str(w): v for w, v in s["wp"].items()},
        "worst_gap_task": worst,
        "worst_gap": None if worst is None else s["gap"][worst],
        "worst_gap_recovery": None if worst is None else s["recovery"][worst],
        "per_task": per_task,
    }
