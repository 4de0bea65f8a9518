"""Grokking on modular addition with GrokkingMonitor, logged to TensorBoard.

Trains the bias-free [200, 200] ReLU MLP of Prieto et al. 2025 on (a + b) mod 113 with 40% of the
pairs for training, AdamW with weight decay 1.0, full batch. Training accuracy reaches 99% after a
few hundred steps; validation accuracy follows thousands of steps later.

    python examples/grokking.py                 # about two minutes on a laptop CPU
    tensorboard --logdir runs/examples          # Custom Scalars tab: the dynlens/grokking panel
"""

import argparse

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

import dynlens
from dynlens.data import ModularArithmetic
from dynlens.demo import ModularMLP


def main(max_steps: int = 7000, logdir: str = "runs/examples") -> dynlens.grokking.GrokkingReport:
    pl.seed_everything(0)
    data = ModularArithmetic(p=113, op="+", train_fraction=0.4)
    model = ModularMLP(p=113, lr=1e-3, weight_decay=1.0)
    monitor = dynlens.GrokkingMonitor(stop_after_generalization=200)
    logger = TensorBoardLogger(logdir, name="grokking")
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=logger,
        callbacks=[monitor],
        check_val_every_n_epoch=10,  # full batch: an epoch is one optimizer step
        log_every_n_steps=1,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    print(monitor.report)
    print(f"TensorBoard logs in {logger.log_dir}: tensorboard --logdir {logdir}")
    return monitor.report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=7000)
    parser.add_argument("--logdir", default="runs/examples")
    args = parser.parse_args()
    main(args.max_steps, args.logdir)
