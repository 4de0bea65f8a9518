"""Edge of stability, live: full-batch gradient descent drives the sharpness up to 2/η.

Cohen et al. (2021), *Gradient Descent on Neural Networks Typically Occurs at the Edge of
Stability*, fig. 1, shrunk to a CPU: a tanh MLP [20 → 200 → 200 → 10] trained by full-batch
gradient descent (η = 0.4) with their MSE scaling ½·Σ(f − y)²/n on 1,000 Gaussian points whose
one-hot labels come from a random teacher network of the same shape. The sharpness λ_max starts
near 0.6 · 2/η, rises (progressive sharpening), overshoots 2/η for a few dozen steps (the loss
spikes and the network "catapults" to a flatter region), then hovers just above 2/η while the loss
keeps falling, non-monotonically. HessianMonitor logs λ_max with 2/η on one chart and
η·λ_max/2 (``eos_ratio``) with a reference line at 1.

    python examples/edge_of_stability.py             # 3,000 steps, a minute or two on a CPU
    tensorboard --logdir runs/examples               # Custom Scalars tab: dynlens/hessian
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from dynlens import HessianMonitor


def mlp(width: int = 200, inputs: int = 20, outputs: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, outputs),
    )


def teacher_data(n: int = 1000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian inputs with one-hot labels: the argmax of a random teacher network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = mlp()
        x = torch.randn(n, 20)
        with torch.no_grad():
            y = F.one_hot(teacher(x).argmax(dim=1), 10).float()
    return x, y


class FullBatch(IterableDataset):
    """The whole training set as one batch, every step (gradient descent, not SGD)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.x, self.y


class TeacherRegression(pl.LightningModule):
    def __init__(self, lr: float = 0.4) -> None:
        super().__init__()
        self.lr = lr
        self.net = mlp()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        # Cohen et al.'s scaling: ½·Σ over outputs, mean over examples. The scale of the loss is
        # the scale of H, so it decides where 2/η falls.
        loss = 0.5 * (self.net(x) - y).square().sum(dim=1).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main(
    max_steps: int = 3000,
    logdir: str | Path = "runs/examples",
    every_n_steps: int = 25,
    lr: float = 0.4,
    num_probes: int = 12,
) -> Path:
    """Train and monitor; returns the directory of the TensorBoard event file."""
    pl.seed_everything(0, verbose=False)
    x, y = teacher_data()
    model = TeacherRegression(lr=lr)
    monitor = HessianMonitor(every_n_steps=every_n_steps, num_probes=num_probes)
    logger = TensorBoardLogger(str(logdir), name="edge_of_stability")
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=logger,
        callbacks=[monitor],
        log_every_n_steps=every_n_steps,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        # The data is one in-memory batch: worker processes would only add overhead.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, DataLoader(FullBatch(x, y), batch_size=None))

    ratios = [(int(h["step"]), h["eos_ratio"]) for h in monitor.history]
    peak_step, peak = max(ratios, key=lambda r: r[1])
    print(
        f"η·λ_max/2: {ratios[0][1]:.2f} at step {ratios[0][0]}, peak {peak:.2f} at step "
        f"{peak_step}, {ratios[-1][1]:.2f} at step {ratios[-1][0]} (1 = edge of stability)"
    )
    print(f"TensorBoard logs in {logger.log_dir}: tensorboard --logdir {logdir}")
    return Path(logger.log_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--logdir", default="runs/examples")
    parser.add_argument("--every-n-steps", type=int, default=25)
    parser.add_argument("--lr", type=float, default=0.4)
    args = parser.parse_args()
    main(args.max_steps, args.logdir, args.every_n_steps, args.lr)
