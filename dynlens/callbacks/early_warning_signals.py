"""The signals :class:`~dynlens.callbacks.early_warning.EarlyWarningMonitor` reads from a
training step: the collapse counts and median logit gap of the step's logits, the largest
attention logit (measured, or read from a :class:`~dynlens.LogitGrowthMonitor` measuring the
same step), the training losses since the last measured step, and the losses before and after
the optimizer's step for the update ratio, and from it the stability limit along the update
and when the scheduled learning rate reaches it. Each measurement is put in a declared, reduced
state field (``Monitor.sync`` reduces them all at once); the monitor decides from the reduced
values.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..attention import AttentionLogitSums
from ..collapse import collapse_threshold, collapsed_mask, runner_up_gap
from ..crossing import Crossing
from ..early_warning import ATTENTION_LIMIT, LIMITED, RATIO_POINTS, WarningPolicy
from ..events import OptimizerReason, WarningReason
from ..nn import Activation
from .base import Monitor
from .capture import AttentionCapture, LogitsCapture, logits_found, take_logits
from .context import logging_step
from .logits import LogitGrowthMonitor
from .lr_ahead import LRAhead
from .optimizer import OptimizerMonitor
from .replay import losses_across_step
from .schedule import dense_cadence


class WarningSignals(Monitor):
    """Reads the early-warning signals of a measured step (module docstring); the monitor
    declares the fields they go to."""

    capture: LogitsCapture
    attention_capture: AttentionCapture
    attention_from: LogitGrowthMonitor | None
    _attention_step: int | None
    _own_attention: bool
    _collapse_in: tuple[Activation, torch.dtype]
    _follow_logits_dtype: bool
    _losses: list[tuple[int, torch.Tensor]]
    _theta: dict[str, torch.Tensor] | None
    policy: WarningPolicy
    curvature_every_n_steps: int
    _ratio_possible: bool
    _ratio_lr: float
    _lr_ahead: LRAhead | None
    # reduced at the decision (see EarlyWarningMonitor.__init__)
    _loss_values: torch.Tensor | None
    _gap: torch.Tensor | None
    _collapse_counts: torch.Tensor | None
    _max_logit: torch.Tensor | None
    _ratio_losses: torch.Tensor | None
    _decrease: torch.Tensor | None
    warnings: list[dict[str, Any]]
    _gradient_spikes_read: int  # the last step of an OptimizerMonitor's gradient spike read

    def _lead(self, instability: str, step: int) -> str:
        warned = [w for w in self.warnings if w["event"] == instability]
        return f" ({step - warned[0]['step']} steps after the warning)" if warned else ""

    def _happen(self, trainer: Any, instability: str, step: int, what: str) -> None:
        if not self.policy.happen(instability, step):
            return
        message = f"{instability}: {what}{self._lead(instability, step)}"
        self.log_event(trainer, step, WarningReason.happened(instability), message)

    def _gradient_spikes(self, trainer: Any) -> None:
        """The gradient-norm spikes an attached :class:`OptimizerMonitor` saw since the last
        read (its ``gradient_spike`` events): each is a spike here too, the first is when
        ``spike`` happened, as a loss spike is."""
        for source in getattr(trainer, "callbacks", ()):
            if not isinstance(source, OptimizerMonitor):
                continue
            for event in source.events:
                if event["reason"] != OptimizerReason.GRADIENT_SPIKE:
                    continue
                if event["step"] <= self._gradient_spikes_read:
                    continue
                at = self._gradient_spikes_read = int(event["step"])
                lead = self._lead("spike", at) if self.policy.happen("spike", at) else ""
                what = f"spike: the gradient norm (OptimizerMonitor): {event['message']}{lead}"
                self.log_event(trainer, at, WarningReason.SPIKE, what)

    def _attention_sums(self, trainer: Any, step: int) -> dict[str, AttentionLogitSums]:
        """The step's attention statistics: those of the LogitGrowthMonitor that measures the
        same step (read, not taken from it: the same numbers, measured once), or the monitor's
        own where that one does not measure (early on, when this monitor measures densely)."""
        source = self.attention_from
        if source is None or self._own_attention:
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
        if self._follow_logits_dtype:  # no loss sets a precision: the logits' own, as F's loss
            dtype = taken[0].dtype
        self._collapse_in = (activation, dtype)
        # every chunk of the step's logits (a head that runs once per chunk), pooled
        gaps = torch.cat(
            [
                runner_up_gap(x, activation=activation, dtype=dtype).float().reshape(-1)
                for x in taken
            ]
        )
        masks = [collapsed_mask(x, activation=activation, dtype=dtype) for x in taken]
        found_count = torch.stack([m.sum() for m in masks]).sum()
        self._gap = gaps.nanmedian()
        total = sum(m.numel() for m in masks)
        self._collapse_counts = torch.stack([found_count.new_tensor(total), found_count]).float()

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

    def _curvature_due(self, trainer: Any) -> bool:
        """Whether the update ratio is measured at this step (densely early on too)."""
        step = self.cadence_step(trainer)
        every = self.curvature_every_n_steps
        if self.dense_points:
            every = dense_cadence(step, every, RATIO_POINTS)
        limited = any(self.policy.ongoing(i) for i in LIMITED)
        return limited and self._ratio_possible and step % every == 0

    def _limit_crossing(self, step: int, ratio: float) -> Crossing | None:
        """The stability limit along the update, η_c = η / ratio, and when the scheduled
        learning rate reaches it (None before a forecast can be made)."""
        if not ratio > 0 or not self._ratio_lr > 0 or self._lr_ahead is None:
            return None
        ahead = math.ceil(2 * self.policy.horizon_at("divergence", step))
        # the rate of the measured step, then those of the steps after it (the schedulers have
        # stepped: the optimizer's rate now is the next step's)
        rates = [self._ratio_lr, *self._lr_ahead.rates(ahead)]
        return self.policy.forecast_limit(step, self._ratio_lr / ratio, rates)

    def _threshold(self, instability: str) -> float:
        if instability == "collapse":
            return collapse_threshold(self._collapse_in[1], self._collapse_in[0])
        if instability == "divergence":
            return self.policy.divergence_threshold
        return ATTENTION_LIMIT


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
