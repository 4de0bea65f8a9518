"""Overhead of LogitGrowthMonitor on the training step of the example Transformer.

Trains examples/transformer_instability.py's model (2 pre-LN blocks, d_model 128, 4 heads,
context 32, vocabulary 64, batch 32, AdamW) with four configurations, alternating them in one
process, and prints each one's median step time relative to no monitor:

* output logits alone at every step (target ≤ 1.02×);
* output logits and attention capture at every step (target ≤ 1.10×);
* the defaults: output logits every step, attention every ``attention_every_n_steps`` = 10
  (target ≤ 1.02×).

A step is timed from one ``on_train_batch_start`` to the next, so every hook of the step (the
monitor's logging at the end included) counts. A run's cost is the median over its blocks of 10
consecutive steps (10 = the default attention cadence, so every block holds one attention step)
of the block's mean step time: robust to the spikes of a shared machine, which a plain mean is
not. The first ``--warmup`` steps of each run are left out.

    python benchmarks/logits.py [--steps 120] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from dynlens import LogitGrowthMonitor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "transformer_instability.py"


def load_example():
    spec = importlib.util.spec_from_file_location("transformer_instability", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BLOCK = 10


class StepTimer(pl.Callback):
    """Wall time of each step: from its batch start to the next one's."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self._last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times[trainer.global_step - 1] = now - self._last
        self._last = now

    def cost(self, warmup: int) -> float:
        """Median over whole blocks of BLOCK steps (aligned to multiples of BLOCK, after
        ``warmup``) of the block's mean step time."""
        first = -(-warmup // BLOCK) * BLOCK
        blocks = []
        for start in range(first, max(self.times) + 1, BLOCK):
            block = [self.times.get(s) for s in range(start, start + BLOCK)]
            if None not in block:
                blocks.append(sum(block) / BLOCK)
        return statistics.median(blocks)


CONFIGS = {
    "no monitor": None,
    "output logits, every step": dict(attention=False),
    "output + attention, every step": dict(attention_every_n_steps=1),
    "defaults (attention every 10)": dict(),
}


def run(example, loader, config: dict | None, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = example.TransformerLM()
    timer = StepTimer()
    callbacks = [timer]
    if config is not None:
        callbacks.append(LogitGrowthMonitor(logits_module="head", verbose=False, **config))
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return timer.cost(warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    example = load_example()
    loader = example.loader()
    run(example, loader, None, 30, 5)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, config in CONFIGS.items():
            times[name].append(run(example, loader, config, args.steps, args.warmup))
    base = statistics.median(times["no monitor"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps")
    print(f"no monitor: {1e3 * base:.1f} ms per step (median of {args.repeats} alternating runs)")
    for name in list(CONFIGS)[1:]:
        median = statistics.median(times[name])
        print(f"LogitGrowthMonitor, {name}: {median / base:.3f}x  ({1e3 * median:.1f} ms)")


if __name__ == "__main__":
    main()
