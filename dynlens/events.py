"""Monitor events: their reasons, one enum per monitor, and their text form in TensorBoard.

Every discrete event a monitor records carries a *reason*, a member of that monitor's enum
below (:class:`CollapseReason` for ``SoftmaxCollapseMonitor``, ...). The callbacks log with the
members and ``dynlens report`` reads by them, so writer and reader share one definition, and the
report never imports the callbacks. :data:`REASONS` maps each monitor's ``name`` (the
``<monitor>`` of its keys) to its enum.

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

import enum
import re
from typing import ClassVar, Literal

__all__ = [
    "INSTABILITIES",
    "REASONS",
    "REASON_PATTERN",
    "SEPARATOR",
    "CollapseReason",
    "ContinualReason",
    "GrokkingReason",
    "HessianReason",
    "Instability",
    "LogitsReason",
    "OptimizerReason",
    "Reason",
    "WarningReason",
    "format_event",
    "join_events",
    "parse_event",
    "split_events",
]

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


#: Between the events of one step in one TensorBoard text: TensorBoard shows one text per step
#: and tag (the last written), so a step's events are written together, each a paragraph.
_BETWEEN = "\n\n"
_NEXT_EVENT = re.compile(rf"\n\n(?=`{REASON_PATTERN}`{SEPARATOR})")


def join_events(texts: list[str]) -> str:
    """One TensorBoard text for the events of one step (:func:`split_events` undoes it)."""
    return _BETWEEN.join(texts)


def split_events(text: str) -> list[str]:
    """The events in one TensorBoard text (one, or a step's several joined by
    :func:`join_events`).

    Example:
        >>> split_events(join_events(["`targets` · step 0: a", "`precision` · step 0: b"]))
        ['`targets` · step 0: a', '`precision` · step 0: b']
    """
    return _NEXT_EVENT.split(text)


def parse_event(text: str) -> tuple[str | None, str]:
    """``(reason, text)`` of an event's TensorBoard text; ``(None, text)`` when it carries no
    reason (written by a dynlens before events carried their reason, or by something else)."""
    found = _EVENT.fullmatch(text)
    if found is None:
        return None, text
    return found.group(1), found.group(2)


class Reason(str, enum.Enum):
    """Base of the monitors' reason enums: each member is a ``str`` equal to its code, so it
    compares equal to the plain string a checkpoint or an event file holds. A monitor's enum
    names the monitor (its ``name``, the ``<monitor>`` of its keys) as a class keyword,
    ``class CollapseReason(Reason, monitor="collapse")``, and :data:`REASONS` follows."""

    #: The ``name`` of the monitor whose events these are.
    monitor: ClassVar[str]

    __str__ = str.__str__

    def __format__(self, spec: str) -> str:
        return str.__format__(str(self), spec)

    def __init_subclass__(cls, monitor: str = "", **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.monitor = monitor


class GrokkingReason(Reason, monitor="grokking"):
    """Events of ``GrokkingMonitor``."""

    MEMORIZED = "memorized"  #: training accuracy reached the threshold
    GENERALIZED = "generalized"  #: validation accuracy reached the threshold
    STOPPED = "stopped"  #: training stopped ``stop_after_generalization`` steps after it
    SUMMARY = "summary"  #: the run's classification, at the end of training


class CollapseReason(Reason, monitor="collapse"):
    """Events of ``SoftmaxCollapseMonitor``."""

    ONSET = "onset"  #: more than ``onset_threshold`` of a measured step's samples collapsed
    REMEDY = "remedy"  #: the loss modules were switched to StableMax or float64
    PRECISION = "precision"  #: the activation and precision collapse is measured in
    LOGITS_FOUND = "logits_found"  #: where ``logits_module="auto"`` found the logits
    #: how the targets align with the logits (or that no alignment reproduced the loss)
    TARGETS = "targets"


class LogitsReason(Reason, monitor="logits"):
    """Events of ``LogitGrowthMonitor``."""

    ATTENTION_WARNING = "attention_warning"  #: the max attention logit passed its warning level
    ATTENTION_DIVERGENCE = "attention_divergence"  #: ... and its divergence level
    LOGZ_DRIFT = "logz_drift"  #: ``|logz_mean|`` passed ``logz_threshold``
    LOGITS_FOUND = "logits_found"  #: where ``logits_module="auto"`` found the logits
    SOFT_CAP = "soft_cap"  #: layers whose attention scores are soft-capped (raw scores logged)


class OptimizerReason(Reason, monitor="optimizer"):
    """Events of ``OptimizerMonitor``."""

    LOSS_SPIKE = "loss_spike"  #: the loss spiked (above its recent mean by 6 σ)
    GRADIENT_SPIKE = "gradient_spike"  #: the gradient norm spiked (above its recent mean by 6 σ)
    MEMORY = "memory"  #: the size of the copy of θ the update needs (said once)


class HessianReason(Reason, monitor="hessian"):
    """Events of ``HessianMonitor``."""

    EDGE_OF_STABILITY = "edge_of_stability"  #: ``eos_ratio`` reached 1
    ADAPTIVE_EDGE_OF_STABILITY = "adaptive_edge_of_stability"  #: ``precond_ratio`` reached 1
    FINITE_DIFFERENCE = "finite_difference"  #: products by finite differences from now on
    NO_PRECONDITIONED_SHARPNESS = "no_preconditioned_sharpness"  #: Adam's P is not defined
    WHOLE_BATCH = "whole_batch"  #: the batch cannot be split into micro-batches (and why)


class ContinualReason(Reason, monitor="continual"):
    """Events of ``ContinualEvaluation``."""

    TASK_START = "task_start"  #: training on a task began
    GAP = "gap"  #: a previous task fell ``gap_threshold`` below its end-of-task accuracy
    RECOVERY = "recovery"  #: ... and regained ``gap_threshold`` from its minimum
    SUMMARY = "summary"  #: the metrics at the end of a fit


#: The instabilities ``EarlyWarningMonitor`` forecasts.
Instability = Literal["collapse", "divergence", "attention", "spike"]
INSTABILITIES: tuple[Instability, ...] = ("collapse", "divergence", "attention", "spike")


class WarningReason(Reason, monitor="warning"):
    """Events of ``EarlyWarningMonitor``: for each instability a warning that it is coming
    (``warn_<instability>``) and the instability itself (``<instability>``, when it happened)."""

    WARN_COLLAPSE = "warn_collapse"
    WARN_DIVERGENCE = "warn_divergence"
    WARN_ATTENTION = "warn_attention"
    WARN_SPIKE = "warn_spike"
    COLLAPSE = "collapse"
    DIVERGENCE = "divergence"
    ATTENTION = "attention"
    SPIKE = "spike"  #: every loss spike (the first is also what ``happened`` holds)
    ATTENTION_SHARED = "attention_shared"  #: attention read from a ``LogitGrowthMonitor``
    ATTENTION_OWN = "attention_own"  #: ... which stopped: measured by the monitor again
    NO_UPDATE_RATIO = "no_update_ratio"  #: the update ratio cannot be measured in this run
    LOGITS_FOUND = "logits_found"  #: where ``logits_module="auto"`` found the logits

    @classmethod
    def warning(cls, instability: str) -> WarningReason:
        """The reason of the warning that ``instability`` is coming: ``WARN_COLLAPSE``."""
        return cls(f"warn_{instability}")

    @classmethod
    def happened(cls, instability: str) -> WarningReason:
        """The reason of ``instability`` itself: ``COLLAPSE``."""
        return cls(instability)


#: Each monitor's reasons, by the monitor's ``name`` (the ``<monitor>`` of its keys).
REASONS: dict[str, type[Reason]] = {cls.monitor: cls for cls in Reason.__subclasses__()}
