"""The text form of a monitor's event in TensorBoard: one definition, for writer and reader.

:meth:`dynlens.Monitor.log_event` writes each event with ``add_text`` as one markdown line whose
first token is the machine-readable reason in backticks, then `` · `` and the readable text::

    `onset` · step 120: Softmax Collapse onset: 62.5% of samples collapsed (> 50%)

TensorBoard's Text tab renders the reason as code, so the line still reads as a sentence;
``dynlens report`` takes the reason with :func:`parse_event` and never looks at the wording.
A reason is a short code of letters, digits, ``_``, ``.`` and ``-`` (``"edge_of_stability"``).

Pure (standard library only), so both ``callbacks/`` and ``report/`` import it.

>>> format_event("onset", "step 3: collapse")
'`onset` · step 3: collapse'
>>> parse_event("`onset` · step 3: collapse")
('onset', 'step 3: collapse')
>>> parse_event("step 3: written before events carried their reason")
(None, 'step 3: written before events carried their reason')
"""

from __future__ import annotations

import re

__all__ = ["REASON_PATTERN", "SEPARATOR", "format_event", "parse_event"]

#: What a reason may be: no spaces or backticks, so the text form parses back unambiguously.
REASON_PATTERN = r"[A-Za-z0-9_.-]+"
#: Between the reason in backticks and the readable text.
SEPARATOR = " · "

_EVENT = re.compile(rf"`({REASON_PATTERN})`{SEPARATOR}(.*)", re.DOTALL)


def format_event(reason: str, text: str) -> str:
    """The TensorBoard text of an event: ``"`reason` · text"``."""
    if not isinstance(reason, str) or not re.fullmatch(REASON_PATTERN, reason):
        raise ValueError(
            f"Expected an event reason of letters, digits, '_', '.' or '-' (like 'onset'), "
            f"got {reason!r}"
        )
    return f"`{reason}`{SEPARATOR}{text}"


def parse_event(text: str) -> tuple[str | None, str]:
    """``(reason, text)`` of an event's TensorBoard text; ``(None, text)`` when it carries no
    reason (written by a dynlens before events carried their reason, or by something else)."""
    found = _EVENT.fullmatch(text)
    if found is None:
        return None, text
    return found.group(1), found.group(2)
