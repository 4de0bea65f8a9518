"""Summarise logged runs, one small function per monitor family, in a registry.

This module is the framework: :class:`Options`, :class:`Column`, :class:`Family`, the
:data:`FAMILIES` registry and its :func:`family` decorator, the :class:`Context` a summariser
reads (events by their reasons, members of the enums in :mod:`dynlens.events`),
:func:`summarise_run` and :class:`RunSummary`. The summarisers themselves live in
:mod:`dynlens.report.families`, one module per family (``grokking.py``, ``collapse.py``,
``hessian.py``, ``logits.py``, ``continual.py``, ``warning.py``); importing this module imports
them, so :data:`FAMILIES` is always complete.

A *family* is what one monitor logs under ``<prefix>/<family>/``. Its summariser is one function
decorated with :func:`family`, which declares the summary's fields (the JSON schema) and the
table columns; it receives a :class:`Context` (the run's series, text events and options) and
returns ``{field: value}`` — or ``None`` when the run has no data of that family, so a run with
only some monitors shows only those.

Adding a report family is adding one module, ``dynlens/report/families/spikes.py``::

    from typing import Any

    from ..summary import Column, Context, family, fmt_float

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

and one import line in ``dynlens/report/families/__init__.py``, at its place in the table order
(the order of those imports is the order of the report's tables and of its JSON ``families``).
Outside the package, the same decorator registers a family in any code that runs before the
report is built.

A family whose summary holds a list of like items (the ``warning`` family's warnings) can show
one table row per item instead of one per run: ``rows="warnings"`` names that list-valued field,
and its columns then name keys of the items. A run whose list is empty shows one row of dashes.

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

from ..events import CollapseReason, Reason, parse_event
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
    #: The list-valued field whose items are the table's rows (the columns name their keys);
    #: ``None``: one row per run, the columns naming fields.
    rows: str | None = None


#: The registry, in table order: family name → :class:`Family`.
FAMILIES: dict[str, Family] = {}


def family(
    name: str,
    *,
    title: str,
    fields: tuple[str, ...],
    columns: tuple[Column, ...],
    rows: str | None = None,
    registry: dict[str, Family] | None = None,
) -> Callable[[Callable[[Context], dict[str, Any] | None]], Callable[..., Any]]:
    """Register the decorated function as the summariser of ``name`` (see the module docstring).

    ``fields`` are the keys the function returns, in order — they are the family's JSON schema
    — and every column must show one of them; with ``rows`` (one of the fields, a list of
    mappings) the table has a row per item and every column shows a key of the items.
    ``registry`` defaults to :data:`FAMILIES`.
    """
    target = FAMILIES if registry is None else registry
    if rows is not None and rows not in fields:
        raise ValueError(f"rows {rows!r} of family {name!r} is not among its fields {fields}")
    unknown = [c.field for c in columns if rows is None and c.field not in fields]
    if unknown:
        raise ValueError(f"columns {unknown} of family {name!r} are not among its fields {fields}")

    def register(fn: Callable[[Context], dict[str, Any] | None]) -> Callable[..., Any]:
        target[name] = Family(name, title, tuple(fields), tuple(columns), fn, rows)
        return fn

    return register


# ------------------------------------------------------------------------------- event reasons
#: Legacy path: the wording that marked those events before they carried their reason, by
#: ``(family, reason)`` (the family too, as members of different monitors' enums may share a code).
_LEGACY_WORDING: dict[tuple[str, Reason], str] = {
    ("collapse", CollapseReason.ONSET): "Softmax Collapse onset",
    ("collapse", CollapseReason.REMEDY): "(remedy)",
}


# ------------------------------------------------------------------------------- context
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
        """Steps of the family's events with this reason (a member of the monitor's enum in
        :data:`dynlens.events.REASONS`: ``CollapseReason.ONSET``), in the order written. Read by
        reason (:func:`dynlens.events.parse_event`), never by wording."""
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
    def at(series: Series | None, step: int) -> float | None:
        """The finite value logged at ``step`` (the last one written there), else ``None``."""
        if series is None:
            return None
        points = series.per_step()
        i = int(np.searchsorted(points.steps, step))
        if i < len(points) and int(points.steps[i]) == step and math.isfinite(points.values[i]):
            return float(points.values[i])
        return None

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
        if fam.rows is not None:
            _check_rows(fam, result[fam.rows])
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


def _check_rows(fam: Family, items: Any) -> None:
    """A rows family's list: mappings holding every column's key (a programming error else)."""
    keys = [c.field for c in fam.columns]
    if not isinstance(items, (list, tuple)) or not all(
        isinstance(item, Mapping) and all(k in item for k in keys) for item in items
    ):
        raise RuntimeError(
            f"summariser {fam.name!r} returned {fam.rows!r} that is not a list of mappings "
            f"with the keys {keys}"
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


# ------------------------------------------------------------------------------- families
# The built-in summarisers register themselves in FAMILIES, in table order, when the package
# is imported. Imported last, because they import the framework above from this module; the
# helpers other code uses are re-exported from here.
from . import families as _families  # noqa: E402, F401
from .families.collapse import dtype_of_threshold as dtype_of_threshold  # noqa: E402
from .families.continual import replay_continual as replay_continual  # noqa: E402
from .families.continual import task_boundaries as task_boundaries  # noqa: E402
