"""SoftmaxCollapseMonitor: collapse share, headroom, NLM alignment and the StableMax switch."""

from __future__ import annotations

from typing import Any, Literal

import torch
from typing_extensions import override

from ..alignment import nlm_cosine_from_sums, nlm_cosines, nlm_sums
from ..collapse import (
    CollapseIndicators,
    collapse_indicators,
    collapse_threshold,
    runner_up_gap,
)
from ..events import CollapseReason
from ..nn import Activation
from .base import fail_soft
from .capture import (
    LogitsCapture,
    LogProbsTap,
    TargetsArg,
    logits_found,
    same_memory,
    take_logits,
    targets_of,
    targets_said,
)
from .collapse_counts import PendingCounts, counted_from_rows
from .context import logging_step, sharding_strategy
from .layout import Chart
from .pooling import PooledMonitor
from .schedule import StepWindow
from .validate import ConfigurationError, check_choice, check_fraction

Remedy = Literal["stablemax", "float64"]


class SoftmaxCollapseMonitor(PooledMonitor):
    """Watch training logits approach Softmax Collapse (Prieto et al. 2025) and optionally fix it.

    Softmax Collapse (SC): once a sample's softmax sum Σ exp(z − max z) rounds to exactly 1, its
    loss and its correct-class gradient are exactly 0 and it stops teaching the model. Training
    without regularisation drives logits there by aligning the gradient with the *naive loss
    minimisation* direction — scaling the weights — which the monitor also tracks.

    Measured every ``every_n_steps`` steps and logged under ``<prefix>/collapse/`` as often as
    Lightning logs ``self.log`` values: at the last measured step of each ``log_every_n_steps``
    interval (so at every measured step when ``every_n_steps >= log_every_n_steps``), and at the
    end of training. Counts are pooled on the device in between (no host sync):

    * ``sc_fraction``: share of the samples of every step measured since the last log that are
      in collapse (every leading position of ``(..., C)`` logits is a sample), for the
      activation actually in use;
    * ``zero_loss_fraction``: the same share for a per-sample cross-entropy of exactly 0 (needs
      targets);
    * ``headroom_median``, ``headroom_min``: at the logged step, the collapse threshold minus the
      top-vs-runner-up logit gap, for the median and for the worst sample; it falls towards 0
      before collapse starts and is negative for collapsed samples;
    * ``threshold``: the collapse threshold ln(2/eps) of the precision measured in (16.64 for
      float32, 36.74 for float64, 7.62 for float16) — so the panel shows which dtype it was;
    * ``nlm_cosine``: cos(−∇L, θ) over all parameters with a gradient at the logged step, read
      in ``on_before_optimizer_step`` (after gradient accumulation, AMP unscaling and DDP
      averaging); with ``per_layer=True`` also ``nlm_cosine/<parameter name>``.

    An *SC onset* event marks the first measured step whose own share of collapsed samples
    exceeds ``onset_threshold`` (found when the step's interval is logged). With
    ``remedy="stablemax"`` (or ``"float64"``) every measured step is logged until the onset, and
    at the onset every :class:`dynlens.CrossEntropyLoss` in the module is switched to StableMax
    (or to float64); the switch is an event, is kept in the checkpoint and re-applied on resume.
    A remedy changes training by design. Steps measured but not yet logged are kept in
    checkpoints, so a resumed run logs what an uninterrupted one would.

    When the loss is a :class:`dynlens.CrossEntropyLoss` on the very logits measured, in the
    precision measured in and with the monitor's targets, the monitor reads the loss's own
    log-probabilities (:mod:`dynlens.callbacks.capture.log_probs`); else its own ``log_softmax``.

    Args:
        logits_module: ``"auto"`` (default) finds the logits at the first measured step:
            ``training_step``'s ``"logits"`` when it returns them, else the tensor whose
            cross-entropy against the batch's targets reproduces the loss ``training_step``
            returned (a module's output, an element of its tuple, its ``.logits``, or a list of
            chunks), else the outermost module whose output carries ``.logits``, else the
            output of the LightningModule's own ``forward``; the choice is said once (event
            ``logits_found``). Or the name of the submodule producing the logits (a forward
            hook records them during measured steps); ``None`` reads ``outputs["logits"]`` from
            ``training_step``.
        targets: ``"auto"``: the batch's integer tensor, aligned as given or shifted by one
            position, whose mean cross-entropy on the logits reproduces the returned loss
            (negative targets ignored, as ``ignore_index`` does), decided at the first measured
            step and said once (event ``targets``). Where none reproduces it (z-loss, label
            smoothing, a weighted loss), Softmax Collapse is counted from the logits alone, the
            keys that need targets are left out, and the event gives the two values that
            disagreed. Without a loss to compare with, the second element of a ``(x, y)``
            batch or a ``labels``/``targets``/``y`` entry of a dict batch. Or a function
            ``batch -> targets``, or ``None``. Targets outside ``[0, C)``, such as the ``-100``
            of ignored positions, never count as zero-loss.
        shift_targets: ``"auto"``: as the agreement with the loss decides (where both
            alignments reproduce it, or there is no loss, shifted when the logits come from a
            Hugging Face causal LM); ``True`` always shifts, ``False`` never: decided by hand.
        activation: ``"auto"`` follows the first :class:`dynlens.CrossEntropyLoss` in the module
            (softmax if there is none); or ``"softmax"``/``"stablemax"``.
        dtype: precision to measure in; ``"auto"`` is the loss's ``dtype`` when a
            :class:`dynlens.CrossEntropyLoss` sets one, else the logits' own dtype.
        onset_threshold: ``sc_fraction`` above which SC onset is declared (default 0.5).
        remedy: ``None``, ``"stablemax"`` or ``"float64"``.
        per_layer: also log the NLM cosine of every parameter tensor.
        every_n_steps: measure every this many steps (default 10; a measured step costs a pass
            over the loss's log-probabilities, the targets' lookup and a dozen small operations:
            ``benchmarks/collapse.py --paired``, figures in ``benchmarks/RESULTS.md``).
        prefix, verbose: as for every monitor.

    Under DDP the counts are summed over ranks; ``headroom_min`` is exact (max over ranks of the
    largest gap), ``headroom_median`` is the mean of the per-rank medians.
    """

    name = "collapse"
    reasons = CollapseReason

    def __init__(
        self,
        *,
        logits_module: str | None = "auto",
        targets: TargetsArg = "auto",
        shift_targets: bool | Literal["auto"] = "auto",
        activation: Literal["auto", "softmax", "stablemax"] = "auto",
        dtype: torch.dtype | Literal["auto"] = "auto",
        onset_threshold: float = 0.5,
        remedy: Remedy | None = None,
        per_layer: bool = False,
        every_n_steps: int = 10,
        prefix: str = "dynlens",
        verbose: bool = True,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, prefix=prefix, verbose=verbose)
        check_choice("activation", activation, ("auto", "softmax", "stablemax"))
        if dtype != "auto" and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigurationError(
                f"Expected `dtype` 'auto' or a floating torch.dtype (e.g. torch.float64), got "
                f"{dtype!r}."
            )
        check_fraction("onset_threshold", onset_threshold, include_low=True, include_high=False)
        check_choice("remedy", remedy, (None, "stablemax", "float64"))
        check_choice("shift_targets", shift_targets, ("auto", True, False))
        if not (targets is None or targets == "auto" or callable(targets)):
            raise ConfigurationError(
                f"Expected `targets` 'auto', None or a function batch -> targets, got {targets!r}."
            )
        self.capture = LogitsCapture(logits_module)
        self.tap = LogProbsTap(self._measure_in_loss)
        self.targets = targets
        self.shift_targets = shift_targets
        self.activation = activation
        self.dtype = dtype
        self.onset_threshold = float(onset_threshold)
        self.remedy = remedy
        self.per_layer = per_layer
        #: First step with ``sc_fraction`` above ``onset_threshold`` (``None`` until then).
        self.onset_step: int | None = self.add_state("onset_step", None)
        #: Largest ``sc_fraction`` logged so far (``None`` before the first measurement).
        self.peak_sc_fraction: float | None = self.add_state("peak_sc_fraction", None)
        self.remedy_applied: bool = self.add_state("remedy_applied", False)
        self._announced_precision: tuple[str, str] | None
        self.add_state("_announced_precision", None, load=lambda p: None if p is None else tuple(p))
        #: The latest logged values, by quantity name.
        self.latest: dict[str, float] = {}
        #: The counts of the steps measured since the last log (a checkpoint holds them
        #: counted, one row per step).
        self.counts = PendingCounts()
        owned: dict[str, Any] = {"persistent": False, "pooled": True, "owner": self.counts}
        self.add_state("found", list, **owned)
        self.add_state("pending", list, **owned)
        self.add_state("samples", 0, **owned)
        self.add_state(
            "counted",
            list,
            key="pending.rows",
            pooled=True,
            device=True,
            save=lambda _: self.counts.rows(),
            load=counted_from_rows,
            owner=self.counts,
        )
        self._gaps: list[torch.Tensor]  # per-sample gaps of the step to be logged
        self.add_state("_gaps", list, persistent=False, pooled=True)
        # what a log reduces across ranks: the counts per step (summed), the worst and the
        # median gap (the largest gap of any rank; the ranks' mean median), and the NLM cosines,
        # as read at the logged step (the same on every rank), or as the sums of the shards of θ
        # each rank holds under a sharding strategy (summed)
        self._step_counts: torch.Tensor | None = self.add_state(
            "_step_counts", None, persistent=False, reduce="sum"
        )
        self._worst_gap: torch.Tensor | None = self.add_state(
            "_worst_gap", None, persistent=False, reduce="max"
        )
        self._median_gap: torch.Tensor | None = self.add_state(
            "_median_gap", None, persistent=False, reduce="mean"
        )
        self._cosines: dict[str, torch.Tensor] | None = self.add_state(
            "_cosines", None, persistent=False, pooled=True, reduce="local"
        )
        self._nlm_shard_sums: torch.Tensor | None = self.add_state(
            "_nlm_shard_sums", None, persistent=False, pooled=True, reduce="sum"
        )
        self._has_targets: bool = self.add_state("_has_targets", True, key="pending.has_targets")
        self._measured_in: tuple[Activation, torch.dtype]
        self.add_state(
            "_measured_in",
            ("softmax", torch.float32),
            key="pending.measured_in",
            save=lambda m: (m[0], str(m[1])),
            load=lambda m: (m[0], getattr(torch, str(m[1]).removeprefix("torch."))),
        )
        self._logging = False  # whether the step being measured is logged
        self._window = StepWindow()
        self._sharded = False

    def state_key_fields(self) -> dict[str, Any]:
        return {
            **super().state_key_fields(),
            "logits_module": self.capture.logits_module,
            "every_n_steps": self.every_n_steps,
        }

    def panel(self) -> dict[str, Chart]:
        return {
            "softmax collapse (share of samples)": self.multiline(
                "sc_fraction", "zero_loss_fraction"
            ),
            "headroom to the collapse threshold (logits)": self.multiline(
                "headroom_median", "headroom_min"
            ),
            "collapse threshold ln(2/eps) of the precision measured in": self.multiline(
                "threshold"
            ),
            "alignment with naive loss minimisation, cos(−∇L, θ)": [
                "Multiline",
                [f"^{self.key('nlm_cosine')}$", f"^{self.key('nlm_cosine')}/.*$"],
            ],
        }

    # ------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self.tap.attach(pl_module, type(self).__name__)
        if self.remedy is not None and not self.tap.losses:
            raise ConfigurationError(
                f"SoftmaxCollapseMonitor(remedy={self.remedy!r}) switches the loss at SC onset, "
                "but the module has no dynlens.CrossEntropyLoss. Compute the loss with one, e.g. "
                "`self.loss_fn = dynlens.CrossEntropyLoss()` in __init__ and "
                "`loss = self.loss_fn(logits, y)` in training_step, or drop `remedy`."
            )
        self._sharded = sharding_strategy(trainer) is not None
        if self.per_layer and self._sharded:
            raise ConfigurationError(
                f"SoftmaxCollapseMonitor(per_layer=True) needs whole parameter tensors, but "
                f"{sharding_strategy(trainer)} shards them across ranks. Use per_layer=False "
                "(the global nlm_cosine is summed over the shards), or strategy='ddp'."
            )
        self.capture.attach(pl_module, type(self).__name__)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.capture.detach()
        self.tap.detach()
        self._window.close()
        super().teardown(trainer, pl_module, stage)

    @override
    def disable(self, reason: str) -> None:
        # a step that failed half-way must not leave the capture or the loss's hooks recording
        self.capture.disarm()
        self.tap.disarm()
        super().disable(reason)

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        if self.remedy_applied:  # restored from a checkpoint: the loss modules are not
            self._switch_losses()

    # ------------------------------------------------------------------------------ measuring
    def _precision(self, logits: torch.Tensor) -> tuple[Activation, torch.dtype]:
        loss = next(iter(self.tap.losses), None)
        activation: Activation
        if self.activation == "auto":
            activation = loss.activation if loss is not None else "softmax"
        else:
            activation = self.activation
        dtype = self.dtype
        if dtype == "auto":
            dtype = loss.dtype if loss is not None and loss.dtype is not None else logits.dtype
        return activation, dtype

    def _logs_now(self, trainer: Any) -> bool:
        # with a remedy still to apply, every measured step is read, so the switch is not late
        pending_remedy = self.remedy is not None and not self.remedy_applied
        return pending_remedy or self.logs_now(trainer)

    @override
    @fail_soft
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if self.is_due(trainer):
            self._window.open(trainer)
            self.capture.arm(batch, trainer.accumulate_grad_batches)
            self.tap.arm()
            self._logging = self._logs_now(trainer)

    @override
    @fail_soft
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not (self._window.is_open and self._logging):
            return  # the NLM cosine is read at the logged steps only
        named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        if self._sharded:
            # each rank holds a shard of θ and of its gradient (maybe none): the shards' sums
            # are summed across ranks at the log, and the cosine is that of the whole
            grads, params = [p.grad for _, p in named], [p for _, p in named]
            sums = nlm_sums(grads, params) if named else torch.zeros(3, device=pl_module.device)
            self._nlm_shard_sums = sums
        elif named:
            self._cosines = nlm_cosines(named, per_layer=self.per_layer)

    @override
    @fail_soft
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._window.is_open:
            return
        try:
            taken = take_logits(self.capture, outputs, type(self).__name__)
            found = logits_found(self.capture)
            step = logging_step(trainer)
            if found is not None:
                self.log_event(trainer, step, CollapseReason.LOGITS_FOUND, found, once=True)
            said = targets_said(self.capture, self.targets, self.shift_targets)
            if said is not None:
                self.log_event(trainer, step, CollapseReason.TARGETS, said, once=True)
            aligned = targets_of(self.capture, batch, taken, self.targets, self.shift_targets)
            for logits, targets in zip(taken, aligned, strict=True):
                self._accumulate(logits, targets)
        finally:
            self.tap.disarm()
        if self._window.close_if_stepped(trainer):  # the optimizer stepped: the step is whole
            step = logging_step(trainer)
            self._end_step(step)
            if self._logging:
                self.flush(trainer, step, last=self.run_ends_inside_interval(trainer))

    def _measure_in_loss(
        self, input: torch.Tensor, target: torch.Tensor, log_probs: torch.Tensor
    ) -> tuple[torch.dtype, CollapseIndicators, torch.Tensor | None]:
        # inside a dynlens.CrossEntropyLoss's forward: its own log-probabilities, which are then
        # freed with the autograd graph as without the monitor
        found = collapse_indicators(input, target, dtype=log_probs.dtype, log_probs=log_probs)
        gap = None
        if self._logging:
            gap = runner_up_gap(input, dtype=log_probs.dtype, log_probs=log_probs)
        return log_probs.dtype, found, gap

    def _accumulate(self, logits: torch.Tensor, targets: Any) -> None:
        activation, dtype = self._precision(logits)
        tapped = self.tap.take(logits) if activation == "softmax" else None
        if tapped is not None:
            loss_target, (measured_in, found, gap) = tapped
            # the loss's measurement serves when it is in the precision measured in, and its
            # targets are the monitor's own (or the monitor counts none)
            if measured_in != dtype or not (targets is None or same_memory(targets, loss_target)):
                tapped = None
            elif targets is None:
                found = found._replace(target=None, valid=None)
        if tapped is None:
            found = collapse_indicators(logits, targets, activation=activation, dtype=dtype)
            gap = None
            if self._logging:
                gap = runner_up_gap(logits, activation=activation, dtype=dtype)
        self.counts.add(found)
        self._measured_in = (activation, dtype)
        self._has_targets &= found.target is not None
        if gap is not None:
            self._gaps.append(gap.float())

    def _end_step(self, step: int) -> None:
        if self.counts.end_step(step):
            self.mark_measured(step)

    def flush(self, trainer: Any, step: int, last: bool = False) -> None:
        """Log the steps measured since the last log. When a run ends inside a logging interval
        (``last``) they are also kept: a checkpoint saved now carries them, and a run resumed
        from it pools them into the same interval as an uninterrupted run would."""
        if self.counts.empty:
            self._gaps, self._pending_since_log = [], False
            self._cosines = self._nlm_shard_sums = None
            return
        steps, per_step = self.counts.take(keep=last)
        gaps, has_targets = self._gaps, self._has_targets
        self._gaps = []
        if not last:
            self._has_targets = True
        self._pending_since_log = False
        activation, dtype = self._measured_in
        # every pooled step's counts, the gaps and the cosines: one collective per reduction
        # and one host copy
        self._step_counts = per_step
        if gaps:
            gap = torch.cat(gaps) if len(gaps) > 1 else gaps[0]
            self._worst_gap, self._median_gap = gap.max(), gap.median()
        host = self.sync(trainer)
        counts = host["_step_counts"]  # per step: samples, collapsed, zero-loss
        samples = max(sum(c[0] for c in counts), 1.0)
        threshold = collapse_threshold(dtype, activation)
        scalars: dict[str, float] = {
            "sc_fraction": sum(c[1] for c in counts) / samples,
            "threshold": threshold,
        }
        if has_targets:
            scalars["zero_loss_fraction"] = sum(c[2] for c in counts) / samples
        if gaps:
            scalars["headroom_median"] = threshold - host["_median_gap"]
            scalars["headroom_min"] = threshold - host["_worst_gap"]
        if "_nlm_shard_sums" in host:
            sums = torch.tensor(host["_nlm_shard_sums"], dtype=torch.float64)
            scalars["nlm_cosine"] = float(nlm_cosine_from_sums(sums))
        scalars.update(host.get("_cosines", {}))
        logged = self.log_metrics(trainer, scalars, step=step)
        self.latest = {k.removeprefix(self.key("")): v for k, v in logged.items()}

        precision = (activation, str(dtype).removeprefix("torch."))
        if self._announced_precision != precision:
            self._announced_precision = precision
            self.log_event(
                trainer,
                steps[0],
                CollapseReason.PRECISION,
                f"measuring {activation} collapse in {precision[1]} (threshold {threshold:.2f})",
            )
        fractions = [(s, c[1] / max(c[0], 1.0)) for s, c in zip(steps, counts, strict=True)]
        self.peak_sc_fraction = max(
            self.peak_sc_fraction or 0.0, *(fraction for _, fraction in fractions)
        )
        onset = next(((s, f) for s, f in fractions if f > self.onset_threshold), None)
        if self.onset_step is None and onset is not None:
            self.onset_step, fraction = onset
            self.log_event(
                trainer,
                self.onset_step,
                CollapseReason.ONSET,
                f"Softmax Collapse onset: {fraction:.1%} of samples collapsed "
                f"(> {self.onset_threshold:.0%})",
            )
            if self.remedy is not None and not self.remedy_applied:
                self.remedy_applied = True
                switched = self._switch_losses()
                target = "StableMax" if self.remedy == "stablemax" else "float64"
                self.log_event(
                    trainer,
                    self.onset_step,
                    CollapseReason.REMEDY,
                    f"switched {switched} dynlens.CrossEntropyLoss to {target} (remedy)",
                )

    def _switch_losses(self) -> int:
        for loss in self.tap.losses:
            if self.remedy == "stablemax":
                loss.activation = "stablemax"
            else:
                loss.dtype = torch.float64
        return len(self.tap.losses)
