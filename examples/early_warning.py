"""A warning of Softmax Collapse hundreds of steps before it comes, and a rollback checkpoint.

An MLP (64 → 128 → 10) memorises 256 of scikit-learn's 8×8 digits with AdamW, learning rate
0.03 and no weight decay, in float32. Once every sample is fitted, the logits keep growing and the
median gap between the top logit and the runner-up climbs slowly towards ln(2/eps) = 16.64, where
float32's softmax rounds to exactly 1 and the sample stops teaching the model (Prieto et al.
2025). ``EarlyWarningMonitor`` fits that climb every 10 steps (a power of the step, over the
last half of the run) and warns when the crossing is expected within its horizon (half the steps
so far) even at the slow end of the fit's range; with ``action="checkpoint"`` it saves a
checkpoint to roll back to. The collapse itself (more than half of the samples collapsed) is an
event of its own, and ``dynlens report`` shows both in its "Warnings" table.

    python examples/early_warning.py                     # about a minute on a CPU
    tensorboard --logdir runs/examples                   # Custom Scalars: dynlens/warning
    dynlens report runs/examples/early_warning
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynlens


class MLP(pl.LightningModule):
    def __init__(self, lr: float = 0.03) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.loss_fn = dynlens.CrossEntropyLoss()  # float32 softmax: the precision watched
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = self.loss_fn(logits, y)
        self.log("train_loss", loss)
        return {"loss": loss, "logits": logits.detach()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def digits(seed: int = 0, n: int = 256) -> TensorDataset:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return TensorDataset(x[index], torch.tensor(data.target)[index])


def main(
    max_steps: int = 4000, logdir: str = "runs/examples", seed: int = 0
) -> dynlens.EarlyWarningMonitor:
    torch.manual_seed(seed)
    logger = TensorBoardLogger(logdir, name="early_warning", version="")
    monitor = dynlens.EarlyWarningMonitor(
        instabilities=("collapse",),
        logits_module=None,  # training_step returns its logits
        action="checkpoint",
        checkpoint_dir=os.path.join(logger.log_dir, "rollback"),
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        callbacks=[monitor],
    )
    trainer.fit(MLP(), DataLoader(digits(seed), batch_size=256))
    for warning in monitor.warnings:
        print(f"warned at step {warning['step']}: {warning['message']}")
    print(f"collapse happened at step {monitor.happened['collapse']}")
    print(f"tensorboard --logdir {logdir}")
    return monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--logdir", default="runs/examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.max_steps, args.logdir, args.seed)
