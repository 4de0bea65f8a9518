"""``dynlens demo``: grokking, softmax collapse and their remedies on modular addition.

Runs of the bias-free [200, 200] ReLU MLP of Prieto et al. 2025 on (a + b) mod 113 with a 40%
training split, full batch, float32, on the CPU:

* ``wd``: AdamW, lr 1e-3, weight decay 1.0 — memorises within a few hundred steps, generalises
  thousands of steps later: grokking;
* ``no_wd``: AdamW, lr 5e-3, no weight decay — memorises, never generalises, and its logits grow
  towards Softmax Collapse (the headroom column falls);
* ``stablemax``: the same with StableMax cross-entropy — no collapse headroom is lost;
* ``orthograd``: ⊥AdamW, lr 1e-2, no weight decay — generalises within a few hundred steps.

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
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from rich import box, get_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from .callbacks import GrokkingMonitor, SoftmaxCollapseMonitor
from .compat import Callback
from .data import ModularArithmetic
from .grokking import GrokkingReport
from .nn import CrossEntropyLoss
from .optim import OrthoGrad


class ModularMLP(pl.LightningModule):
    """Bias-free ReLU MLP for one-hot modular arithmetic (Prieto et al. 2025).

    Input: concatenated one-hot codes of a and b, ``(N, 2p)``; output: ``p`` logits. Logs
    ``train_loss``/``train_acc`` per step and ``val_loss``/``val_acc`` per validation, and returns
    the logits from ``training_step`` so logit monitors can read them.

    Args:
        p: modulus (number of classes).
        hidden: widths of the hidden layers.
        lr, weight_decay, betas, eps: AdamW's arguments.
        activation: ``"softmax"`` or ``"stablemax"`` cross-entropy (a switchable
            :class:`dynlens.CrossEntropyLoss`).
        orthograd: train with ⊥AdamW (:class:`dynlens.OrthoGrad` around AdamW).
    """

    def __init__(
        self,
        p: int = 113,
        hidden: Sequence[int] = (200, 200),
        lr: float = 1e-3,
        weight_decay: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        activation: Literal["softmax", "stablemax"] = "softmax",
        orthograd: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        dims = [2 * p, *hidden]
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(dims):
            layers += [nn.Linear(d_in, d_out, bias=False), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], p, bias=False))
        self.net = nn.Sequential(*layers)
        self.loss_fn = CrossEntropyLoss(activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _evaluate(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        self.log(f"{stage}_loss", loss, batch_size=len(y))
        self.log(f"{stage}_acc", acc, batch_size=len(y))
        return loss, logits

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        loss, logits = self._evaluate(batch, "train")
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        kwargs = {k: h[k] for k in ("lr", "weight_decay", "betas", "eps")}
        if h["orthograd"]:
            return OrthoGrad(self.parameters(), torch.optim.AdamW, **kwargs)
        return torch.optim.AdamW(self.parameters(), **kwargs)


@dataclass(frozen=True)
class DemoRun:
    """One demo configuration."""

    name: str
    lr: float
    weight_decay: float
    max_steps: int
    activation: Literal["softmax", "stablemax"] = "softmax"
    orthograd: bool = False

    @property
    def description(self) -> str:
        optimiser = "⊥AdamW" if self.orthograd else "AdamW"
        loss = ", StableMax" if self.activation == "stablemax" else ""
        return f"{optimiser} lr {self.lr:g}, wd {self.weight_decay:g}{loss}"


@dataclass(frozen=True)
class DemoResult:
    """What the monitors found in one demo run."""

    run: DemoRun
    report: GrokkingReport
    sc_peak: float | None
    headroom: float | None


RUNS = (
    DemoRun("wd", 1e-3, 1.0, 7000),
    DemoRun("no_wd", 5e-3, 0.0, 1500),
    DemoRun("stablemax", 5e-3, 0.0, 1000, activation="stablemax"),
    DemoRun("orthograd", 1e-2, 0.0, 1000, orthograd=True),
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
    callbacks: Sequence[pl.Callback] = (),
) -> DemoResult:
    """Train one demo configuration with the monitors attached and return what they found."""
    torch.manual_seed(seed)
    model = ModularMLP(
        p=datamodule.p,
        lr=run.lr,
        weight_decay=run.weight_decay,
        activation=run.activation,
        orthograd=run.orthograd,
    )
    grokking = GrokkingMonitor(stop_after_generalization=100)
    collapse = SoftmaxCollapseMonitor(every_n_steps=10)
    trainer = pl.Trainer(
        max_steps=run.max_steps,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(logdir), name=run.name, default_hp_metric=False),
        callbacks=[grokking, collapse, *callbacks],
        check_val_every_n_epoch=val_every,  # full batch: one epoch is one step
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=datamodule)
    return DemoResult(
        run, grokking.report, collapse.peak_sc_fraction, collapse.latest.get("headroom_median")
    )


def _fmt(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def results_table(results: Sequence[DemoResult], task: str) -> Table:
    """A rich table comparing what the monitors found in each run (steps are optimizer steps)."""
    threshold = results[0].report.threshold if results else 0.99
    table = Table(
        title=f"{task}: first step at ≥ {threshold:.0%} accuracy",
        caption="\n".join(f"{r.run.name}: {r.run.description}" for r in results),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("run", no_wrap=True)
    for header in ("memorised", "generalised", "delay"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("SC peak", justify="right", no_wrap=True)
    table.add_column("headroom", justify="right", no_wrap=True)
    for r in results:
        style = {"grokking": "bold green", "memorization": "yellow"}.get(r.report.kind, "")
        table.add_row(
            r.run.name,
            _fmt(r.report.memorized_step),
            _fmt(r.report.generalized_step),
            _fmt(r.report.delay),
            f"[{style}]{r.report.kind}[/]" if style else r.report.kind,
            "—" if r.sc_peak is None else f"{r.sc_peak:.0%}",
            "—" if r.headroom is None else f"{r.headroom:.1f}",
        )
    return table


def run_demo(
    logdir: str | Path = "runs/demo",
    *,
    runs: Sequence[DemoRun] = RUNS,
    p: int = 113,
    train_fraction: float = 0.4,
    seed: int = 0,
) -> list[DemoResult]:
    """Train the demo runs, print progress and the comparison table, return the results.

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
    results: list[DemoResult] = []
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
            results.append(
                train_run(run, logdir, datamodule=datamodule, seed=seed, callbacks=[bar])
            )
    console.print(results_table(results, f"(a + b) mod {p}, {train_fraction:.0%} split"))
    console.print(f"View the runs live:  [bold]tensorboard --logdir {logdir}[/]", soft_wrap=True)
    return results
