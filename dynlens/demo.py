"""``dynlens demo``: grokking (and its absence) on modular addition, live in TensorBoard.

Two runs of the bias-free [200, 200] ReLU MLP of Prieto et al. 2025 on (a + b) mod 113 with a 40%
training split, full batch, float32, on the CPU:

* AdamW, lr 1e-3, weight decay 1.0 — memorises within a few hundred steps, generalises thousands
  of steps later: grokking;
* AdamW, lr 5e-3, no weight decay — memorises and never generalises.

Each run logs to TensorBoard under ``runs/demo/<run>/`` with the monitors attached; the demo
prints a table comparing what the monitors detected.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from rich import box, get_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from ._lightning import Callback
from .callbacks import GrokkingMonitor
from .data import ModularArithmetic
from .grokking import GrokkingReport


class ModularMLP(pl.LightningModule):
    """Bias-free ReLU MLP for one-hot modular arithmetic (Prieto et al. 2025).

    Input: concatenated one-hot codes of a and b, ``(N, 2p)``; output: ``p`` logits. Logs
    ``train_loss``/``train_acc`` per step and ``val_loss``/``val_acc`` per validation.
    """

    def __init__(
        self,
        p: int = 113,
        hidden: Sequence[int] = (200, 200),
        lr: float = 1e-3,
        weight_decay: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        dims = [2 * p, *hidden]
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(dims):
            layers += [nn.Linear(d_in, d_out, bias=False), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], p, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        self.log(f"{stage}_loss", loss, batch_size=len(y))
        self.log(f"{stage}_acc", acc, batch_size=len(y))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        return torch.optim.AdamW(
            self.parameters(), lr=h.lr, weight_decay=h.weight_decay, betas=h.betas, eps=h.eps
        )


@dataclass(frozen=True)
class DemoRun:
    """One demo configuration."""

    name: str
    lr: float
    weight_decay: float
    max_steps: int


RUNS = (
    DemoRun("adamw_wd1", 1e-3, 1.0, 7000),
    DemoRun("adamw_no_wd", 5e-3, 0.0, 1500),
)


class _Progress(Callback):
    """A rich progress bar over optimizer steps showing the latest accuracies."""

    def __init__(self, progress: Progress, description: str, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task(description, total=total, accuracies="")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.progress.update(self.task, completed=trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "train_acc" in m and "val_acc" in m:
            text = f"train {float(m['train_acc']):.3f}  val {float(m['val_acc']):.3f}"
            self.progress.update(self.task, accuracies=text)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.progress.update(self.task, total=trainer.global_step, completed=trainer.global_step)


def train_run(
    run: DemoRun,
    logdir: str | Path,
    *,
    datamodule: ModularArithmetic,
    val_every: int = 10,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    max_steps: int | None = None,
) -> GrokkingMonitor:
    """Train one demo configuration; returns its GrokkingMonitor (``.report`` holds the result)."""
    torch.manual_seed(seed)
    model = ModularMLP(p=datamodule.p, lr=run.lr, weight_decay=run.weight_decay)
    monitor = GrokkingMonitor(stop_after_generalization=100)
    trainer = pl.Trainer(
        max_steps=max_steps or run.max_steps,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(logdir), name=run.name, default_hp_metric=False),
        callbacks=[monitor, *callbacks],
        check_val_every_n_epoch=val_every,  # full batch: one epoch is one step
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=datamodule)
    return monitor


def _fmt(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def results_table(results: Sequence[tuple[DemoRun, GrokkingReport]], task: str) -> Table:
    """A rich table comparing the runs' grokking reports (steps in optimizer steps)."""
    threshold = results[0][1].threshold if results else 0.99
    table = Table(title=f"{task}: first step at ≥ {threshold:.0%} accuracy", box=box.SIMPLE_HEAD)
    table.add_column("run")
    for header in ("AdamW lr", "wd", "memorised", "generalised", "delay"):
        table.add_column(header, justify="right")
    table.add_column("kind")
    for run, report in results:
        style = {"grokking": "bold green", "memorization": "yellow"}.get(report.kind, "")
        table.add_row(
            run.name,
            f"{run.lr:g}",
            f"{run.weight_decay:g}",
            _fmt(report.memorized_step),
            _fmt(report.generalized_step),
            _fmt(report.delay),
            f"[{style}]{report.kind}[/]" if style else report.kind,
        )
    return table


def run_demo(
    logdir: str | Path = "runs/demo",
    *,
    runs: Sequence[DemoRun] = RUNS,
    p: int = 113,
    train_fraction: float = 0.4,
    seed: int = 0,
) -> list[tuple[DemoRun, GrokkingReport]]:
    """Train the demo runs, print progress and the comparison table, return the reports.

    ``p``, ``train_fraction`` and ``runs`` exist so tests can run a shrunken demo; the defaults
    are the demo's set-up.
    """
    # The demo speaks through its own progress display and table, not Lightning's set-up chatter.
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    console = get_console()
    datamodule = ModularArithmetic(p=p, op="+", train_fraction=train_fraction, seed=seed)
    results = []
    columns = (
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[accuracies]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        for run in runs:
            bar = _Progress(progress, run.name, run.max_steps)
            monitor = train_run(run, logdir, datamodule=datamodule, seed=seed, callbacks=[bar])
            results.append((run, monitor.report))
    console.print(results_table(results, f"(a + b) mod {p}, {train_fraction:.0%} split"))
    console.print(f"View the runs live:  [bold]tensorboard --logdir {logdir}[/]", soft_wrap=True)
    return results
