"""The framework a report family is written with: what a summariser declares and what it reads.

A *family* is what one monitor logs under ``<prefix>/<family>/``. Its summariser is one function
decorated with :func:`family`, which declares the family's place in the table order, the
summary's fields (the JSON schema) and the table columns; the function receives a
:class:`Context` (the run's series, text events and :class:`Options`) and returns
``{field: value}`` — or ``None`` when the run has no data of that family, so a run with only some
monitors shows only those. The decorator turns the function into a :class:`Family` (the function
is kept as its ``summarise``).

This module imports no family: the families import it. :mod:`dynlens.report.registry` finds them
(every module of :mod:`dynlens.report.families`), and :mod:`dynlens.report.summary` runs them.

Adding a report family is adding one module, ``dynlens/report/families/spikes.py``, and touching
nothing else::

    from typing import Any

    from ..family import Column, Context, family, fmt_float

    @family(
        "spikes",                                   # what a monitor logs under dynlens/spikes/
        order=65,                                   # after logits (60), before continual (70)
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

``order`` is the family's place in the report: its tables and the ``families`` of its JSON are
sorted by it. The built-in families are numbered in tens (grokking 10, collapse 20, hessian 30,
hessian_blocks 40, hessian_spectrum 50, logits 60, continual 70, warning 80), so a new one goes in
between without renumbering; two families may not share a place.

Outside the package, the decorator registers a family where ``registry=`` says, keeping that
mapping in order: :data:`dynlens.report.registry.FAMILIES` itself (every report built afterwards
has the family), or a copy of it given to :func:`dynlens.report.build_report` as ``families=``.

A family whose summary holds a list of like items (the ``warning`` family's warnings) can show
one table row per item instead of one per run: ``rows="warnings"`` names that list-valued field,
and its columns then name keys of the items. A run whose list is empty shows one row of dashes.

Every number comes from the measurement layer's pure functions, the same ones the callbacks call
(one definition per quantity): :func:`dynlens.grokking.detect_grokking` on the logged accuracy
curves, :func:`dynlens.collapse.collapse_threshold` to name the precision,
:func:`dynlens.logits.log_growth_rate` for the logit growth over the run, and
:class:`dynlens.continual.ContinualMetrics` replaying the logged per-task accuracies. Values the
callbacks log as results of such functions (stability ratios) are read as logged. Events are read
by their reasons (:meth:`Context.event_steps`), members of the monitors' enums in
:mod:`dynlens.events`, never by their wording.

Values read back from TensorBoard are float32; non-finite points are ignored (and named in the
run's notes by the reader). Fields that cannot be known are ``None``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..events import CollapseReason, parse_event
from .reader import RunData, Series

__all__ = [
    "Column",
    "Context",
    "Family",
    "Options",
    "Summariser",
    "family",
    "first_step_above",
    "fmt_float",
    "fmt_int",
    "fmt_percent",
    "fmt_text",
    "share_at_least",
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


#: A family's summariser: the run's :class:`Context` → ``{field: value}``, or ``None`` without data.
Summariser = Callable[["Context"], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Family:
    """A declared summariser: its family name, place in the table order, table title, JSON
    fields and columns."""

    name: str
    #: Place in the report (tables and JSON ``families``): the registry sorts by it.
    order: int
    title: str
    fields: tuple[str, ...]
    columns: tuple[Column, ...]
    summarise: Summariser
    #: The list-valued field whose items are the table's rows (the columns name their keys);
    #: ``None``: one row per run, the columns naming fields.
    rows: str | None = None


def family(
    name: str,
    *,
    order: int,
    title: str,
    fields: tuple[str, ...],
    columns: tuple[Column, ...],
    rows: str | None = None,
    registry: dict[str, Family] | None = None,
) -> Callable[[Summariser], Family]:
    """Declare the decorated function the summariser of ``name`` (see the module docstring).

    ``order`` is the family's place in the report; ``fields`` are the keys the function returns,
    in order — they are the family's JSON schema — and every column must show one of them; with
    ``rows`` (one of the fields, a list of mappings) the table has a row per item and every
    column shows a key of the items. The function becomes a :class:`Family`, which
    :mod:`dynlens.report.registry` finds in its module; with ``registry``, it is also put in that
    mapping, which is kept sorted by ``order``.
    """
    if rows is not None and rows not in fields:
        raise ValueError(f"rows {rows!r} of family {name!r} is not among its fields {fields}")
    unknown = [c.field for c in columns if rows is None and c.field not in fields]
    if unknown:
        raise ValueError(f"columns {unknown} of family {name!r} are not among its fields {fields}")

    def declare(fn: Summariser) -> Family:
        declared = Family(name, order, title, tuple(fields), tuple(columns), fn, rows)
        if registry is not None:
            entries = [f for f in registry.values() if f.name != name] + [declared]
            registry.clear()
            registry.update((f.name, f) for f in sorted(entries, key=lambda f: f.order))
        return declared

    return declare


# ------------------------------------------------------------------------------- event reasons
#: Legacy path: the wording that marked those events before they carried their reason, by
#: ``(family, reason)`` (the family too, as members of different monitors' enums may share a code).
_LEGACY_WORDING: dict[tuple[str, str], str] = {
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
