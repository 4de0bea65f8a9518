"""Rich renderables of a :class:`~dynlens.report.Report`: an overview with one row per run, then
one table per monitor family (only the runs that logged it), then the problems met.

On a terminal the tables have colour; when the output is not a terminal (a pipe, a file, CI) rich
writes the same tables as plain text without escape codes — ``Console().is_terminal`` decides.
Tests render into ``Console(file=io.StringIO(), width=...)`` and compare the text.

A report renders itself through this module (``console.print(report)``), so this module does not
import it back: it reads a report as a :class:`RenderedReport`, the part of one it needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .family import Family, fmt_int
from .summary import RunSummary


class RenderedReport(Protocol):
    """What rendering reads of a :class:`~dynlens.report.Report`."""

    @property
    def runs(self) -> list[RunSummary]: ...

    @property
    def problems(self) -> list[str]: ...

    @property
    def families(self) -> Mapping[str, Family]: ...

    @property
    def readable(self) -> bool: ...


def _table(title: str) -> Table:
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )


def _steps(run: RunSummary) -> str:
    if run.first_step is None or run.last_step is None:
        return "—"
    return f"{fmt_int(run.first_step)}–{fmt_int(run.last_step)}"


def overview_table(report: RenderedReport) -> Table:
    """One row per run: its size, step range, the monitor families found and notes."""
    table = _table(f"dynlens report: {len(report.runs)} run{'s' * (len(report.runs) != 1)}")
    table.add_column("run", no_wrap=True, overflow="fold")
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("tags", justify="right")
    table.add_column("points", justify="right")
    table.add_column("monitors")
    table.add_column("notes", justify="right")
    for run in report.runs:
        monitors = ", ".join(run.families) or Text("none", style="dim")
        notes = Text(str(len(run.notes)), style="yellow") if run.notes else ""
        table.add_row(
            run.name, _steps(run), fmt_int(run.tags), fmt_int(run.points), monitors, notes
        )
    return table


def family_table(family: Family, runs: list[RunSummary]) -> Table | None:
    """One family's table: a row per run that logged it, the family's declared columns; with
    ``family.rows``, a row per item of that list (one row of dashes for an empty list); a cell
    whose field the item lacks is a dash, whatever the column's format says of a null."""
    rows = [r for r in runs if family.name in r.families]
    if not rows:
        return None
    table = _table(family.title)
    table.add_column("run", no_wrap=True, overflow="fold")
    for column in family.columns:
        table.add_column(column.header, justify="right" if column.field != "kind" else "left")
    for run in rows:
        values = run.families[family.name]
        items = [values] if family.rows is None else values[family.rows] or [{}]
        for item in items:
            cells: list[RenderableType] = [run.name]
            for column in family.columns:
                value = item.get(column.field)
                style = column.style(value) if column.style else ""
                # a row without the field (the dashes of an empty list) has nothing to format
                shown = column.format(value) if column.field in item else "—"
                cells.append(Text(shown, style=style))
            table.add_row(*cells)
    return table


def problems_renderable(report: RenderedReport) -> RenderableType | None:
    """Every problem met, each naming its path: paths without runs, then run notes."""
    lines = [*report.problems, *(n for r in report.runs for n in r.notes)]
    if not lines:
        return None
    text = Text()
    text.append(f"{len(lines)} problem{'s' * (len(lines) != 1)}\n", style="bold yellow")
    for line in lines:
        text.append("• ", style="yellow")
        text.append(line + "\n")
    text.rstrip()
    return text


def render_report(report: RenderedReport) -> Iterator[RenderableType]:
    """Yield the overview, the family tables (registry order) and the problems, blank-separated."""
    parts: list[RenderableType] = []
    if report.runs:
        parts.append(overview_table(report))
    for family in report.families.values():
        table = family_table(family, report.runs)
        if table is not None:
            parts.append(table)
    problems = problems_renderable(report)
    if problems is not None:
        parts.append(problems)
    if not report.readable:
        parts.append(Text("nothing could be read from the paths given", style="bold red"))
    spaced: list[RenderableType] = []
    for i, part in enumerate(parts):
        if i:
            spaced.append(Text(""))
        spaced.append(part)
    yield Group(*spaced)
