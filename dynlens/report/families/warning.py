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


@family(
    "warning",
    order=80,
    title="Warnings",
    fields=("warnings", "happened"),
    columns=(
        Column("event", "event", fmt_text),
        Column("warned_step", "warned at", fmt_int),
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
    and the lead (happened − warned); and the step of every event that happened, warned or not.
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
    return {
        "warnings": warnings,
        "happened": {e: steps[0] for e, steps in happened.items() if steps},
    }
