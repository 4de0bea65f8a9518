"""The stability gap: fine-tuning versus experience replay on SplitDigits, evaluated every step.

De Lange et al. 2023 (*Continual evaluation for lifelong learning: identifying the stability
gap*) showed that evaluating only when a task ends hides a sharp drop of the earlier tasks'
accuracy right after the next task starts, followed by a partial recovery — even for methods
such as experience replay whose end-of-task numbers look good. This script reproduces it at CPU
scale: an MLP (64-128-10, one shared 10-way head) learns the five SplitDigits tasks {0, 1},
{2, 3}, …, {8, 9} one after another, 300 SGD steps each (lr 0.01, momentum 0.9, batch 32):

* **fine-tuning** forgets: every earlier task falls to ~0% within a few dozen steps, for good;
* **experience replay** keeps 50 random training samples of every finished task and adds the
  loss of 32 replayed samples to every step's loss: the final accuracy is high, yet each earlier
  task still drops by tens of points when the next task starts, then recovers.

Two ``ContinualEvaluation`` callbacks watch the same run: one evaluates every step (the paper's
continual evaluation), the other only at task ends (``every_n_steps=300``, prefix
``at_task_ends``). Their min-ACC differ by tens of points for replay: that is the paper's point.
Every task is a new ``Trainer.fit``; one callback object follows the whole sequence.

    python examples/stability_gap.py                  # about 20 seconds on a laptop CPU
    tensorboard --logdir runs/stability_gap           # Custom Scalars: the dynlens/continual panel
"""

import argparse
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from rich import box, get_console
from rich.table import Table
from torch import nn

from dynlens import ContinualEvaluation
from dynlens.data import SplitDigits

Strategy = Literal["finetune", "replay"]


class ReplayMLP(pl.LightningModule):
    """MLP 64-hidden-10 for SplitDigits with optional experience replay.

    With ``replay_size > 0`` the module keeps a memory of ``memory_per_task`` random training
    samples of every finished task (call :meth:`remember` when a task ends) and, once the memory
    holds anything, adds the mean loss of ``replay_size`` samples drawn from it to every step's
    loss on the new task's batch. The two means weigh equally whatever the batch sizes. (Averaging
    one concatenated batch of 64 instead halves the weight of the new task's samples: task 0 then
    dropped only 4–24 points at the start of task 1 in our trials, against 33–57 points here;
    later tasks still dropped 27–52 points.)
    Memory selection and replay draws use the module's own seeded generator.
    """

    def __init__(
        self,
        hidden: int = 128,
        lr: float = 0.01,
        momentum: float = 0.9,
        replay_size: int = 0,
        memory_per_task: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.generator = torch.Generator().manual_seed(seed)
        self.memory_x: list[torch.Tensor] = []
        self.memory_y: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def remember(self, dataset: torch.utils.data.TensorDataset) -> None:
        """Store ``memory_per_task`` random samples of a finished task (replay only)."""
        if self.hparams.replay_size == 0:
            return
        x, y = dataset.tensors
        keep = torch.randperm(len(y), generator=self.generator)[: self.hparams.memory_per_task]
        self.memory_x.append(x[keep])
        self.memory_y.append(y[keep])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.memory_x:
            memory_x, memory_y = torch.cat(self.memory_x), torch.cat(self.memory_y)
            pick = torch.randint(
                len(memory_y), (self.hparams.replay_size,), generator=self.generator
            )
            replay_x, replay_y = memory_x[pick].to(self.device), memory_y[pick].to(self.device)
            loss = loss + F.cross_entropy(self(replay_x), replay_y)
        self.log("train_loss", loss, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Called again by every fit: a fresh optimizer (no momentum carried over) per task.
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum
        )


@dataclass
class StabilityGapRun:
    """One strategy's run: the callbacks that watched it and where its logs went."""

    strategy: Strategy
    every_step: ContinualEvaluation
    at_task_ends: ContinualEvaluation
    log_dir: Path


def train(
    strategy: Strategy,
    *,
    steps_per_task: int = 300,
    num_tasks: int = 5,
    logdir: str | Path = "runs/stability_gap",
    seed: int = 0,
) -> StabilityGapRun:
    """Train one strategy task after task, one ``Trainer.fit`` per task, and return its run."""
    torch.manual_seed(seed)  # the MLP's initial weights
    data = SplitDigits(batch_size=32, num_tasks=num_tasks, seed=seed)
    model = ReplayMLP(replay_size=32 if strategy == "replay" else 0, seed=seed)
    every_step = ContinualEvaluation(data.test_sets(), every_n_steps=1, seed=seed)
    at_task_ends = ContinualEvaluation(
        data.test_sets(), every_n_steps=steps_per_task, prefix="at_task_ends", verbose=False
    )
    # One logger for every fit, so each chart is one continuous curve across tasks.
    logger = TensorBoardLogger(str(logdir), name=strategy, version="", default_hp_metric=False)
    for task in range(num_tasks):
        data.current_task = task  # ContinualEvaluation reads it: task boundaries
        trainer = pl.Trainer(
            max_steps=steps_per_task,
            accelerator="cpu",  # a 10k-parameter MLP: the CPU is fastest
            devices=1,
            logger=logger,
            callbacks=[every_step, at_task_ends],
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            log_every_n_steps=1,
        )
        trainer.fit(model, datamodule=data)
        model.remember(data.train_set(task))
    return StabilityGapRun(strategy, every_step, at_task_ends, Path(logger.log_dir))


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def results_table(runs: Sequence[StabilityGapRun]) -> Table:
    """Final metrics per strategy, in percent: what each evaluation protocol would report."""
    table = Table(
        title="SplitDigits, 5 tasks: final metrics (%)",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("strategy", no_wrap=True)
    for header in ("ACC", "min-ACC", "min-ACC at task ends", "WC-ACC", "task-0 gap", "recovery"):
        table.add_column(header, justify="right")
    for run in runs:
        s, ends = run.every_step.summary(), run.at_task_ends.summary()
        table.add_row(
            run.strategy,
            _pct(s["acc"]),
            _pct(s["min_acc"]),
            _pct(ends["min_acc"]),
            _pct(s["wc_acc"]),
            _pct(s["gap"].get(0)),
            _pct(s["recovery"].get(0)),
        )
    return table


def main(
    steps_per_task: int = 300,
    num_tasks: int = 5,
    logdir: str | Path = "runs/stability_gap",
    seed: int = 0,
    strategies: Sequence[Strategy] = ("finetune", "replay"),
) -> dict[str, StabilityGapRun]:
    """Run every strategy, print the comparison and where the logs went; return the runs."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*no `validation_step`.*")  # evaluation is the callback's
    runs = {
        strategy: train(
            strategy, steps_per_task=steps_per_task, num_tasks=num_tasks, logdir=logdir, seed=seed
        )
        for strategy in strategies
    }
    console = get_console()
    console.print(results_table(list(runs.values())))
    for run in runs.values():
        console.print(f"{run.strategy}: TensorBoard logs in {run.log_dir}", soft_wrap=True)
    console.print(f"View them:  tensorboard --logdir {logdir}", soft_wrap=True, highlight=False)
    return runs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-task", type=int, default=300)
    parser.add_argument("--num-tasks", type=int, default=5)
    parser.add_argument("--logdir", default="runs/stability_gap")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps_per_task, args.num_tasks, args.logdir, args.seed)
