"""Overhead of SoftmaxCollapseMonitor at every_n_steps=1 on the demo's MLP.

Trains the demo's modular-addition MLP (p = 113, 40% split, full batch, AdamW) for the same number
of steps with and without the monitor, alternating the two in one process, and prints the ratio
of median wall times. Target: ≤ 1.02×.

    python benchmarks/collapse.py [--steps 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch

from dynlens import SoftmaxCollapseMonitor
from dynlens.data import ModularArithmetic
from dynlens.demo import ModularMLP


def train(datamodule: ModularArithmetic, steps: int, callbacks: list) -> float:
    torch.manual_seed(0)
    model = ModularMLP(p=datamodule.p, lr=5e-3, weight_decay=0.0)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    datamodule = ModularArithmetic(p=113, train_fraction=0.4)
    train(datamodule, 20, [])  # warm-up
    base, monitored = [], []
    for _ in range(args.repeats):
        base.append(train(datamodule, args.steps, []))
        monitored.append(train(datamodule, args.steps, [SoftmaxCollapseMonitor(verbose=False)]))
    b, m = statistics.median(base), statistics.median(monitored)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps")
    print(f"SoftmaxCollapseMonitor(every_n_steps=1) / no monitor: {m / b:.3f}x")
    print(f"  (median of {args.repeats} alternating runs; per step {1e3 * b / args.steps:.1f} ms")
    print(f"   without, {1e3 * m / args.steps:.1f} ms with)")


if __name__ == "__main__":
    main()
