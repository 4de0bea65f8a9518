"""Bookkeeping shared by monitors that measure training steps batch by batch.

With gradient accumulation one optimizer step spans several micro-batches: a monitor arms its
capture at each due micro-batch's start, accumulates at each micro-batch's end, and logs once
the optimizer has stepped. :class:`StepWindow` keeps track of that; :func:`take_logits` reads the
output logits of a micro-batch from a :class:`~dynlens.callbacks._capture.LogitsCapture` and fails
with the capture's advice when there are none.
"""

from __future__ import annotations

from typing import Any

import torch

from ._capture import AUTO, LogitsCapture
from .base import ConfigurationError, Monitor


class StepWindow:
    """The optimizer step being measured: opened at a due micro-batch's start, closed at the end
    of the micro-batch after which ``trainer.global_step`` has advanced."""

    def __init__(self) -> None:
        self._start: int | None = None

    @property
    def is_open(self) -> bool:
        return self._start is not None

    def open(self, trainer: Any) -> None:
        """Call at the start of a due micro-batch (idempotent within one optimizer step)."""
        self._start = trainer.global_step

    def close_if_stepped(self, trainer: Any) -> bool:
        """True (and closed) once the optimizer stepped since :meth:`open`."""
        if self._start is not None and trainer.global_step > self._start:
            self._start = None
            return True
        return False

    def close(self) -> None:
        self._start = None


def take_logits(capture: LogitsCapture, outputs: Any, owner: str) -> list[torch.Tensor]:
    """The micro-batch's logits from ``capture``; a :class:`ConfigurationError` with the two ways
    to provide them when there are none."""
    logits = capture.take(outputs, owner)
    if not logits:
        raise ConfigurationError(capture.advice(owner))
    return logits


def announce_logits(
    monitor: Monitor, trainer: Any, step: int, capture: LogitsCapture, *, targets: str = ""
) -> None:
    """Say once per run (an event with reason ``"logits_found"``) which module
    ``logits_module="auto"`` found the logits in (logits that ``training_step`` returns itself
    need no word); ``targets`` adds how the targets are read."""
    if capture.logits_module != AUTO or capture.found is None or capture.found[0] is None:
        return
    if any(e["reason"] == "logits_found" for e in monitor.events):
        return
    message = f"reading the output logits from {capture.found[1]}"
    monitor.log_event(trainer, step, "logits_found", message + (f"; {targets}" if targets else ""))
