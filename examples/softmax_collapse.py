"""Softmax Collapse building up, and StableMax switching in at its onset.

Modular addition (p = 113, 40% split) with the bias-free [200, 200] MLP and no weight decay,
trained with AdamW lr 0.01, eps 1e-25 and β₂ = 0.95: once the training set is memorised, the
weights grow along their own direction (the NLM cosine climbs towards 1), the logit gaps grow,
the headroom to float32's collapse threshold falls to 0, and after ~500 steps more than half the
samples' softmax sums round to exactly 1. SoftmaxCollapseMonitor(remedy="stablemax") then switches
the model's dynlens.CrossEntropyLoss to StableMax, and training goes on.

    python examples/softmax_collapse.py            # about 20 s on a laptop CPU
    python examples/softmax_collapse.py --no-remedy
    tensorboard --logdir runs/examples             # Custom Scalars: dynlens/collapse
"""

import argparse

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

import dynlens
from dynlens.data import ModularArithmetic
from dynlens.demo import ModularMLP


def main(
    max_steps: int = 800, logdir: str = "runs/examples", remedy: str | None = "stablemax"
) -> dynlens.SoftmaxCollapseMonitor:
    pl.seed_everything(0)
    data = ModularArithmetic(p=113, op="+", train_fraction=0.4)
    # ModularMLP computes its loss with a switchable dynlens.CrossEntropyLoss (model.loss_fn)
    model = ModularMLP(p=113, lr=0.01, weight_decay=0.0, eps=1e-25, betas=(0.9, 0.95))
    monitor = dynlens.SoftmaxCollapseMonitor(every_n_steps=5, per_layer=True, remedy=remedy)
    logger = TensorBoardLogger(logdir, name="softmax_collapse")
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=logger,
        callbacks=[monitor, dynlens.GrokkingMonitor()],
        check_val_every_n_epoch=20,
        log_every_n_steps=5,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    print(f"SC onset at step {monitor.onset_step}; peak collapsed share {monitor.peak_sc_fraction}")
    print(f"loss now uses {model.loss_fn.activation}")
    print(f"TensorBoard logs in {logger.log_dir}: tensorboard --logdir {logdir}")
    return monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=800)
    parser.add_argument("--logdir", default="runs/examples")
    parser.add_argument("--no-remedy", action="store_true", help="only watch, never switch")
    args = parser.parse_args()
    main(args.max_steps, args.logdir, None if args.no_remedy else "stablemax")
