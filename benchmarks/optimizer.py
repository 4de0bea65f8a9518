"""OptimizerMonitor's cost against a training step, paired in one run.

On the example Transformer (examples/transformer_instability.py with qk-layernorm, AdamW) and on
the GPT-2-shaped Hugging Face model of ``benchmarks/early_warning.py``, each run switches the
monitor on and off in alternate blocks of 10 steps (``_harness.Toggled``) and its ratio is the
median "on" block's step time over the median "off" block's (``_harness.StepTimer.paired``): the
method of record for per-step costs on these noisy CPUs. Two configurations:

* the defaults, ``OptimizerMonitor()``: one measured step in every "on" block of 10
  (``every_n_steps=10``), per-layer blocks, the update (a copy of θ). Target ≤ 1.02×;
* everything at every step, ``OptimizerMonitor(every_n_steps=1, blocks="tensor")``: every
  parameter tensor its own block. Target ≤ 1.05×.

    python benchmarks/optimizer.py [--rounds 3] [--steps 400] [--models transformer gpt2]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from _harness import StepTimer, Toggled
from early_warning import gpt2_shaped, quiet_trainer, transformer

import dynlens

BLOCK = 10
CONFIGS = {
    "defaults": lambda: dynlens.OptimizerMonitor(verbose=False),
    "every tensor, every step": lambda: dynlens.OptimizerMonitor(
        every_n_steps=1, blocks="tensor", verbose=False
    ),
}


def paired(model: str, config: str, steps: int) -> float:
    model_of, loader = transformer() if model == "transformer" else gpt2_shaped()
    torch.manual_seed(0)
    timer = StepTimer(block=BLOCK)
    trainer = quiet_trainer(steps, [timer, Toggled(CONFIGS[config](), block=BLOCK)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model_of(), loader)
    return timer.paired(2 * BLOCK)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--models", nargs="+", default=["transformer", "gpt2"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, paired blocks of {BLOCK}")
    for model in args.models:
        for config in CONFIGS:
            ratios = [paired(model, config, args.steps) for _ in range(args.rounds)]
            low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(
                f"{model:12s} {config:26s} {statistics.median(ratios):.3f}x "
                f"(quartiles {low:.3f}-{high:.3f}; runs {', '.join(f'{r:.3f}' for r in ratios)})"
            )


if __name__ == "__main__":
    main()
