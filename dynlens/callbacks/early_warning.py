"""EarlyWarningMonitor: forecast Softmax Collapse, loss divergence and attention-logit blow-up.

The callback measures the signals and acts; when to warn is the pure
:class:`dynlens.early_warning.WarningPolicy`'s decision.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from typing_extensions import override

from ..early_warning import (
    DENSE_POINTS,
    LIMITED,
    Prediction,
    Setting,
    WarningPolicy,
    warning_record,
)
from ..events import INSTABILITIES, Instability, WarningReason
from ..forecast import update_ratio
from ..loss_events import NOISE_WINDOW, LossEvent
from ..nn import Activation, CrossEntropyLoss
from .base import fail_soft
from .capture import AttentionCapture, LogitsCapture
from .context import logging_step, loss_of, sharding_strategy
from .early_warning_signals import WarningSignals, attention_source
from .layout import Chart
from .logits import LogitGrowthMonitor
from .lr_ahead import LRAhead, largest_rate
from .schedule import StepWindow
from .validate import ConfigurationError, check_bool, check_choice, check_positive_int

Action = Literal["checkpoint", "stop"] | Callable[[dict[str, Any]], Any] | None


class EarlyWarningMonitor(WarningSignals):
    """Warn that an instability is coming while there is still time to act.

    Each measured step (every ``every_n_steps``, and densely early on: ``dense_early``) adds a
    point to the signals the instabilities are forecast from; the
    :class:`dynlens.early_warning.WarningPolicy` fits each signal's window of points
    (:func:`dynlens.forecast.steps_to_threshold`), extrapolates it and decides:

    * **collapse** — the median top-vs-runner-up logit gap, a power of the step, towards the
      collapse threshold ln(2/eps) of the loss's precision (Prieto et al. 2025); the event: more
      than half of a measured step's samples in Softmax Collapse;
    * **divergence** — two signals, the sooner speaks: the scheduled learning rate's crossing of
      the stability limit along the update, η_c = η / the update ratio (two forward passes every
      ``curvature_every_n_steps``; :mod:`dynlens.crossing`), and the training loss, exponential
      towards the divergence threshold. The event (:mod:`dynlens.loss_events`): the loss
      non-finite, or above its lowest by more than its noise and half its ground, staying;
    * **attention** — the largest attention logit (Wortsman et al. 2023), a power of the step,
      towards 1e4; the event: the largest attention logit above 1e4;
    * **spike** — forecast from the same crossing; detected at every step: a loss above the mean
      of the last 128 by 6 of their standard deviations (OLMo-core's rule), each an event;
      ``spike/count`` and ``spike/rate`` are logged.

    A **warning** is raised when the event is expected within the horizon even at the slow end of
    the range, at ``consecutive`` measured points in a row: kept in :attr:`warnings` and in
    checkpoints, written as a text event (reason ``warn_<event>``), and naming the signal that
    spoke. One warning per event until its forecast clears. No trend is extrapolated from points
    that bend down, nor past the step where a rising learning rate stops rising (schedules read
    ahead by :class:`dynlens.callbacks.lr_ahead.LRAhead`). An event is an event of its own
    (reason ``<event>``) and ends its forecasts. Decisions use values reduced across ranks.

    Scalars under ``<prefix>/warning/<event>/``: the signals (``gap_median``, ``threshold``,
    ``sc_fraction``; ``loss``, ``threshold``, ``update_ratio``; ``max_logit``), ``steps_to`` (the
    expected steps to the event while one is expected within twice the horizon) and
    ``spike/count``, ``spike/rate``.

    Args:
        instabilities: which of ``"collapse"``, ``"divergence"``, ``"attention"``, ``"spike"``
            to watch (all by default).
        horizon: warn of an event expected within this many steps, or ``"auto"`` (the default):
            within half the steps so far; one setting, or a mapping event → setting
            (:data:`dynlens.early_warning.HORIZONS`).
        every_n_steps: measure every this many steps (default 10).
        curvature_every_n_steps: measure the update ratio every this many steps (default 100; a
            multiple of ``every_n_steps``; two forward passes on the step's batch).
        window: the measured points a trend is fitted to (at least 4), or ``"auto"``: those of
            the last half of the steps so far (the default); one setting, or a mapping event →
            setting (:data:`dynlens.early_warning.WINDOWS`).
        z: standard errors the slope must be from 0 (default 2).
        consecutive: measured points in a row at which the event must be surely within the
            horizon before a warning: one number for every event, or a mapping event → points;
            by default 2 for collapse, 1 for divergence and 3 for attention
            (:data:`dynlens.early_warning.CONSECUTIVE`; a fit that a few noisy points carry does
            not warn).
        action: at a warning, ``None`` (warn only), ``"checkpoint"`` (save a rollback checkpoint,
            ``dynlens-warning-<event>-step<step>.ckpt`` in ``checkpoint_dir``, default the
            trainer's ``default_root_dir``; every rank takes part, as ``trainer.save_checkpoint``
            requires, and rank 0 writes), ``"stop"`` (stop training cleanly at the end of the
            step), or a function called with the warning's dict (on every rank).
        logits_module: where the collapse signal's logits come from, as for
            :class:`dynlens.SoftmaxCollapseMonitor` (``"auto"``, a submodule name, or ``None``
            for ``training_step``'s ``"logits"``).
        dense_early: measure densely early on, every step at first, then every 2, 4, … steps up
            to ``every_n_steps`` (about 8 points per doubling of the run; the update ratio about
            4), so that an event at step 300 is forecast as early, in share of its run, as one
            at step 30,000; ``False``: every ``every_n_steps`` from the start.
        prefix, verbose: as for every monitor.

    With a :class:`dynlens.LogitGrowthMonitor` attached whose ``attention_every_n_steps`` divides
    ``every_n_steps``, the attention signal is read from its measurement at the steps it measures
    (event ``attention_shared``; should it stop, event ``attention_own``).

    The collapse signal's precision and activation follow the first
    :class:`dynlens.CrossEntropyLoss` in the module (else the logits' dtype, softmax). The ratio
    needs the step's gradient on the step's own batch, so it is not measured with gradient
    accumulation, manual optimisation or sharded strategies (an event says so once); the
    divergence event is then still detected.
    """

    name = "warning"
    reasons = WarningReason

    def __init__(
        self,
        *,
        instabilities: Sequence[Instability] = INSTABILITIES,
        horizon: Setting | Mapping[str, Setting] | None = None,
        every_n_steps: int = 10,
        curvature_every_n_steps: int = 100,
        window: Setting | Mapping[str, Setting] | None = None,
        z: float = 2.0,
        consecutive: int | Mapping[str, int] | None = None,
        action: Action = None,
        checkpoint_dir: str | None = None,
        logits_module: str | None = "auto",
        dense_early: bool = True,
        prefix: str = "dynlens",
        verbose: bool = True,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, prefix=prefix, verbose=verbose)
        check_bool("dense_early", dense_early)
        # early events need points early: measured densely at first (``dense_early``)
        self.dense_points = DENSE_POINTS if dense_early else 0
        try:
            #: When to warn: the forecasts, warnings and events (its state is checkpointed).
            self.policy = WarningPolicy(
                instabilities, horizon=horizon, window=window, consecutive=consecutive, z=z
            )
        except ValueError as err:
            raise ConfigurationError(str(err)) from None
        self.curvature_every_n_steps = check_positive_int(
            "curvature_every_n_steps", curvature_every_n_steps
        )
        if self.curvature_every_n_steps % every_n_steps:
            raise ConfigurationError(
                f"Expected `curvature_every_n_steps` a multiple of `every_n_steps` "
                f"({every_n_steps}), got {curvature_every_n_steps}."
            )
        if not callable(action):
            check_choice("action", action, (None, "checkpoint", "stop"))
        self.action = action
        self.checkpoint_dir = checkpoint_dir
        self.capture = LogitsCapture(logits_module)
        self.attention_capture = AttentionCapture()
        #: The LogitGrowthMonitor whose attention measurement the attention signal is read from
        #: (found at set-up; ``None``: measured by the monitor itself).
        self.attention_from: LogitGrowthMonitor | None = None
        self._attention_step: int | None = None
        self._own_attention = True  # the step's attention is measured by this monitor
        #: Warnings so far: dicts with ``event``, ``step``, ``expected_step``, ``reason``,
        #: ``message`` (and ``checkpoint`` when one was saved).
        self.warnings: list[dict[str, Any]] = self.add_state("warnings", list)
        # the policy's state, under the keys checkpoints have always had
        self.add_state("happened", lambda: dict.fromkeys(self.instabilities), owner=self.policy)
        self.add_state("history", dict, owner=self.policy)
        self.add_state("active", list, owner=self.policy)
        self.add_state("in_a_row", dict, owner=self.policy)
        losses = self.policy.losses
        self.add_state("loss_min", math.inf, owner=losses)
        self.add_state("start", lambda: [0.0, 0.0], key="loss_start", owner=losses)
        self.add_state(
            "recent",
            lambda: deque(maxlen=NOISE_WINDOW),
            key="recent_losses",
            save=list,
            load=lambda saved: deque(saved, maxlen=NOISE_WINDOW),
            owner=losses,
        )
        self.add_state("spikes", 0, owner=losses)
        self._gradient_spikes_read: int = self.add_state("_gradient_spikes_read", -1)
        self.add_state("observed", 0, key="losses_observed", owner=losses)
        self.add_state("away", None, key="loss_away", owner=losses)
        #: The training losses of the steps since the last measured step: (step, loss).
        self._losses: list[tuple[int, torch.Tensor]] = self.add_state(
            "_losses",
            list,
            key="pending.losses",
            save=lambda ls: [(s, float(v)) for s, v in ls],
            load=lambda ls: [(int(s), torch.tensor(float(v))) for s, v in ls],
        )
        # a measured step's signals, reduced across ranks: the losses since the last measured
        # step, the median logit gap and the update ratio's losses (rank means), the collapse
        # counts (summed), the largest attention logit (the ranks' largest), and the first-order
        # decrease (from the DDP-averaged gradient: the same on every rank)
        reduced: dict[str, Any] = {
            "_loss_values": "mean",
            "_gap": "mean",
            "_collapse_counts": "sum",
            "_max_logit": "max",
            "_ratio_losses": "mean",
            "_decrease": "local",
        }
        for name, op in reduced.items():
            self.add_state(name, None, persistent=False, reduce=op)
        #: The latest logged values, by quantity name.
        self.latest: dict[str, float] = {}
        self._window = StepWindow()
        self._theta: dict[str, torch.Tensor] | None = None  # θ before a measured update
        self._collapse_in: tuple[Activation, torch.dtype] = ("softmax", torch.float32)
        self._ratio_possible = True
        self._no_ratio_reason: str | None = None
        self._follow_logits_dtype = True
        #: The latest update ratio η/η_c (``None`` until one is measured).
        self.last_update_ratio: float | None = None
        #: The trainer's schedule read ahead (at set-up): the rates to come, and where a rising
        #: rate stops rising (:class:`dynlens.callbacks.lr_ahead.LRAhead`).
        self._lr_ahead: LRAhead | None = None
        self._ratio_lr = 0.0  # the learning rate of the step whose update ratio is measured

    @property
    def instabilities(self) -> tuple[Instability, ...]:
        """The instabilities forecast."""
        return self.policy.instabilities

    @property
    def happened(self) -> dict[str, int | None]:
        """The step each instability happened at (``None`` until it does)."""
        return self.policy.happened

    def state_key_fields(self) -> dict[str, Any]:
        # "events": the key's name since before the argument was renamed (checkpoints match it)
        return {**super().state_key_fields(), "events": self.instabilities}

    def watches(self, instability: str) -> bool:
        return self.policy.watches(instability)

    def panel(self) -> dict[str, Chart]:
        charts: dict[str, Chart] = {
            "expected steps to each event (while one is expected)": self.multiline(
                *(f"{i}/steps_to" for i in self.instabilities)
            )
        }
        if self.watches("collapse"):
            charts["collapse: median logit gap and the collapse threshold"] = self.multiline(
                "collapse/gap_median", "collapse/threshold"
            )
        if self.watches("divergence"):
            charts["divergence: training loss and the divergence threshold"] = self.multiline(
                "divergence/loss", "divergence/threshold"
            )
        if any(self.watches(i) for i in LIMITED):
            charts["divergence: update ratio η/η_c (1: the step stops lowering the loss)"] = (
                self.multiline("divergence/update_ratio")
            )
        if self.watches("attention"):
            charts["attention: largest attention logit (event at 1e4)"] = self.multiline(
                "attention/max_logit"
            )
        return charts

    # ------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._lr_ahead = LRAhead(trainer)
        if self.watches("collapse"):
            self.capture.attach(pl_module, type(self).__name__)
        if self.watches("attention"):
            self.attention_capture.attach(pl_module, type(self).__name__)
            assert self.every_n_steps is not None  # a fixed cadence: no budget
            self.attention_from = attention_source(trainer, self.every_n_steps)
        losses = [m for m in pl_module.modules() if isinstance(m, CrossEntropyLoss)]
        if losses:
            dtype = losses[0].dtype
            self._collapse_in = (losses[0].activation, dtype or torch.float32)
        self._follow_logits_dtype = not losses or losses[0].dtype is None
        why = None
        if getattr(trainer, "accumulate_grad_batches", 1) > 1:
            why = "gradient accumulation (the gradient is not the last micro-batch's)"
        elif not getattr(pl_module, "automatic_optimization", True):
            why = "manual optimisation"
        elif sharding_strategy(trainer) is not None:
            why = f"{sharding_strategy(trainer)} (the replay needs whole parameters)"
        self._ratio_possible = why is None
        self._no_ratio_reason = why
        if self.action == "checkpoint" and self.checkpoint_dir is None:
            self.checkpoint_dir = trainer.default_root_dir

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.capture.detach()
        self.attention_capture.detach()
        self._window.close()
        self._theta = None
        self._lr_ahead = None  # the trainer is let go
        super().teardown(trainer, pl_module, stage)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.attention_capture.detach()

    @override
    def disable(self, reason: str) -> None:
        self.capture.disarm()
        self.attention_capture.disarm()
        self._theta = None
        super().disable(reason)

    # ------------------------------------------------------------------------------ measuring
    @override
    @fail_soft
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if not self.is_due(trainer):
            return
        self._window.open(trainer)
        if self.watches("collapse"):
            self.capture.arm(batch, trainer.accumulate_grad_batches)
        if self.watches("attention"):
            self._attention_step = trainer.global_step
            source = self.attention_from  # measures this step too, or the monitor measures it
            self._own_attention = source is None or not source.is_due(
                trainer, source.attention_every_n_steps
            )
            if self._own_attention:
                self.attention_capture.arm()

    @override
    @fail_soft
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        self.attention_capture.disarm()  # not in the backward pass or the optimizer step

    @override
    @fail_soft
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._window.is_open and self._curvature_due(trainer):
            self._ratio_lr = largest_rate([optimizer])
            self._theta = {
                k: p.detach().clone() for k, p in pl_module.named_parameters() if p.requires_grad
            }

    @override
    @fail_soft
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = loss_of(outputs)
        if loss is not None and (self.watches("divergence") or self.watches("spike")):
            self._losses.append((logging_step(trainer), loss.detach().reshape(())))
        if not self._window.is_open:
            return
        stepped = self._window.close_if_stepped(trainer)
        collapse = self.policy.ongoing("collapse")
        if self.watches("collapse") and not (stepped and collapse):
            # a micro-batch before the last of an accumulated step (the signal reads the last
            # one's logits), or the collapse came: the logits are let go
            self.capture.take(outputs, type(self).__name__)
        if not stepped:
            return
        self.attention_capture.disarm()
        step = logging_step(trainer)
        if self.watches("spike"):
            self._gradient_spikes(trainer)
        if collapse:
            self._collapse_signal(trainer, outputs)
        if self.watches("attention"):
            sums = self._attention_sums(trainer, step)
            maxima = [s.max_logit for s in sums.values() if isinstance(s.max_logit, torch.Tensor)]
            if maxima:
                self._max_logit = torch.stack(maxima).max().float()
        if self._theta is not None:
            self._ratio_signal(pl_module, batch, batch_idx)
        self._stack_losses(pl_module.device)
        self._decide(trainer, step)

    @override
    @fail_soft
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._losses:  # the losses since the last measured step: an event among them
            self._stack_losses(pl_module.device)
            self._decide(trainer, self._losses[-1][0])
        super().on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------------------ deciding
    def _decide(self, trainer: Any, step: int) -> None:
        host = self.sync(trainer)
        scalars: dict[str, float] = {}
        signals: dict[str, tuple[float, float]] = {}  # instability: (step, value)
        if "_loss_values" in host:
            values = host["_loss_values"]
            steps = [s for s, _ in self._losses]
            self._losses = []
            for event in self.policy.scan_losses(steps, values):
                self._loss_event(trainer, event)
            if self.watches("divergence") and all(math.isfinite(v) for v in values):
                # the mean loss of the steps since the last measured one, at their mean step
                loss = sum(values) / len(values)
                signals["divergence"] = (sum(steps) / len(steps), loss)
                scalars["divergence/loss"] = loss
                if math.isfinite(threshold := self._threshold("divergence")):
                    scalars["divergence/threshold"] = threshold
            if self.watches("spike"):
                scalars["spike/count"] = self.policy.losses.spikes
                scalars["spike/rate"] = self.policy.losses.spike_rate
        if "_collapse_counts" in host:
            samples, collapsed = host["_collapse_counts"]
            share, gap = collapsed / max(samples, 1.0), host["_gap"]
            scalars["collapse/sc_fraction"], scalars["collapse/gap_median"] = share, gap
            scalars["collapse/threshold"] = self._threshold("collapse")
            signals["collapse"] = (step, gap)
            if self.policy.collapsed(share):
                self._happen(trainer, "collapse", step, f"{share:.1%} of the samples collapsed")
        if "_max_logit" in host:
            top = host["_max_logit"]
            scalars["attention/max_logit"] = top
            signals["attention"] = (step, top)
            if self.policy.attention_blew_up(top):
                self._happen(trainer, "attention", step, f"the largest attention logit {top:.4g}")
        limit = None
        if "_ratio_losses" in host:
            before, after = host["_ratio_losses"]
            ratio = update_ratio(before, after, host["_decrease"])
            if math.isfinite(ratio):
                scalars["divergence/update_ratio"] = self.last_update_ratio = ratio
                limit = self._limit_crossing(step, ratio)
        elif any(self.watches(i) for i in LIMITED) and not self._ratio_possible:
            message = f"the update ratio is not measured under {self._no_ratio_reason}"
            self.log_event(trainer, step, WarningReason.NO_UPDATE_RATIO, message, once=True)
        rises = self._lr_ahead.rise_ends_before if self._lr_ahead is not None else None
        limited = [i for i in LIMITED if self.watches(i)] if limit else []
        for instability in dict.fromkeys([*signals, *limited]):
            forecast: Prediction | None = None
            if instability in signals:
                at, value = signals[instability]
                threshold = self._threshold(instability)
                forecast = self.policy.forecast(instability, at, value, threshold, rises)
            predictions = [forecast, *([limit] if instability in limited else [])]
            sooner = self.policy.sooner(instability, *predictions)  # the signal that speaks
            horizon = self.policy.horizon_at(instability, step)
            if sooner is not None and sooner.within(2 * horizon):
                assert sooner.steps_to is not None  # within the horizon: it crosses
                scalars[f"{instability}/steps_to"] = sooner.steps_to
            if self.policy.decide(instability, *predictions):
                assert sooner is not None
                self._warn(trainer, instability, step, sooner)
        logged = self.log_metrics(trainer, scalars, step=step)
        self.latest = {k.removeprefix(self.key("")): v for k, v in logged.items()}

    def _warn(self, trainer: Any, instability: str, step: int, forecast: Prediction) -> None:
        """Raise the warning that ``instability`` is coming: record it, act, log its event."""
        detail = ""
        if instability in LIMITED and self.last_update_ratio is not None:
            detail = f"the latest update ratio η/η_c is {self.last_update_ratio:.3g}"
        warning = warning_record(instability, step, forecast, detail)
        message = warning["message"]
        if self.action == "checkpoint":
            path = os.path.join(
                str(self.checkpoint_dir), f"dynlens-warning-{instability}-step{step}.ckpt"
            )
            trainer.save_checkpoint(path)
            warning["checkpoint"] = path
            message += f"; rollback checkpoint {path}"
        elif self.action == "stop":
            trainer.should_stop = True
            message += "; stopping training"
        warning["message"] = message
        self.warnings.append(warning)
        self.log_event(trainer, step, warning["reason"], message)
        if callable(self.action):
            self.action(dict(warning))

    def _loss_event(self, trainer: Any, event: LossEvent) -> None:
        """A spike (each one an event; the first is when ``spike`` happened) or the divergence,
        read from the training losses."""
        if not self.watches(event.kind):
            return
        if event.kind == "divergence":
            self._happen(trainer, "divergence", event.step, event.describe())
            return
        lead = self._lead("spike", event.step) if self.policy.happen("spike", event.step) else ""
        self.log_event(trainer, event.step, WarningReason.SPIKE, f"spike: {event.describe()}{lead}")
