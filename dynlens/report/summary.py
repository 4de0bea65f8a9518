"""Summarise one run: every family of the registry, run on it, checked, as plain JSON values.

:func:`summarise_run` gives each family of :data:`dynlens.report.registry.FAMILIES` (or of the
``registry`` passed) a :class:`~dynlens.report.family.Context` on the run, in the registry's
order, and keeps what each returns: only the families that found data, their fields checked
against the declared ones, numpy scalars turned into Python numbers and non-finite floats into
``None``. A summariser that raises costs only its own family (the error becomes a note); one that
returns undeclared fields is a programming error and raises. The result is a :class:`RunSummary`,
one entry of the report's ``runs``.

How a family is written: :mod:`dynlens.report.family`; how the registry finds them:
:mod:`dynlens.report.registry`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .family import Context, Family, Options
from .reader import RunData
from .registry import FAMILIES

__all__ = ["RunSummary", "summarise_run"]


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
