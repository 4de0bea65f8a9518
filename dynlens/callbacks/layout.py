"""The run's TensorBoard custom-scalars layout: every attached monitor's panel, merged, once."""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from typing import Any

from ..compat import is_tensorboard_logger

Chart = list  # ["Multiline", [tag regexes]] or ["Margin", [value, lower, upper]]

# SummaryWriters that already hold a dynlens layout: one merged layout per run, whichever monitor
# gets there first writes it for all.
_LAYOUT_WRITTEN: weakref.WeakSet = weakref.WeakSet()


def tag_regex(tag: str) -> str:
    """Regex matching exactly ``tag``, anchored at both ends (``trace`` must not also match
    ``trace_stderr``)."""
    return "^" + re.escape(tag) + "$"


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer (rank 0 only)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if is_tensorboard_logger(logger)]


def layout(monitors: Sequence[Any]) -> dict[str, dict[str, Chart]]:
    """The merged custom-scalars layout of ``monitors``: one category per monitor."""
    merged: dict[str, dict[str, Chart]] = {}
    for monitor in monitors:
        charts = monitor.panel()
        if charts:
            merged.setdefault(f"{monitor.prefix}/{monitor.name}", {}).update(charts)
    return merged


def write_layout(trainer: Any, monitors: Sequence[Any], *, final: bool = False) -> None:
    """Write the layout of ``monitors`` (every dynlens monitor attached to ``trainer``), once per
    writer.

    TensorBoard shows one layout per run, so it is written once, when every monitor's panel is
    :attr:`~dynlens.callbacks.base.Monitor.panel_ready` (a chart appears only for what the run
    logs); ``final`` (the end of training) writes it whatever is ready. Called again and again,
    it writes once."""
    if not final and not all(m.panel_ready for m in monitors):
        return
    merged = layout(monitors)
    if not merged:
        return
    for writer in tensorboard_writers(trainer):
        if writer not in _LAYOUT_WRITTEN:
            writer.add_custom_scalars(merged)
            _LAYOUT_WRITTEN.add(writer)
