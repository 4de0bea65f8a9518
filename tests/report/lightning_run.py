"""A short, deterministic Lightning run with every dynlens monitor attached, for report and
TensorBoard-server tests.

The module really trains (Adam on a linear classifier), but the accuracies it logs are scripted
and its logits are scaled up over time, so each monitor's events happen at known steps:
memorised at step 9, generalised at step 19 (``comprehension``), Softmax Collapse onset when the
logit scale explodes from step 12 on. ``ContinualEvaluation`` evaluates two "tasks" (two fixed
random sets) and task 1 starts at step 15, so every continual quantity is logged too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

import dynlens

MAX_STEPS = 30
VAL_EVERY = 2  # full batch: one epoch is one optimizer step


def train_acc_at(step: int) -> float:
    return min(1.0, (step + 1) / 10)


def val_acc_at(step: int) -> float:
    return 0.1 if step < 15 else min(1.0, 0.1 + 0.2 * (step - 14))


class WeightAttention(torch.nn.Module):
    """Parameter-free self-attention over the rows of a matrix through
    ``F.scaled_dot_product_attention``, so LogitGrowthMonitor has a layer to measure; the
    classifier does not use its output, so training is unchanged."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        q = rows[None, None]
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


class CollapsingClassifier(pl.LightningModule):
    """Linear 8 → 4 classifier on a fixed random batch; logits × (1 + 20·max(0, step − 11))."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 4)
        self.attn = WeightAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        scale = 1.0 + 20.0 * max(0, self.global_step - 11)
        logits = self(x) * scale
        self.attn(self.layer.weight * scale)  # measured, not used
        self.log("train_acc", train_acc_at(self.global_step), batch_size=len(x))
        loss = torch.nn.functional.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", val_acc_at(self.global_step), batch_size=len(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Adam, so that HessianMonitor also logs its preconditioned sharpness.
        return torch.optim.Adam(self.parameters(), lr=0.01)


def dataset(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g))


def loader() -> DataLoader:
    return DataLoader(dataset(), batch_size=32)


SECOND_TASK_STEP = 15


class StartSecondTask(pl.Callback):
    """Tell ``ContinualEvaluation`` that task 1 starts at step 15 (as a user's loop would)."""

    def __init__(self, evaluation: dynlens.ContinualEvaluation) -> None:
        self.evaluation = evaluation

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == SECOND_TASK_STEP:
            self.evaluation.start_task(1)


#: Every monitor the live panels are checked for: (family name, factory). Add a monitor here when
#: it lands (its module must log through TensorBoard in this run for the server test to see it).
MONITORS: list[tuple[str, Callable[[], dynlens.Monitor]]] = [
    ("grokking", lambda: dynlens.GrokkingMonitor(verbose=False)),
    (
        "collapse",
        lambda: dynlens.SoftmaxCollapseMonitor(every_n_steps=2, per_layer=True, verbose=False),
    ),
    (
        "hessian",
        lambda: dynlens.HessianMonitor(
            every_n_steps=5, estimator="hutchinson", num_probes=4, max_iter=8, verbose=False
        ),
    ),
    (
        "logits",
        lambda: dynlens.LogitGrowthMonitor(
            every_n_steps=2, attention_every_n_steps=2, verbose=False
        ),
    ),
    (
        "continual",
        lambda: dynlens.ContinualEvaluation(
            {0: dataset(0), 1: dataset(1)}, subset_size=None, verbose=False
        ),
    ),
]


class RecordingLogger(Logger):
    """A logger that keeps every ``log_metrics`` call: exactly what the callbacks computed."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.logged.setdefault(key, []).append((int(step or 0), float(value)))


def train(
    logdir: str | Path,
    name: str = "run",
    monitors: list[dynlens.Monitor] | None = None,
    module: Callable[[], pl.LightningModule] = CollapsingClassifier,
) -> tuple[list[dynlens.Monitor], RecordingLogger, Path]:
    """Train ``module()`` (a :class:`CollapsingClassifier` by default) into ``logdir/name`` and
    return the monitors, the recording logger and the run directory (the event files are closed
    and complete on return)."""
    torch.manual_seed(0)
    monitors = [factory() for _, factory in MONITORS] if monitors is None else monitors
    recorder = RecordingLogger()
    tensorboard = TensorBoardLogger(str(logdir), name=name, version="", default_hp_metric=False)
    extra = [StartSecondTask(m) for m in monitors if isinstance(m, dynlens.ContinualEvaluation)]
    trainer = pl.Trainer(
        max_steps=MAX_STEPS,
        accelerator="cpu",
        devices=1,
        logger=[tensorboard, recorder],
        callbacks=[*monitors, *extra],
        check_val_every_n_epoch=VAL_EVERY,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    trainer.fit(module(), train_dataloaders=loader(), val_dataloaders=loader())
    tensorboard.experiment.flush()
    return monitors, recorder, Path(tensorboard.log_dir)
