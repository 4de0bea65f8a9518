"""The signals :class:`~dynlens.callbacks.early_warning.EarlyWarningMonitor` reads from a
training step: the collapse counts and median logit gap of the step's logits, the largest
attention logit (measured, or read from a :class:`~dynlens.LogitGrowthMonitor` measuring the
same step), the training losses since the last measured step, and the losses before and after
the optimizer's step for the update ratio. Each is put in a declared, reduced state field
(``Monitor.sync`` reduces them all at once); the monitor decides from the reduced values.
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention import AttentionLogitSums
from ..collapse import collapsed_mask, runner_up_gap
from ..events import WarningReason
from ..nn import Activation
from .base import Monitor
from .capture import AttentionCapture, LogitsCapture, logits_found, take_logits
from .context import logging_step
from .logits import LogitGrowthMonitor
from .replay import losses_across_step


class WarningSignals(Monitor):
    """Reads the early-warning signals of a measured step (module docstring); the monitor
    declares the fields they go to."""

    capture: LogitsCapture
    attention_capture: AttentionCapture
    attention_from: LogitGrowthMonitor | None
    _attention_step: int | None
    _collapse_in: tuple[Activation, torch.dtype]
    _follow_logits_dtype: bool
    _losses: list[tuple[int, torch.Tensor]]
    _theta: dict[str, torch.Tensor] | None
    # reduced at the decision (see EarlyWarningMonitor.__init__)
    _loss_values: torch.Tensor | None
    _gap: torch.Tensor | None
    _collapse_counts: torch.Tensor | None
    _max_logit: torch.Tensor | None
    _ratio_losses: torch.Tensor | None
    _decrease: torch.Tensor | None

    def _attention_sums(self, trainer: Any, step: int) -> dict[str, AttentionLogitSums]:
        """The step's attention statistics: the monitor's own, or those of the LogitGrowthMonitor
        that measures the same step (read, not taken from it: the same numbers, measured once)."""
        source = self.attention_from
        if source is None:
            return self.attention_capture.take()
        sums = None
        if source.disabled_reason is None:
            sums = source.attention_capture.statistics_of(self._attention_step)
        if sums is None:  # it stopped measuring: the monitor measures itself from the next step
            self.attention_from = None
            message = "LogitGrowthMonitor stopped measuring attention: measuring it here"
            self.log_event(trainer, step, WarningReason.ATTENTION_OWN, message, once=True)
            return {}
        message = (
            "the largest attention logit is read from LogitGrowthMonitor's measurement (every "
            f"{source.attention_every_n_steps} steps), not measured twice"
        )
        self.log_event(trainer, step, WarningReason.ATTENTION_SHARED, message, once=True)
        return sums

    def _stack_losses(self, device: torch.device) -> None:
        if self._losses:
            self._loss_values = torch.stack([v.to(device) for _, v in self._losses])

    def _collapse_signal(self, trainer: Any, outputs: Any) -> None:
        taken = take_logits(self.capture, outputs, type(self).__name__)
        found = logits_found(self.capture)
        if found is not None:
            step = logging_step(trainer)
            self.log_event(trainer, step, WarningReason.LOGITS_FOUND, found, once=True)
        activation, dtype = self._collapse_in
        logits = taken[-1]
        if self._follow_logits_dtype:  # no loss sets a precision: the logits' own, as F's loss
            dtype = logits.dtype
        self._collapse_in = (activation, dtype)
        gaps = runner_up_gap(logits, activation=activation, dtype=dtype).float()
        collapsed = collapsed_mask(logits, activation=activation, dtype=dtype)
        found_count = collapsed.sum()
        self._gap = gaps.nanmedian()
        self._collapse_counts = torch.stack(
            [found_count.new_tensor(collapsed.numel()), found_count]
        ).float()

    def _ratio_signal(self, pl_module: Any, batch: Any, batch_idx: int) -> None:
        theta, self._theta = self._theta, None
        assert theta is not None
        named = dict(pl_module.named_parameters())
        if any(named[k].grad is None for k in theta):
            return
        with torch.no_grad():  # −gᵀΔθ, with the gradient the step used
            decrease = -sum(
                (named[k].grad * (named[k].detach() - t)).sum() for k, t in theta.items()
            )
        self._ratio_losses = losses_across_step(pl_module, batch, batch_idx, theta)
        self._decrease = decrease.float().reshape(())


def attention_source(trainer: Any, every_n_steps: int) -> LogitGrowthMonitor | None:
    """A LogitGrowthMonitor of ``trainer`` that measures attention at every step this monitor
    measures (its attention cadence divides ``every_n_steps``), if there is one."""
    for callback in getattr(trainer, "callbacks", ()):
        if (
            isinstance(callback, LogitGrowthMonitor)
            and callback.attention
            and callback.disabled_reason is None
            and every_n_steps % callback.attention_every_n_steps == 0
        ):
            return callback
    return None


def loss_of(outputs: Any) -> torch.Tensor | None:
    """The training loss in ``training_step``'s outputs (a tensor, or a dict's ``"loss"``)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
