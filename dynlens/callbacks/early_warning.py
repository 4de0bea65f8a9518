"""EarlyWarningMonitor: forecast Softmax Collapse, loss divergence and attention-logit blow-up."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from ..collapse import collapse_threshold, collapsed_mask, runner_up_gap
from ..forecast import Forecast, TrendKind, decelerating, steps_to_threshold, update_ratio
from ..nn import CrossEntropyLoss
from .base import (
    Chart,
    ConfigurationError,
    Monitor,
    check_choice,
    check_positive_int,
    check_positive_number,
    fail_soft,
    logging_step,
    sharding_strategy,
)
from .capture import AttentionCapture, LogitsCapture, announce_logits, take_logits
from .logits import LogitGrowthMonitor
from .lr_ahead import LRAhead
from .replay import losses_across_step
from .schedule import StepWindow

Event = Literal["collapse", "divergence", "attention"]
EVENTS: tuple[Event, ...] = ("collapse", "divergence", "attention")

#: The events, exactly. Collapse: more than this share of a measured step's samples in Softmax
#: Collapse (the SoftmaxCollapseMonitor's onset rule), in the precision the loss uses.
COLLAPSE_SHARE = 0.5
#: Divergence: the training loss non-finite, or above this many times its lowest value so far...
DIVERGENCE_FACTOR = 10.0
#: ... from this step on.
DIVERGENCE_AFTER = 50
#: Attention: the largest attention logit of a measured step above this.
ATTENTION_LIMIT = 1e4

#: The signal each event is forecast from: (its quantity, the trend it follows).
SIGNALS: dict[str, tuple[str, TrendKind]] = {
    "collapse": ("gap_median", "power"),
    "divergence": ("loss", "exponential"),
    "attention": ("max_logit", "power"),
}
#: Fewest points a trend may be fitted to.
MIN_POINTS = 4
#: The default window of each event's trend, in measured points: 16 (160 steps at the default
#: cadence), and 32 for the logit gap, which grows over thousands of steps.
WINDOWS: dict[str, int] = {"collapse": 32, "divergence": 16, "attention": 16}
#: The default horizon of each event, in steps: 500, and 1,000 for collapse, whose logit gap
#: grows over thousands of steps (chosen by replaying the benchmark's seeds 4-15,
#: benchmarks/RESULTS.md, fourth round).
HORIZONS: dict[str, int] = {"collapse": 1000, "divergence": 500, "attention": 500}
#: The default measured points in a row at which an event must be surely within the horizon
#: before a warning. Chosen on the benchmark's seeds 4-11 (benchmarks/RESULTS.md): the false
#: alarms there were forecasts that held for one or two points; the divergence, which comes
#: within a few hundred steps of its first trend, warns at the first point.
CONSECUTIVE: dict[str, int] = {"collapse": 2, "divergence": 1, "attention": 3}

Action = Literal["checkpoint", "stop"] | Callable[[dict[str, Any]], Any] | None


class EarlyWarningMonitor(Monitor):
    """Warn that an instability is coming while there is still time to act.

    Each measured step (every ``every_n_steps``) adds a point to the signal each event is
    forecast from, fits the last ``window`` points of it by least squares
    (:func:`dynlens.forecast.steps_to_threshold`) and extrapolates them to the event's threshold:

    * **collapse** — the median top-vs-runner-up logit gap, growing as a power of the step
      towards the collapse threshold ln(2/eps) of the loss's precision (Prieto et al. 2025; a
      difference of logits, which grow as products of weight norms, as the attention logit
      below; a straight line drawn through it expected collapse too early); the event: more
      than half of a measured step's samples in Softmax Collapse;
    * **divergence** — the training loss (its mean over the steps since the last measured one)
      growing exponentially towards 10× its lowest value so far; the event: the training loss
      non-finite, or above 10× its lowest value so far after the first 50 steps (read at every
      step). Beside it, every ``curvature_every_n_steps``, the update ratio η/η_c along the step
      the optimizer took: the loss before and after the step on the step's own batch and the
      first-order decrease −gᵀΔθ, two forward passes (:func:`dynlens.forecast.update_ratio`, the
      critical sharpness of Kalra et al. 2026 over 2/η; 1: the step stops lowering the loss, the
      edge of stability; a loss that grows while the ratio stays near 1 is a step size the model
      can no longer follow), which the warning's message gives;
    * **attention** — the largest attention logit (Wortsman et al. 2023), growing as a power of
      the step towards 1e4 (a straight line in ln–ln: the logit is a product of weight norms,
      and under Adam each weight moves by about the learning rate per step, so the norms grow
      polynomially; an exponential drawn through a window of such growth runs ahead of it, and
      warned of blow-ups that levelled off under qk-layernorm); the event: the largest attention
      logit above 1e4.

    A **warning** is raised when the event is expected within ``horizon`` steps even at the slow end
    of the trend's range (:meth:`dynlens.forecast.Forecast.surely_within`) at ``consecutive``
    measured points in a row (:meth:`decide`): kept in :attr:`warnings`
    and in checkpoints, and written as a text event under ``<prefix>/warning/events`` (reason
    ``warn_<event>``). One warning per event until its forecast clears (the trend surely moves away,
    or puts the event beyond twice the horizon even at the fast end of its range). No forecast is
    made from points that bend down (:func:`dynlens.forecast.decelerating`), nor one whose
    crossing lies past the step where the learning rate stops rising while it rises (a warm-up:
    a loss that climbs with the learning rate may stop when it does; the trainer's step-interval
    schedulers are read ahead by :class:`dynlens.callbacks.lr_ahead.LRAhead`, which puts them
    back as they were). When an event happens it is an event of its own (reason ``<event>``) and
    its forecast stops. Every decision is taken from values reduced across ranks, so every rank
    decides the same.

    Scalars under ``<prefix>/warning/<event>/``: the signals (``gap_median``, ``threshold``,
    ``sc_fraction``; ``loss``, ``threshold``, ``update_ratio``; ``max_logit``) and ``steps_to``,
    the expected steps to the event while one is expected within twice the horizon.

    Args:
        events: which of ``"collapse"``, ``"divergence"``, ``"attention"`` to forecast.
        horizon: warn when the event is expected within this many steps: one number for every
            event, or a mapping event → steps; by default 500, and 1,000 for collapse, which
            comes over thousands of steps (:data:`HORIZONS`).
        every_n_steps: measure every this many steps (default 10).
        curvature_every_n_steps: measure the update ratio every this many steps (default 100; a
            multiple of ``every_n_steps``; two forward passes on the step's batch).
        window: measured points a trend is fitted to, once there are that many (at least 4): one
            number for every event, or a mapping event → points; by default 16, and 32 for
            collapse (:data:`WINDOWS`).
        z: standard errors the slope must be from 0 (default 2).
        consecutive: measured points in a row at which the event must be surely within the
            horizon before a warning: one number for every event, or a mapping event → points;
            by default 2 for collapse, 1 for divergence and 3 for attention
            (:data:`CONSECUTIVE`; a fit that a few noisy points carry does not warn).
        action: at a warning, ``None`` (warn only), ``"checkpoint"`` (save a rollback checkpoint,
            ``dynlens-warning-<event>-step<step>.ckpt`` in ``checkpoint_dir``, default the
            trainer's ``default_root_dir``; every rank takes part, as ``trainer.save_checkpoint``
            requires, and rank 0 writes), ``"stop"`` (stop training cleanly at the end of the
            step), or a function called with the warning's dict (on every rank).
        logits_module: where the collapse signal's logits come from, as for
            :class:`dynlens.SoftmaxCollapseMonitor` (``"auto"``, a submodule name, or ``None``
            for ``training_step``'s ``"logits"``).
        prefix, verbose: as for every monitor.

    With a :class:`dynlens.LogitGrowthMonitor` attached that measures attention at every step
    this monitor measures (its ``attention_every_n_steps`` divides ``every_n_steps``), the
    attention signal is read from its measurement instead of measured a second time (an event
    ``attention_shared`` says so; should it stop measuring, this monitor measures itself from the
    next step on, event ``attention_own``).

    The collapse signal's precision and activation follow the first
    :class:`dynlens.CrossEntropyLoss` in the module (else the logits' dtype, softmax). The ratio
    needs the step's gradient on the step's own batch, so it is not measured with gradient
    accumulation, manual optimisation or sharded strategies (an event says so once); the
    divergence event is then still detected.
    """

    name = "warning"

    def __init__(
        self,
        *,
        events: Sequence[Event] = EVENTS,
        horizon: int | Mapping[str, int] | None = None,
        every_n_steps: int = 10,
        curvature_every_n_steps: int = 100,
        window: int | Mapping[str, int] | None = None,
        z: float = 2.0,
        consecutive: int | Mapping[str, int] | None = None,
        action: Action = None,
        checkpoint_dir: str | None = None,
        logits_module: str | None = "auto",
        prefix: str = "dynlens",
        verbose: bool = True,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, prefix=prefix, verbose=verbose)
        if isinstance(events, str) or not events:
            raise ConfigurationError(
                f"Expected `events` a non-empty sequence of {EVENTS}, got {events!r}: e.g. "
                "events=('collapse',)."
            )
        for event in events:
            check_choice("events", event, EVENTS)
        self.events_watched: tuple[str, ...] = tuple(dict.fromkeys(events))
        #: The steps ahead within which each event is warned of.
        self.horizons = _per_event("horizon", horizon, HORIZONS)
        self.curvature_every_n_steps = check_positive_int(
            "curvature_every_n_steps", curvature_every_n_steps
        )
        if self.curvature_every_n_steps % self.every_n_steps:
            raise ConfigurationError(
                f"Expected `curvature_every_n_steps` a multiple of `every_n_steps` "
                f"({self.every_n_steps}), got {curvature_every_n_steps}."
            )
        #: The points each event's trend is fitted to (the bend of a parabola needs four).
        self.windows = _per_event("window", window, WINDOWS, least=MIN_POINTS)
        self.z = check_positive_number("z", z)
        #: The measured points in a row each event's warning needs.
        self.consecutive = _per_event("consecutive", consecutive, CONSECUTIVE)
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
        #: Warnings so far: dicts with ``event``, ``step``, ``expected_step``, ``reason``,
        #: ``message`` (and ``checkpoint`` when one was saved).
        self.warnings: list[dict[str, Any]] = self.add_state("warnings", list)
        #: The step each event happened at (``None`` until it does).
        self.happened: dict[str, int | None] = self.add_state(
            "happened", lambda: dict.fromkeys(self.events_watched)
        )
        #: Each signal's recent points, ``[step, value]``.
        self.history: dict[str, list[list[float]]] = self.add_state("history", dict)
        #: Events with a warning that has not cleared.
        self.active: list[str] = self.add_state("active", list)
        #: Per event, the measured points in a row at which it was surely within the horizon.
        self.in_a_row: dict[str, int] = self.add_state("in_a_row", dict)
        self.loss_min: float = self.add_state("loss_min", math.inf)
        #: The training losses of the steps since the last measured step: (step, loss).
        self._losses: list[tuple[int, torch.Tensor]] = self.add_state(
            "_losses",
            list,
            key="pending.losses",
            save=lambda ls: [(s, float(v)) for s, v in ls],
            load=lambda ls: [(int(s), torch.tensor(float(v))) for s, v in ls],
        )
        #: The latest logged values, by quantity name.
        self.latest: dict[str, float] = {}
        self._window = StepWindow()
        self._theta: dict[str, torch.Tensor] | None = None  # θ before a measured update
        self._collapse_in: tuple[str, torch.dtype] = ("softmax", torch.float32)
        self._ratio_possible = True
        self._no_ratio_reason: str | None = None
        self._follow_logits_dtype = True
        #: The latest update ratio η/η_c (``None`` until one is measured).
        self.last_update_ratio: float | None = None
        #: Where the learning rate stops rising before a step, if it rises now (read from the
        #: trainer's schedulers at set-up: :class:`dynlens.callbacks.lr_ahead.LRAhead`).
        self._rise_ends_before: Callable[[float], int | None] = lambda step: None

    def state_key_fields(self) -> dict[str, Any]:
        return {**super().state_key_fields(), "events": self.events_watched}

    def watches(self, event: str) -> bool:
        return event in self.events_watched

    def panel(self) -> dict[str, Chart]:
        charts: dict[str, Chart] = {
            "expected steps to each event (while one is expected)": self.multiline(
                *(f"{e}/steps_to" for e in self.events_watched)
            )
        }
        if self.watches("collapse"):
            charts["collapse: median logit gap and the collapse threshold"] = self.multiline(
                "collapse/gap_median", "collapse/threshold"
            )
        if self.watches("divergence"):
            charts["divergence: training loss and 10× its lowest value"] = self.multiline(
                "divergence/loss", "divergence/threshold"
            )
            charts["divergence: update ratio η/η_c (1: the step stops lowering the loss)"] = (
                self.multiline("divergence/update_ratio")
            )
        if self.watches("attention"):
            charts["attention: largest attention logit (event at 1e4)"] = self.multiline(
                "attention/max_logit"
            )
        return charts

    # ------------------------------------------------------------------------------ set-up
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._rise_ends_before = LRAhead(trainer).rise_ends_before
        if self.watches("collapse"):
            self.capture.attach(pl_module, type(self).__name__)
        if self.watches("attention"):
            self.attention_capture.attach(pl_module, type(self).__name__)
            self.attention_from = _attention_source(trainer, self.every_n_steps)
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

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.capture.detach()
        self.attention_capture.detach()
        self._window.close()
        self._theta = None
        self._rise_ends_before = lambda step: None  # the trainer is let go

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.attention_capture.detach()

    def disable(self, reason: str) -> None:
        self.capture.disarm()
        self.attention_capture.disarm()
        self._theta = None
        super().disable(reason)

    # ------------------------------------------------------------------------------ measuring
    def _curvature_due(self, trainer: Any) -> bool:
        return (
            self.watches("divergence")
            and self._ratio_possible
            and self.happened.get("divergence") is None
            and self.is_due(trainer, self.curvature_every_n_steps)
        )

    @fail_soft
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if not self.is_due(trainer):
            return
        self._window.open(trainer)
        if self.watches("collapse"):
            self.capture.arm()
        if self.watches("attention"):
            self._attention_step = trainer.global_step
            if self.attention_from is None:
                self.attention_capture.arm()

    @fail_soft
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        self.attention_capture.disarm()  # not in the backward pass or the optimizer step

    @fail_soft
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._window.is_open and self._curvature_due(trainer):
            self._theta = {
                k: p.detach().clone() for k, p in pl_module.named_parameters() if p.requires_grad
            }

    @fail_soft
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = _loss_of(outputs)
        if loss is not None and self.watches("divergence"):
            self._losses.append((logging_step(trainer), loss.detach().reshape(())))
        if not self._window.is_open:
            return
        stepped = self._window.close_if_stepped(trainer)
        collapse = self.watches("collapse") and self.happened.get("collapse") is None
        if self.watches("collapse") and not (stepped and collapse):
            # a micro-batch before the last of an accumulated step (the signal reads the last
            # one's logits), or the collapse came: the logits are let go
            self.capture.take(outputs, type(self).__name__)
        if not stepped:
            return
        self.attention_capture.disarm()
        step = logging_step(trainer)
        parts: dict[str, tuple[torch.Tensor, str | None]] = {}
        if collapse:
            parts.update(self._collapse_parts(trainer, outputs))
        if self.watches("attention"):
            sums = self._attention_sums(trainer, step)
            maxima = [s.max_logit for s in sums.values() if isinstance(s.max_logit, torch.Tensor)]
            if maxima:
                parts["max_logit"] = (torch.stack(maxima).max().float(), "max")
        if self._theta is not None:
            parts.update(self._ratio_parts(pl_module, batch, batch_idx))
        self._decide(trainer, step, {**parts, **self._loss_part(pl_module.device)})

    def _attention_sums(self, trainer: Any, step: int) -> dict:
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
            self.log_event(trainer, step, "attention_own", message, once=True)
            return {}
        message = (
            "the largest attention logit is read from LogitGrowthMonitor's measurement (every "
            f"{source.attention_every_n_steps} steps), not measured twice"
        )
        self.log_event(trainer, step, "attention_shared", message, once=True)
        return sums

    def _loss_part(self, device: torch.device) -> dict[str, tuple[torch.Tensor, str]]:
        if not self._losses:
            return {}
        return {"losses": (torch.stack([v.to(device) for _, v in self._losses]), "mean")}

    def _collapse_parts(self, trainer: Any, outputs: Any) -> dict[str, tuple[torch.Tensor, str]]:
        taken = take_logits(self.capture, outputs, type(self).__name__)
        announce_logits(self, trainer, logging_step(trainer), self.capture)
        activation, dtype = self._collapse_in
        logits = taken[-1]
        if self._follow_logits_dtype:  # no loss sets a precision: the logits' own, as F's loss
            dtype = logits.dtype
        self._collapse_in = (activation, dtype)
        gaps = runner_up_gap(logits, activation=activation, dtype=dtype).float()
        collapsed = collapsed_mask(logits, activation=activation, dtype=dtype)
        found = collapsed.sum()
        counts = torch.stack([found.new_tensor(collapsed.numel()), found]).float()
        return {"gap": (gaps.nanmedian(), "mean"), "counts": (counts, "sum")}

    def _ratio_parts(self, pl_module: Any, batch: Any, batch_idx: int) -> dict:
        theta, self._theta = self._theta, None
        named = dict(pl_module.named_parameters())
        if any(named[k].grad is None for k in theta):
            return {}
        with torch.no_grad():  # −gᵀΔθ, with the gradient the step used
            decrease = -sum(
                (named[k].grad * (named[k].detach() - t)).sum() for k, t in theta.items()
            )
        losses = losses_across_step(pl_module, batch, batch_idx, theta)
        return {"ratio_losses": (losses, "mean"), "decrease": (decrease.float().reshape(()), None)}

    @fail_soft
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._losses:  # the losses since the last measured step: an event among them
            self._decide(trainer, self._losses[-1][0], self._loss_part(pl_module.device))

    # ------------------------------------------------------------------------------ deciding
    def _decide(self, trainer: Any, step: int, parts: dict) -> None:
        host = self.reduce_to_host(trainer, parts)
        scalars: dict[str, float] = {}
        signals: dict[str, tuple[float, float]] = {}  # event: (step, value)
        if "losses" in host:
            steps = self._scan_losses(trainer, host["losses"])
            if all(math.isfinite(v) for v in host["losses"]):
                # the mean loss of the steps since the last measured one, at their mean step
                loss = sum(host["losses"]) / len(host["losses"])
                signals["divergence"] = (sum(steps) / len(steps), loss)
                scalars["divergence/loss"] = loss
                scalars["divergence/threshold"] = self._threshold("divergence")
        if "counts" in host:
            samples, collapsed = host["counts"]
            share, gap = collapsed / max(samples, 1.0), host["gap"][0]
            scalars["collapse/sc_fraction"], scalars["collapse/gap_median"] = share, gap
            scalars["collapse/threshold"] = self._threshold("collapse")
            signals["collapse"] = (step, gap)
            if share > COLLAPSE_SHARE:
                self._happen(trainer, "collapse", step, f"{share:.1%} of the samples collapsed")
        if "max_logit" in host:
            top = host["max_logit"][0]
            scalars["attention/max_logit"] = top
            signals["attention"] = (step, top)
            if top > ATTENTION_LIMIT:
                self._happen(trainer, "attention", step, f"the largest attention logit {top:.4g}")
        if "ratio_losses" in host:
            before, after = host["ratio_losses"]
            ratio = update_ratio(before, after, host["decrease"][0])
            if math.isfinite(ratio):
                scalars["divergence/update_ratio"] = self.last_update_ratio = ratio
        elif self.watches("divergence") and not self._ratio_possible:
            message = f"the update ratio is not measured under {self._no_ratio_reason}"
            self.log_event(trainer, step, "no_update_ratio", message, once=True)
        for event, (at, value) in signals.items():
            forecast = self._forecast(event, at, value)
            if forecast is not None and forecast.within(2 * self.horizons[event]):
                scalars[f"{event}/steps_to"] = forecast.steps_to
            self._warn_or_clear(trainer, event, step, forecast)
        logged = self.log_metrics(trainer, scalars, step=step)
        self.latest = {k.removeprefix(self.key("")): v for k, v in logged.items()}

    def _scan_losses(self, trainer: Any, values: list[float]) -> list[int]:
        """Find the divergence among the pending losses (their reduced ``values``), update the
        lowest loss, and let them go; the steps they were taken at."""
        steps = [s for s, _ in self._losses]
        self._losses = []
        for s, value in zip(steps, values, strict=True):
            if self.happened.get("divergence") is None:
                if not math.isfinite(value):
                    self._happen(trainer, "divergence", s, f"the training loss is {value}")
                elif s >= DIVERGENCE_AFTER and value > DIVERGENCE_FACTOR * self.loss_min:
                    self._happen(
                        trainer,
                        "divergence",
                        s,
                        f"the training loss {value:.4g} is above {DIVERGENCE_FACTOR:g}× its "
                        f"lowest value so far ({self.loss_min:.4g})",
                    )
            if math.isfinite(value):
                self.loss_min = min(self.loss_min, value)
        return steps

    def _forecast(self, event: str, step: float, value: float) -> Forecast | None:
        kind = SIGNALS[event][1]
        if not math.isfinite(value) or (kind != "linear" and value <= 0):
            return None
        if kind == "power" and step <= 0:
            return None  # a power of the step: from step 1 on
        if self.happened.get(event) is not None:
            return None  # the event came: no more forecasts of it
        points = self.history.setdefault(event, [])
        points.append([float(step), float(value)])
        del points[: -self.windows[event]]
        threshold = self._threshold(event)
        if len(points) < self.windows[event] or not math.isfinite(threshold):
            return None
        steps, values = zip(*points, strict=True)
        forecast = steps_to_threshold(steps, values, threshold, kind=kind, rising=True, z=self.z)
        horizon = self.horizons[event]
        if event not in self.active and not (
            forecast.within(2 * horizon) or forecast.surely_within(horizon)
        ):
            return None  # nothing is logged or decided from it: the bend is not worth a fit
        expected = forecast.expected_step
        if expected is not None and self._rise_ends_before(expected) is not None:
            return None  # the learning rate stops rising first: a signal rising with it may too
        if decelerating(steps, values, kind=kind, z=self.z):
            return None  # levelling off: a line would reach what the signal may not
        return forecast

    def _threshold(self, event: str) -> float:
        if event == "collapse":
            return collapse_threshold(self._collapse_in[1], self._collapse_in[0])
        if event == "divergence":
            return DIVERGENCE_FACTOR * self.loss_min
        return ATTENTION_LIMIT

    def decide(self, event: str, forecast: Forecast | None) -> bool:
        """Whether ``forecast`` (the event's forecast at a measured point, ``None`` for none)
        raises a warning now; updates which warnings are active and the points in a row.

        A warning needs the event surely within the horizon at ``consecutive`` measured points
        in a row. An active warning clears once the trend surely moves away, or puts the event
        beyond twice the horizon even at the fast end of its range; a bending or missing fit
        says nothing."""
        if self.happened.get(event) is not None:
            return False
        if event in self.active:
            if forecast is not None and self._cleared(event, forecast):
                self.active.remove(event)
            return False
        if forecast is None or not forecast.surely_within(self.horizons[event]):
            self.in_a_row[event] = 0
            return False
        self.in_a_row[event] = self.in_a_row.get(event, 0) + 1
        if self.in_a_row[event] < self.consecutive[event]:
            return False
        self.in_a_row[event] = 0
        self.active.append(event)
        return True

    def _warn_or_clear(
        self, trainer: Any, event: str, step: int, forecast: Forecast | None
    ) -> None:
        if not self.decide(event, forecast):
            return
        assert forecast is not None
        quantity, _ = SIGNALS[event]
        expected = math.ceil(forecast.expected_step)
        message = (
            f"{event} expected at step {expected} (in {expected - step} steps, range "
            f"{forecast.range_text()}): {quantity} is trending to {forecast.threshold:.4g}"
        )
        if event == "divergence" and self.last_update_ratio is not None:
            message += f"; the latest update ratio η/η_c is {self.last_update_ratio:.3g}"
        warning = {
            "event": event,
            "step": int(step),
            "expected_step": expected,
            "reason": f"warn_{event}",
            "message": message,
        }
        if self.action == "checkpoint":
            path = os.path.join(
                str(self.checkpoint_dir), f"dynlens-warning-{event}-step{step}.ckpt"
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

    def _cleared(self, event: str, forecast: Forecast) -> bool:
        trend = forecast.trend
        if trend.slope < -self.z * trend.slope_stderr:
            return True
        horizon = self.horizons[event]
        return forecast.lower is not None and forecast.lower - trend.last_step > 2 * horizon

    def _happen(self, trainer: Any, event: str, step: int, what: str) -> None:
        if self.happened.get(event) is not None:
            return
        self.happened[event] = int(step)
        if event in self.active:
            self.active.remove(event)
        warned = [w for w in self.warnings if w["event"] == event]
        lead = f" ({step - warned[0]['step']} steps after the warning)" if warned else ""
        self.log_event(trainer, step, event, f"{event}: {what}{lead}")


def _per_event(
    name: str, given: int | Mapping[str, int] | None, defaults: Mapping[str, int], least: int = 1
) -> dict[str, int]:
    """A setting given as one number for every event, or as a mapping event → number (events
    not in it, and ``None``, take ``defaults``); each a whole number of at least ``least``."""
    values = given if isinstance(given, Mapping) else dict.fromkeys(EVENTS, given)
    for event in values:
        check_choice(name, event, EVENTS)
    settings = {}
    for event in EVENTS:
        value = values.get(event)
        value = defaults[event] if value is None else check_positive_int(name, value)
        if value < least:
            raise ConfigurationError(f"Expected `{name}` >= {least}, got {given!r}.")
        settings[event] = value
    return settings


def _attention_source(trainer: Any, every_n_steps: int) -> LogitGrowthMonitor | None:
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


def _loss_of(outputs: Any) -> torch.Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
