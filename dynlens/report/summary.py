"""Summarise logged runs, one small function per monitor family, in a registry.

A *family* is what one monitor logs under ``<prefix>/<family>/``. Its summariser is one function
decorated with :func:`family`, which declares the summary's fields (the JSON schema) and the
table columns; it receives a :class:`Context` (the run's series, text events and options) and
returns ``{field: value}`` — or ``None`` when the run has no data of that family, so a run with
only some monitors shows only those. Adding a family is adding one such function::

    @family(
        "spikes",                                   # what a monitor logs under dynlens/spikes/
        title="Loss spikes",
        fields=("measurements", "largest_spike"),   # the JSON schema, in order
        columns=(Column("largest_spike", "largest spike", fmt_float(1)),),
    )
    def spikes(ctx: Context) -> dict[str, Any] | None:
        # (a docstring here says what the family reports)
        ratio = ctx.series("spikes", "loss_ratio")
        if ratio is None:
            return None
        return {"measurements": ctx.count(ratio), "largest_spike": ctx.peak(ratio)}

Every number comes from the measurement layer's pure functions, the same ones the callbacks call
(one definition per quantity): :func:`dynlens.grokking.detect_grokking` on the logged accuracy
curves, :func:`dynlens.collapse.collapse_threshold` to name the precision,
:func:`dynlens.logits.log_growth_rate` for the logit growth over the run, and
:class:`dynlens.continual.ContinualMetrics` replaying the logged per-task accuracies. Values the
callbacks log as results of such functions (stability ratios) are read as logged.

Values read back from TensorBoard are float32; non-finite points are ignored (and named in the
run's notes by the reader). Fields that cannot be known are ``None``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..collapse import collapse_threshold
from ..continual import ContinualMetrics
from ..events import parse_event
from ..grokking import detect_grokking
from .reader import RunData, Series

__all__ = [
    "FAMILIES",
    "Column",
    "Context",
    "Family",
    "Options",
    "RunSummary",
    "family",
    "summarise_run",
]


@dataclass(frozen=True)
class Options:
    """How runs are summarised.

    Args:
        prefix: the monitors' key prefix (``prefix=`` of every callback; default ``dynlens``).
        threshold: accuracy that counts as memorised/generalised (``GrokkingMonitor``'s
            ``threshold``; Power et al. 2022: 0.99).
        grokking_delay: smallest delay classified as grokking (Liu et al. 2022: 1000 steps).
        onset_threshold: ``sc_fraction`` above which Softmax Collapse onset is declared when the
            run has no onset event (``SoftmaxCollapseMonitor``'s default 0.5).
    """

    prefix: str = "dynlens"
    threshold: float = 0.99
    grokking_delay: int = 1000
    onset_threshold: float = 0.5

    def key(self, family: str, quantity: str) -> str:
        return f"{self.prefix}/{family}/{quantity}"


# ------------------------------------------------------------------------------- formatting
def fmt_int(value: Any) -> str:
    return "—" if value is None else f"{int(value):,}"


def fmt_float(digits: int) -> Callable[[Any], str]:
    def fmt(value: Any) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    return fmt


def fmt_percent(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def fmt_text(value: Any) -> str:
    return "—" if value is None else str(value)


@dataclass(frozen=True)
class Column:
    """One table column: the summary field it shows, its header and how to format it."""

    field: str
    header: str
    format: Callable[[Any], str] = fmt_text
    style: Callable[[Any], str] | None = None


@dataclass(frozen=True)
class Family:
    """A registered summariser: its family name, table title, JSON fields and columns."""

    name: str
    title: str
    fields: tuple[str, ...]
    columns: tuple[Column, ...]
    summarise: Callable[[Context], dict[str, Any] | None]


#: The registry, in table order: family name → :class:`Family`.
FAMILIES: dict[str, Family] = {}


def family(
    name: str,
    *,
    title: str,
    fields: tuple[str, ...],
    columns: tuple[Column, ...],
    registry: dict[str, Family] | None = None,
) -> Callable[[Callable[[Context], dict[str, Any] | None]], Callable[..., Any]]:
    """Register the decorated function as the summariser of ``name`` (see the module docstring).

    ``fields`` are the keys the function returns, in order — they are the family's JSON schema
    — and every column must show one of them. ``registry`` defaults to :data:`FAMILIES`.
    """
    target = FAMILIES if registry is None else registry
    unknown = [c.field for c in columns if c.field not in fields]
    if unknown:
        raise ValueError(f"columns {unknown} of family {name!r} are not among its fields {fields}")

    def register(fn: Callable[[Context], dict[str, Any] | None]) -> Callable[..., Any]:
        target[name] = Family(name, title, tuple(fields), tuple(columns), fn)
        return fn

    return register


@dataclass
class Context:
    """What a summariser sees: one run's data, the options, and a place for notes."""

    run: RunData
    options: Options
    notes: list[str] = field(default_factory=list)

    def series(self, family: str, quantity: str) -> Series | None:
        """The series of ``<prefix>/<family>/<quantity>``, ``None`` if not logged."""
        return self.run.scalars.get(self.options.key(family, quantity))

    def matching(self, family: str, pattern: str) -> dict[str, Series]:
        """``{quantity: series}`` for the family's quantities fully matching ``pattern``."""
        head = self.options.key(family, "")
        compiled = re.compile(pattern)
        return {
            tag[len(head) :]: s
            for tag, s in self.run.scalars.items()
            if tag.startswith(head) and compiled.fullmatch(tag[len(head) :])
        }

    def texts(self, family: str, quantity: str = "events") -> list[tuple[int, str]]:
        return self.run.texts.get(self.options.key(family, quantity), [])

    def event_steps(self, family: str, reason: str) -> list[int]:
        """Steps of the family's events with this reason (one of :data:`REASONS`), in the order
        written. Read by reason (:func:`dynlens.events.parse_event`), never by wording."""
        steps = []
        for step, text in self.texts(family):
            found, _ = parse_event(text)
            if found is None:
                # Legacy path, the only one: event files written before events carried their
                # reason hold only the English message, so match the wording it had then.
                wording = _LEGACY_WORDING.get((family, reason))
                matches = wording is not None and wording in text
            else:
                matches = found == reason
            if matches:
                steps.append(step)
        return steps

    def note(self, message: str) -> None:
        self.notes.append(f"{self.run.path}: {message}")

    @staticmethod
    def last(series: Series | None) -> float | None:
        return None if series is None else series.last()

    @staticmethod
    def peak(series: Series | None) -> float | None:
        if series is None:
            return None
        v = series.values[np.isfinite(series.values)]
        return float(v.max()) if v.size else None

    @staticmethod
    def peak_step(series: Series | None) -> int | None:
        if series is None:
            return None
        ok = np.isfinite(series.values)
        if not ok.any():
            return None
        return int(series.steps[ok][np.argmax(series.values[ok])])

    @staticmethod
    def count(series: Series | None) -> int:
        return 0 if series is None else int(np.isfinite(series.values).sum())


def first_step_above(series: Series, level: float) -> int | None:
    """First step whose value is strictly above ``level`` (NaN never is), else ``None``."""
    hits = np.flatnonzero(series.values > level)
    return int(series.steps[hits[0]]) if hits.size else None


def share_at_least(series: Series | None, level: float) -> float | None:
    """Share of the finite measurements at or above ``level`` (``None`` without any)."""
    if series is None:
        return None
    v = series.values[np.isfinite(series.values)]
    return float(np.mean(v >= level)) if v.size else None


def _int_or_none(value: float | None) -> int | None:
    return None if value is None or not math.isfinite(value) else round(value)


# ------------------------------------------------------------------------------- grokking
def _kind_style(kind: Any) -> str:
    return {"grokking": "bold green", "memorization": "yellow", "confusion": "red"}.get(kind, "")


@family(
    "grokking",
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


# ------------------------------------------------------------------------------- collapse
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_of_threshold(threshold: float | None) -> str | None:
    """Name the precision whose collapse threshold (``collapse_threshold``) was logged.

    >>> dtype_of_threshold(16.635532), dtype_of_threshold(36.7368), dtype_of_threshold(3.0)
    ('float32', 'float64', None)
    """
    if threshold is None:
        return None
    for dtype in _DTYPES:
        if abs(collapse_threshold(dtype) - threshold) < 1e-3:
            return str(dtype).removeprefix("torch.")
    return None


#: The event reasons the report relies on, ``{family: (reason, ...)}``, each as the monitor
#: passes it to ``log_event`` (``SoftmaxCollapseMonitor``, ``dynlens/callbacks/collapse.py``).
COLLAPSE_ONSET = "onset"
COLLAPSE_REMEDY = "remedy"
REASONS: dict[str, tuple[str, ...]] = {"collapse": (COLLAPSE_ONSET, COLLAPSE_REMEDY)}

#: Legacy path: the wording that marked those events before they carried their reason.
_LEGACY_WORDING: dict[tuple[str, str], str] = {
    ("collapse", COLLAPSE_ONSET): "Softmax Collapse onset",
    ("collapse", COLLAPSE_REMEDY): "(remedy)",
}


@family(
    "collapse",
    title="Softmax Collapse",
    fields=(
        "measurements",
        "onset_step",
        "onset_source",
        "peak_sc_fraction",
        "peak_step",
        "final_sc_fraction",
        "peak_zero_loss_fraction",
        "final_headroom_median",
        "final_headroom_min",
        "threshold",
        "dtype",
        "final_nlm_cosine",
        "remedy_step",
    ),
    columns=(
        Column("onset_step", "SC onset", fmt_int),
        Column("peak_sc_fraction", "peak SC", fmt_percent),
        Column("peak_step", "at step", fmt_int),
        Column("final_sc_fraction", "final SC", fmt_percent),
        Column("final_headroom_median", "headroom med", fmt_float(2)),
        Column("final_headroom_min", "headroom min", fmt_float(2)),
        Column("dtype", "dtype"),
        Column("final_nlm_cosine", "NLM cos", fmt_float(2)),
    ),
)
def collapse(ctx: Context) -> dict[str, Any] | None:
    """SC onset (the monitor's onset event, else the first ``sc_fraction`` above
    ``onset_threshold``), peak and final share, final headroom, the precision measured in."""
    sc = ctx.series("collapse", "sc_fraction")
    if sc is None:
        return None
    onset_events = ctx.event_steps("collapse", COLLAPSE_ONSET)
    if onset_events:
        onset, source = onset_events[0], "event"
    else:
        onset = first_step_above(sc, ctx.options.onset_threshold)
        source = None if onset is None else "sc_fraction"
    remedy = ctx.event_steps("collapse", COLLAPSE_REMEDY)
    threshold = ctx.last(ctx.series("collapse", "threshold"))
    return {
        "measurements": ctx.count(sc),
        "onset_step": onset,
        "onset_source": source,
        "peak_sc_fraction": ctx.peak(sc),
        "peak_step": ctx.peak_step(sc),
        "final_sc_fraction": ctx.last(sc),
        "peak_zero_loss_fraction": ctx.peak(ctx.series("collapse", "zero_loss_fraction")),
        "final_headroom_median": ctx.last(ctx.series("collapse", "headroom_median")),
        "final_headroom_min": ctx.last(ctx.series("collapse", "headroom_min")),
        "threshold": threshold,
        "dtype": dtype_of_threshold(threshold),
        "final_nlm_cosine": ctx.last(ctx.series("collapse", "nlm_cosine")),
        "remedy_step": remedy[0] if remedy else None,
    }


# ------------------------------------------------------------------------------- hessian
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


# ------------------------------------------------------------------------------- logits
def _positive_points(series: Series) -> tuple[list[int], list[float]]:
    ok = np.isfinite(series.values) & (series.values > 0)
    return series.steps[ok].tolist(), series.values[ok].tolist()


@family(
    "logits",
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
    from ..logits import log_growth_rate

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


# ------------------------------------------------------------------------------- continual
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


# ------------------------------------------------------------------------------- runs
@dataclass
class RunSummary:
    """One run's summary: identity, size, and one dict per family found in it."""

    name: str
    path: str
    files: int
    tags: int
    points: int
    first_step: int | None
    last_step: int | None
    families: dict[str, dict[str, Any]]
    notes: list[str]

    @property
    def readable(self) -> bool:
        return self.points > 0 or bool(self.families)


def summarise_run(
    run: RunData, options: Options | None = None, registry: Mapping[str, Family] | None = None
) -> RunSummary:
    """Summarise one run with every registered family that finds data in it.

    A summariser that raises does not stop the report: its family is left out and the error
    becomes a note naming the run's path.
    """
    options = options or Options()
    registry = FAMILIES if registry is None else registry
    ctx = Context(run, options)
    families: dict[str, dict[str, Any]] = {}
    for name, fam in registry.items():
        try:
            result = fam.summarise(ctx)
        except Exception as exc:  # one bad family must not hide the others
            ctx.note(f"the {name} summary failed: {type(exc).__name__}: {exc}")
            continue
        if result is None:
            continue
        if tuple(result) != fam.fields:
            raise RuntimeError(
                f"summariser {name!r} returned fields {tuple(result)}, declared {fam.fields}"
            )
        families[name] = {k: _json_value(v) for k, v in result.items()}
    steps = [int(s.steps[i]) for s in run.scalars.values() if len(s) for i in (0, -1)]
    return RunSummary(
        name=run.name,
        path=str(run.path),
        files=len(run.files),
        tags=len(run.scalars),
        points=run.num_points,
        first_step=min(steps) if steps else None,
        last_step=max(steps) if steps else None,
        families=families,
        notes=[*run.notes, *ctx.notes],
    )


def _json_value(value: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, non-finite floats to ``None``."""
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
