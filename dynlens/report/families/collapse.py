"""The ``collapse`` family: Softmax Collapse onset, share, headroom and the precision."""

from __future__ import annotations

from typing import Any

import torch

from ...collapse import collapse_threshold
from ...events import CollapseReason
from ..family import (
    Column,
    Context,
    family,
    first_step_above,
    fmt_float,
    fmt_int,
    fmt_percent,
)

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


@family(
    "collapse",
    order=20,
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
    onset_events = ctx.event_steps("collapse", CollapseReason.ONSET)
    onset: int | None
    source: str | None
    if onset_events:
        onset, source = onset_events[0], "event"
    else:
        onset = first_step_above(sc, ctx.options.onset_threshold)
        source = None if onset is None else "sc_fraction"
    remedy = ctx.event_steps("collapse", CollapseReason.REMEDY)
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
