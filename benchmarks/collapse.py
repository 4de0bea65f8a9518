"""Overhead of SoftmaxCollapseMonitor at every_n_steps=1 on the demo's MLP.

Trains the demo's modular-addition MLP (p = 113, 40% split, full batch of 5,107 samples, AdamW)
with and without the monitor, alternating the two in one process, and prints the ratio of their
step times (see ``_harness``). Target: ≤ 1.02×.

With ``--paired`` each run switches the monitor on and off in alternate blocks of 10 steps and
the median over runs of each run's on/off step-time ratio is printed (``_harness.Toggled``).

    python benchmarks/collapse.py [--steps 200] [--repeats 5] [--threads N] [--accelerator gpu]
                                  [--paired]
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from _harness import (
    StepTimer,
    Toggled,
    alternate,
    arguments,
    report,
    report_paired,
    rounds,
    start,
)

from dynlens import SoftmaxCollapseMonitor
from dynlens.data import ModularArithmetic
from dynlens.demo import ModularMLP


def train(
    datamodule: ModularArithmetic,
    steps: int,
    monitors: list,
    warmup: int,
    accelerator: str,
    toggled: bool = False,
) -> float:
    """The run's step cost (seconds), or with ``toggled`` its on/off step-time ratio."""
    torch.manual_seed(0)
    model = ModularMLP(p=datamodule.p, lr=5e-3, weight_decay=0.0)
    timer = StepTimer()
    if toggled:
        monitors = [Toggled(monitor, block=timer.block) for monitor in monitors]
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        logger=False,
        callbacks=[timer, *monitors],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=datamodule)
    return timer.paired(warmup) if toggled else timer.cost(warmup)


def main() -> None:
    args = arguments(__doc__, steps=200).parse_args()
    start(args)
    datamodule = ModularArithmetic(p=113, train_fraction=0.4)
    accelerator = args.accelerator
    train(datamodule, 30, [], 5, accelerator)  # warm-up
    name = "SoftmaxCollapseMonitor(every_n_steps=1)"

    def monitored(toggled: bool = False) -> float:
        monitor = SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
        return train(datamodule, args.steps, [monitor], args.warmup, accelerator, toggled)

    if args.paired:
        ratios = rounds({name: lambda: monitored(toggled=True)}, args.repeats)
        report_paired(ratios, steps=args.steps, block=10)
        return
    costs = alternate(
        {
            "no monitor": lambda: train(datamodule, args.steps, [], args.warmup, accelerator),
            name: monitored,
        },
        args.repeats,
    )
    report(costs, steps=args.steps, repeats=args.repeats)


if __name__ == "__main__":
    main()
