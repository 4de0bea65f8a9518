"""GrokkingMonitor: memorisation, generalisation, delay and weight norm, live."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from ..events import GrokkingReason
from ..grokking import GrokkingReport, detect_grokking, weight_norm
from .base import Monitor, fail_soft
from .context import logging_step, sharding_strategy
from .layout import Chart
from .validate import (
    ConfigurationError,
    check_fraction,
    check_non_negative_int,
    check_positive_int,
)

#: Metric names tried, in order, when no key is given. ``_step``/``_epoch`` variants count too.
TRAIN_ACC_KEYS = (
    "train_acc",
    "train/acc",
    "train_accuracy",
    "train/accuracy",
    "acc/train",
    "accuracy/train",
    "acc",
    "accuracy",
)
VAL_ACC_KEYS = (
    "val_acc",
    "val/acc",
    "val_accuracy",
    "val/accuracy",
    "acc/val",
    "accuracy/val",
    "valid_acc",
    "validation_acc",
    "valid/acc",
    "validation/acc",
)


def _find(metrics: Mapping[str, Any], candidates: Sequence[str]) -> str | None:
    for name in candidates:
        for key in (name, f"{name}_step", f"{name}_epoch"):
            if key in metrics:
                return key
    return None


class GrokkingMonitor(Monitor):
    """Detect memorisation, generalisation and grokking from the run's logged accuracies.

    At the end of every validation run (not the sanity check) it reads the latest training and
    validation accuracy from ``trainer.callback_metrics`` — log them in your LightningModule, e.g.
    ``self.log("train_acc", acc)`` in ``training_step`` and ``self.log("val_acc", acc)`` in
    ``validation_step`` — averages them over DDP ranks, and applies
    :func:`dynlens.grokking.detect_grokking` to the whole history. Steps are Lightning's logging
    steps, the x-axis of every chart.

    Logged under ``<prefix>/grokking/``: ``train_acc``, ``val_acc`` (the accuracies it read),
    ``weight_norm`` (‖θ‖₂, Omnigrok), ``phase`` (0 learning, 1 memorised, 2 generalised), and once
    known ``memorized_step``, ``generalized_step``, ``delay``, ``transition_steps``. Memorisation,
    generalisation and the final classification are text events and console lines.

    Args:
        train_acc_key: metric holding training accuracy; ``None`` tries common names
            (``train_acc``, ``train/acc``, ``train_accuracy``, …, with ``_step``/``_epoch``).
        val_acc_key: metric holding validation accuracy; ``None`` tries ``val_acc``, ``val/acc``, …
        threshold: accuracy that counts as memorised/generalised (Power et al. 2022: 0.99).
        grokking_delay: smallest delay classified as grokking (Liu et al. 2022: 1000 steps).
        stop_after_generalization: stop training this many steps after generalisation
            (``None``: never stop).
        prefix: first part of the metric keys.
        verbose: print event lines to the console (rank 0).

    Example::

        trainer = Trainer(callbacks=[GrokkingMonitor(stop_after_generalization=500)], ...)
        trainer.fit(model, datamodule)
        print(trainer.callbacks[0].report.kind)      # "grokking"
    """

    name = "grokking"
    reasons = GrokkingReason

    def __init__(
        self,
        *,
        train_acc_key: str | None = None,
        val_acc_key: str | None = None,
        threshold: float = 0.99,
        grokking_delay: int = 1000,
        stop_after_generalization: int | None = None,
        prefix: str = "dynlens",
        verbose: bool = True,
    ) -> None:
        super().__init__(prefix=prefix, verbose=verbose)
        for arg, value in (("train_acc_key", train_acc_key), ("val_acc_key", val_acc_key)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigurationError(f"Expected `{arg}` to be a metric name, got {value!r}.")
        check_fraction("threshold", threshold)
        check_non_negative_int("grokking_delay", grokking_delay)
        if stop_after_generalization is not None and stop_after_generalization != 0:
            check_positive_int("stop_after_generalization", stop_after_generalization)
        self.train_acc_key = train_acc_key
        self.val_acc_key = val_acc_key
        self.threshold = float(threshold)
        self.grokking_delay = grokking_delay
        self.stop_after_generalization = stop_after_generalization
        self.steps: list[int]
        self.add_state("steps", list, load=lambda steps: [int(s) for s in steps])
        self.train_acc: list[float]
        self.add_state("train_acc", list, load=lambda accs: [float(a) for a in accs])
        self.val_acc: list[float]
        self.add_state("val_acc", list, load=lambda accs: [float(a) for a in accs])
        # read at a validation: the accuracies (rank mean) and the weight norm, whole on every
        # rank (local), or as the squared norms of the shards each rank holds (summed)
        self._accuracies: torch.Tensor | None = self.add_state(
            "_accuracies", None, persistent=False, reduce="mean"
        )
        self._weight_norm: torch.Tensor | None = self.add_state(
            "_weight_norm", None, persistent=False, reduce="local"
        )
        self._shard_norms_squared: torch.Tensor | None = self.add_state(
            "_shard_norms_squared", None, persistent=False, reduce="sum"
        )

    def state_key_fields(self) -> dict[str, Any]:
        return {
            **super().state_key_fields(),
            "train_acc_key": self.train_acc_key,
            "val_acc_key": self.val_acc_key,
            "threshold": self.threshold,
        }

    @property
    def report(self) -> GrokkingReport:
        """Detection over everything recorded so far."""
        return detect_grokking(
            self.steps,
            self.train_acc,
            self.val_acc,
            threshold=self.threshold,
            grokking_delay=self.grokking_delay,
        )

    def panel(self) -> dict[str, Chart]:
        return {
            "accuracy": self.multiline("train_acc", "val_acc"),
            "weight norm ‖θ‖₂": self.multiline("weight_norm"),
            "phase (0 learning, 1 memorised, 2 generalised)": self.multiline("phase"),
            "detected steps": self.multiline(
                "memorized_step", "generalized_step", "delay", "transition_steps"
            ),
        }

    def _accuracy_keys(self, metrics: Mapping[str, Any]) -> tuple[str, str]:
        train = _find(metrics, (self.train_acc_key,) if self.train_acc_key else TRAIN_ACC_KEYS)
        val = _find(metrics, (self.val_acc_key,) if self.val_acc_key else VAL_ACC_KEYS)
        if train is not None and val is not None:
            return train, val
        own = f"{self.prefix}/"
        available = sorted(k for k in metrics if not k.startswith(own))
        missing = " and ".join(
            what for what, key in (("training", train), ("validation", val)) if key is None
        )
        raise ConfigurationError(
            f"GrokkingMonitor found no {missing} accuracy among the logged metrics {available}. "
            "Log them from your LightningModule, e.g. `self.log('train_acc', acc)` in "
            "`training_step` and `self.log('val_acc', acc)` in `validation_step`, or name your "
            "keys: `GrokkingMonitor(train_acc_key=..., val_acc_key=...)`."
        )

    @override
    @fail_soft
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        train_key, val_key = self._accuracy_keys(metrics)
        self._accuracies = torch.stack([metrics[train_key].float(), metrics[val_key].float()])
        norm = weight_norm(pl_module.parameters()).to(self._accuracies.device)
        if sharding_strategy(trainer) is not None:  # each rank holds a shard of θ: add them up
            self._shard_norms_squared = norm.square()
        else:
            self._weight_norm = norm
        host = self.sync(trainer)  # every rank, same step
        train_acc, val_acc = host["_accuracies"]
        if "_weight_norm" in host:
            norm_value = host["_weight_norm"]
        else:
            norm_value = math.sqrt(host["_shard_norms_squared"])

        step = logging_step(trainer)
        before = self.report
        self._record(step, train_acc, val_acc)
        report = self.report

        scalars: dict[str, float] = {
            "train_acc": train_acc,
            "val_acc": val_acc,
            "weight_norm": norm_value,
            "phase": report.phase,
        }
        for field in ("memorized_step", "generalized_step", "delay", "transition_steps"):
            value = getattr(report, field)
            if value is not None:
                scalars[field] = value
        self.log_metrics(trainer, scalars, step=step)
        self._announce(trainer, before, report)

        stop_after = self.stop_after_generalization
        if (
            stop_after is not None
            and report.generalized_step is not None
            and step - report.generalized_step >= stop_after
            and not trainer.should_stop
        ):
            trainer.should_stop = True
            self.log_event(
                trainer,
                step,
                GrokkingReason.STOPPED,
                f"stopping training {step - report.generalized_step} steps after generalisation "
                f"(stop_after_generalization={stop_after})",
            )

    def _record(self, step: int, train_acc: float, val_acc: float) -> None:
        # A step at or before the last recorded one means the step counter restarted (a new
        # Trainer): the later points belong to an earlier run and are dropped.
        while self.steps and self.steps[-1] >= step:
            self.steps.pop()
            self.train_acc.pop()
            self.val_acc.pop()
        self.steps.append(step)
        self.train_acc.append(train_acc)
        self.val_acc.append(val_acc)

    def _announce(self, trainer: Any, before: GrokkingReport, now: GrokkingReport) -> None:
        threshold = f"{now.threshold:g}"
        if before.memorized_step is None and now.memorized_step is not None:
            self.log_event(
                trainer,
                now.memorized_step,
                GrokkingReason.MEMORIZED,
                f"memorised: training accuracy reached {threshold}",
            )
        if before.generalized_step is None and now.generalized_step is not None:
            detail = f", {now.delay} steps after memorisation" if now.delay is not None else ""
            self.log_event(
                trainer,
                now.generalized_step,
                GrokkingReason.GENERALIZED,
                f"generalised: validation accuracy reached {threshold}{detail} ({now.kind})",
            )

    @override
    @fail_soft
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.steps:
            self._summarise(trainer)
        super().on_train_end(trainer, pl_module)

    def _summarise(self, trainer: Any) -> None:
        r = self.report
        never = f"never reached {r.threshold:g}"
        details = [
            f"memorised at {r.memorized_step}"
            if r.memorized_step is not None
            else f"training accuracy {never}",
            f"generalised at {r.generalized_step}"
            if r.generalized_step is not None
            else f"validation accuracy {never}",
        ]
        if r.delay is not None:
            details.append(f"delay {r.delay}")
        self.log_event(
            trainer,
            self.steps[-1],
            GrokkingReason.SUMMARY,
            f"run classified as {r.kind} ({', '.join(details)})",
        )
