"""Overhead of LogitGrowthMonitor on the training step of the example Transformer.

Trains examples/transformer_instability.py's model (2 pre-LN blocks, d_model 128, 4 heads,
context 32, vocabulary 64, batch 32, AdamW) with four configurations, alternating them in one
process, and prints each one's median step time relative to no monitor:

* output logits alone at every step (target ≤ 1.02×);
* output logits and attention capture at every step (target ≤ 1.10×);
* the defaults: output logits every step, attention every ``attention_every_n_steps`` = 10
  (target ≤ 1.02×).

Step times as in ``_harness`` (blocks of 10 steps = the default attention cadence, so every
block holds one attention step); the first ``--warmup`` steps of each run are left out.

With ``--paired`` each run switches the monitor on and off in alternate blocks of 10 steps and
the median over runs of each run's on/off step-time ratio is printed (``_harness.Toggled``).

    python benchmarks/logits.py [--steps 120] [--repeats 5] [--accelerator gpu] [--paired]
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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

from dynlens import LogitGrowthMonitor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "transformer_instability.py"


def load_example():
    spec = importlib.util.spec_from_file_location("transformer_instability", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIGS = {
    "no monitor": None,
    "output logits, every step": dict(every_n_steps=1, attention=False),
    "output + attention, every step": dict(every_n_steps=1, attention_every_n_steps=1),
    "defaults (output and attention every 10)": dict(),
}


def run(
    example,
    loader,
    config: dict | None,
    steps: int,
    warmup: int,
    accelerator: str = "cpu",
    toggled: bool = False,
) -> float:
    """The run's step cost (seconds), or with ``toggled`` its on/off step-time ratio."""
    torch.manual_seed(0)
    model = example.TransformerLM()
    timer = StepTimer()
    callbacks: list = [timer]
    if config is not None:
        monitor = LogitGrowthMonitor(logits_module="head", verbose=False, **config)
        callbacks.append(Toggled(monitor, block=timer.block) if toggled else monitor)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return timer.paired(warmup) if toggled else timer.cost(warmup)


def main() -> None:
    args = arguments(__doc__, steps=120).parse_args()
    start(args)
    example = load_example()
    loader = example.loader()
    run(example, loader, None, 30, 5, args.accelerator)  # warm-up
    if args.paired:
        ratios = rounds(
            {
                f"LogitGrowthMonitor, {name}": (
                    lambda config=config: run(
                        example,
                        loader,
                        config,
                        args.steps,
                        args.warmup,
                        args.accelerator,
                        toggled=True,
                    )
                )
                for name, config in CONFIGS.items()
                if config is not None
            },
            args.repeats,
        )
        report_paired(ratios, steps=args.steps, block=10)
        return
    costs = alternate(
        {
            name if config is None else f"LogitGrowthMonitor, {name}": (
                lambda config=config: run(
                    example, loader, config, args.steps, args.warmup, args.accelerator
                )
            )
            for name, config in CONFIGS.items()
        },
        args.repeats,
    )
    report(costs, steps=args.steps, repeats=args.repeats)


if __name__ == "__main__":
    main()
