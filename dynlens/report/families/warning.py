"""The ``warning`` family: each warning ``EarlyWarningMonitor`` raised, the step its event was
expected at, and whether and when the event came."""

from __future__ import annotations

import math
from typing import Any

from ...events import INSTABILITIES, WarningReason
from ..family import Column, Context, family, fmt_int, fmt_text


def happened_step(steps: list[int], warned: int) -> int | None:
    """The step of the event a warning at ``warned`` was about: the first of the event's
    ``steps`` at or after the warning, else the last one before it (the event came first: the
    lead is negative), ``None`` when it never happened.

    >>> happened_step([40, 300], 100), happened_step([40], 100), happened_step([], 100)
    (300, 40, None)
    """
    later = [s for s in steps if s >= warned]
    if later:
        return min(later)
    return max(steps) if steps else None


def _fmt_warned(step: int | None) -> str:
    return "not warned" if step is None else fmt_int(step)


def _row_step(row: dict[str, Any]) -> int:
    """Where a row stands in step order: its warning's step, else its event's."""
    return row["happened_step"] if row["warned_step"] is None else row["warned_step"]


@family(
    "warning",
    order=80,
    title="Warnings",
    fields=("warnings", "happened"),
    columns=(
        Column("event", "event", fmt_text),
        Column("warned_step", "warned at", _fmt_warned),
        Column("expected_step", "expected", fmt_int),
        Column("happened_step", "happened at", fmt_int),
        Column("lead", "lead", fmt_int),
    ),
    rows="warnings",
)
def warning(ctx: Context) -> dict[str, Any] | None:
    """One row per warning (reason ``warn_<event>``), in step order: the step it was raised at,
    the step its event was expected at (that step + the ``<event>/steps_to`` logged there,
    rounded up, as the monitor rounds it), the step the event happened at (reason ``<event>``)
    and the lead (happened − warned); a row too for every event that happened and that no
    warning's row names (``warned_step`` null: it came unwarned); and the step of every event
    that happened, warned or not.
    """
    if not ctx.texts("warning") and not ctx.matching("warning", r".+"):
        return None
    happened = {
        e: sorted(ctx.event_steps("warning", WarningReason.happened(e))) for e in INSTABILITIES
    }
    raised = sorted(
        (step, i, event)
        for i, event in enumerate(INSTABILITIES)
        for step in ctx.event_steps("warning", WarningReason.warning(event))
    )
    warnings = []
    for warned, _, event in raised:
        steps_to = ctx.at(ctx.series("warning", f"{event}/steps_to"), warned)
        came = happened_step(happened[event], warned)
        warnings.append(
            {
                "event": event,
                "warned_step": warned,
                "expected_step": None if steps_to is None else math.ceil(warned + steps_to),
                "happened_step": came,
                "lead": None if came is None else came - warned,
            }
        )
    named = {(w["event"], w["happened_step"]) for w in warnings}
    for event, steps in happened.items():
        if steps and (event, steps[0]) not in named:
            warnings.append(
                {
                    "event": event,
                    "warned_step": None,
                    "expected_step": None,
                    "happened_step": steps[0],
                    "lead": None,
                }
            )
    warnings.sort(key=_row_step)
    return {
        "warnings": warnings,
        "happened": {e: steps[0] for e, steps in happened.items() if steps},
    }
