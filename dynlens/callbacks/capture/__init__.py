"""What monitors capture from a training step without changing the model: one lifecycle.

Every capture has the same five calls, made by its monitor at the same moments:

* ``attach(model, owner)`` in ``setup``: learn the model (hooks on a named module, module names,
  the loss modules); ``owner`` names the monitor in error messages;
* ``arm()`` when a measured micro-batch begins: start recording;
* ``disarm()`` when recording must stop (before the backward pass, at the end of the
  micro-batch, when the monitor disables itself); what was recorded stays;
* ``take(...)`` once the micro-batch (or the optimizer step) is whole: hand over what was
  recorded and forget it;
* ``detach()`` in ``teardown``: remove every hook; nothing is left behind.

Between ``disarm`` and the next ``arm`` a capture costs nothing. The captures:

* :class:`LogitsCapture` (:mod:`.logits`): the output logits, from ``training_step``'s outputs or
  a forward hook, found automatically, and how the batch's targets align with them, both decided
  by agreement with the step's loss (:mod:`.agreement`);
* :class:`LogProbsTap` (:mod:`.log_probs`): the log-probabilities a
  :class:`dynlens.CrossEntropyLoss` computes, measured inside its forward;
* :class:`AttentionCapture` (:mod:`.attention`): attention logits of every attention call;

and :func:`batch_targets` (:mod:`.targets`) reads the targets of the logits from the batch.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from .agreement import Alignment, fit_targets
from .aligned import shifts, targets_of, targets_said
from .attention import AttentionCapture
from .log_probs import LogProbsTap, same_memory
from .logits import AUTO, LogitsCapture, is_causal_lm, logits_found, take_logits
from .targets import TARGET_KEYS, TargetsArg, batch_targets, shift_targets_left


class Capture(Protocol):
    """The lifecycle every capture follows (see the package docstring)."""

    def attach(self, model: nn.Module, owner: str) -> None: ...
    def arm(self) -> None: ...
    def disarm(self) -> None: ...
    def take(self, *args: Any) -> Any: ...
    def detach(self) -> None: ...


__all__ = [
    "AUTO",
    "TARGET_KEYS",
    "Alignment",
    "AttentionCapture",
    "Capture",
    "LogProbsTap",
    "LogitsCapture",
    "TargetsArg",
    "batch_targets",
    "fit_targets",
    "is_causal_lm",
    "logits_found",
    "same_memory",
    "shift_targets_left",
    "shifts",
    "take_logits",
    "targets_of",
    "targets_said",
]
