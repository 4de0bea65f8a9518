"""Read TensorBoard runs: every scalar point, text event and histogram of a run directory.

A run is a directory holding event files; :func:`find_runs` finds them under the paths given and
names them as TensorBoard does. :func:`read_run` reads each event file of a run with
:func:`~dynlens.report.eventfile.read_event_file` (both checksums of every record checked,
protobuf parsing only, every point kept) and assembles what they hold into a :class:`RunData`:
a :class:`Series` per scalar tag, the text events and the histograms per tag.

Several event files in one run directory (a resumed run) are merged in file-name order (the
names start with the creation time). When a tag's step goes back — a run resumed from an earlier
checkpoint — the points at or after that step from before are dropped: the latest write wins, as
TensorBoard's ``purge_orphaned_data`` does. Points repeated at one step are all kept.

Problems — unreadable, empty, corrupt or truncated files, non-finite values — become the run's
notes, each naming its path; reading never raises for bad content.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..events import split_events
from .eventfile import FileReport, Histogram, read_event_file

__all__ = [
    "EVENT_FILE_MARKER",
    "RunData",
    "Series",
    "find_runs",
    "read_run",
]

#: Substring every TensorBoard event file name contains (``events.out.tfevents.<time>.<host>...``).
EVENT_FILE_MARKER = "tfevents"


@dataclass
class Series:
    """One tag's scalar points in write order, steps non-decreasing (float32 values as float64).

    A step may repeat when a tag was logged twice at one step (Lightning logs ``epoch`` from
    training and from validation); :meth:`per_step` keeps the last value of each step.
    """

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    def last(self) -> float | None:
        """The value of the last finite point, ``None`` if there is none."""
        finite = np.flatnonzero(np.isfinite(self.values))
        return float(self.values[finite[-1]]) if finite.size else None

    def per_step(self) -> Series:
        """One point per step, strictly increasing: the last value written at each step."""
        if len(self.steps) < 2 or bool(np.all(np.diff(self.steps) > 0)):
            return self
        last = np.flatnonzero(np.append(np.diff(self.steps) > 0, True))
        return Series(self.steps[last], self.values[last])


@dataclass
class RunData:
    """Everything read from one run directory.

    Attributes:
        name: the run's name (its path relative to the directory given, as TensorBoard shows it).
        path: the run directory.
        files: one :class:`~dynlens.report.eventfile.FileReport` per event file, in the order
            they were merged.
        scalars: ``{tag: Series}``.
        texts: ``{tag: [(step, text), ...]}`` for text events, keyed by the tag given to
            ``add_text`` (without the ``/text_summary`` suffix), in the order written.
        histograms: ``{tag: [Histogram, ...]}``, steps non-decreasing (restarts purged as for
            scalars).
        notes: problems found, each naming the path it concerns (corrupt records, NaN values, …).
    """

    name: str
    path: Path
    files: list[FileReport] = field(default_factory=list)
    scalars: dict[str, Series] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_points(self) -> int:
        return sum(len(s) for s in self.scalars.values())

    @property
    def readable(self) -> bool:
        """True when at least one scalar point, text event or histogram was read."""
        return bool(self.scalars or self.texts or self.histograms)

    def series(self, tag: str) -> Series | None:
        return self.scalars.get(tag)


def _purge_histograms(events: list[Histogram]) -> list[Histogram]:
    """As :func:`_purge_restarts`: a step going back drops the histograms at or after it."""
    kept: list[Histogram] = []
    for event in events:
        if kept and event.step < kept[-1].step:
            while kept and kept[-1].step >= event.step:
                kept.pop()
        kept.append(event)
    return kept


def _purge_restarts(steps: list[int], values: list[float]) -> Series:
    """Points in write order → non-decreasing steps. A step going back (a run resumed from an
    earlier checkpoint) drops the points at or after it that were written before: the resumed
    run overwrites its lost future. Repeated equal steps are all kept, as TensorBoard keeps them.
    """
    s = np.asarray(steps, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    if len(s) < 2 or bool(np.all(np.diff(s) >= 0)):
        return Series(s, v)
    kept_steps: list[int] = []
    kept_values: list[float] = []
    for step, value in zip(s.tolist(), v.tolist(), strict=True):
        if kept_steps and step < kept_steps[-1]:
            while kept_steps and kept_steps[-1] >= step:
                kept_steps.pop()
                kept_values.pop()
        kept_steps.append(step)
        kept_values.append(value)
    return Series(np.asarray(kept_steps, dtype=np.int64), np.asarray(kept_values))


def event_files(directory: Path) -> list[Path]:
    """The event files directly inside ``directory``, in file-name (creation-time) order."""
    return sorted(p for p in directory.iterdir() if EVENT_FILE_MARKER in p.name and p.is_file())


def read_run(directory: str | os.PathLike[str], name: str | None = None) -> RunData:
    """Read every event file of one run directory, merged in file order.

    Problems (unreadable, empty, corrupt or truncated files, non-finite values) become
    :attr:`RunData.notes`, each naming its path; reading never raises for bad content.
    """
    directory = Path(directory)
    run = RunData(name=name if name is not None else directory.name, path=directory)
    raw: dict[str, tuple[list[int], list[float]]] = {}
    plugins: dict[str, str] = {}
    histograms: dict[str, list[Histogram]] = {}
    for path in event_files(directory):
        try:
            report = read_event_file(path, raw, run.texts, plugins, histograms)
        except OSError as exc:
            report = FileReport(path, problems=[f"{path}: cannot be read ({exc.strerror or exc})"])
        run.files.append(report)
        run.notes.extend(report.problems)
    run.texts = {tag: _one_per_event(records) for tag, records in run.texts.items()}
    run.histograms = {tag: _purge_histograms(histograms[tag]) for tag in sorted(histograms)}
    for tag in sorted(raw):
        series = _purge_restarts(*raw[tag])
        run.scalars[tag] = series
        bad = int(np.count_nonzero(~np.isfinite(series.values)))
        if bad:
            first = int(series.steps[np.flatnonzero(~np.isfinite(series.values))[0]])
            run.notes.append(
                f"{directory}: {bad} non-finite value(s) in {tag} (first at step {first}); "
                "summaries ignore them"
            )
    return run


def _one_per_event(records: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Text records as events: a step's later record that repeats an earlier one and adds to it
    (a monitor writes each step's events together, as TensorBoard shows one text per step)
    replaces it, and a record of several events (:func:`dynlens.events.join_events`) is split."""
    kept: list[tuple[int, str]] = []
    for step, text in records:
        if kept and kept[-1][0] == step and text.startswith(kept[-1][1]):
            kept[-1] = (step, text)
        else:
            kept.append((step, text))
    return [(step, event) for step, text in kept for event in split_events(text)]


def _run_name(root: Path, directory: Path, prefix_root: bool) -> str:
    relative = directory.relative_to(root).as_posix()
    if relative == ".":
        return root.name or str(root)
    return f"{root.name}/{relative}" if prefix_root else relative


def find_runs(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[tuple[str, Path]], list[str]]:
    """Find the runs — directories holding event files — under ``paths``.

    A path may be a log directory (searched recursively, symlinks not followed), a run
    directory, or one event file (its directory is the run). Runs are named by their path
    relative to the path given, as TensorBoard names them; when several paths hold runs, the
    name starts with the given directory's name. Returns ``([(name, directory), ...],
    problems)``, where each problem names a path that holds no event file or does not exist.
    """
    roots = [Path(p) for p in paths]
    found: list[tuple[Path, list[Path]]] = []
    problems: list[str] = []
    for root in roots:
        if not root.exists():
            problems.append(f"{root}: no such file or directory")
            continue
        if root.is_file():
            if EVENT_FILE_MARKER not in root.name:
                problems.append(f"{root}: not an event file (names contain '{EVENT_FILE_MARKER}')")
                continue
            found.append((root.parent, [root.parent]))
            continue
        directories = sorted(
            Path(d) for d, _, files in os.walk(root) if any(EVENT_FILE_MARKER in f for f in files)
        )
        if not directories:
            problems.append(f"{root}: no event files (events.out.tfevents.*) under this path")
            continue
        found.append((root, directories))
    runs: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for base, directories in found:
        for directory in directories:
            resolved = directory.resolve()
            if resolved not in seen:
                seen.add(resolved)
                runs.append((_run_name(base, directory, len(found) > 1), directory))
    return runs, problems
