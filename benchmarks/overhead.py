"""Overhead of every dynlens monitor at its defaults, alone and all together, on the demo's MLP.

Trains the demo's modular-addition MLP (p = 113, 40% split, full batch of 5,107 samples, AdamW
lr 5e-3, no weight decay) with validation every 10 steps as ``dynlens demo`` does (so
GrokkingMonitor has a validation accuracy to read), alternating configurations in one process.

1. **Each cheap monitor alone** at its defaults — SoftmaxCollapseMonitor, LogitGrowthMonitor
   (output logits; the MLP has no attention, so the default attention capture every 10 steps
   finds nothing), GrokkingMonitor — against no monitor: median step time over blocks of 10
   steps aligned to the validation interval (see ``_harness``). Target ≤ 1.02× each.
2. **All five at their defaults** — those three, HessianMonitor (budget 5%) and
   ContinualEvaluation on the validation split with ``budget=0.03`` (its default, evaluating
   after every step, is the paper's protocol and costs more; ``--continual-every-step`` measures
   that) — against no monitor: the whole ``trainer.fit``
   wall time of ``--long-steps`` steps, so that every HessianMonitor measurement, its first one
   at step 0 included, is paid for in the figure. Its budget is a share of the run's time, which
   a run must be long enough to honour: the first measurement (about 70 Hessian-vector products
   here) needs some 20 times its own duration of training after it. Target ≤ 1.10×.

No logger, as in the other overhead benchmarks: the monitors' work is timed, not a logger's file
writes.

    python benchmarks/overhead.py [--steps 300] [--long-steps 3000] [--repeats 5]
        [--long-repeats 2] [--accelerator gpu] [--continual-every-step]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from _harness import StepTimer, alternate, arguments, report, start

from dynlens import (
    ContinualEvaluation,
    GrokkingMonitor,
    HessianMonitor,
    LogitGrowthMonitor,
    SoftmaxCollapseMonitor,
)
from dynlens.data import ModularArithmetic
from dynlens.demo import ModularMLP

VAL_EVERY = 10  # the demo's validation interval, in steps (full batch: one epoch is one step)


def trainer_for(monitors: list, steps: int, accelerator: str, timer=None) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        devices=1,
        logger=False,
        callbacks=[*([timer] if timer else []), *monitors],
        check_val_every_n_epoch=VAL_EVERY,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit(datamodule: ModularArithmetic, trainer: pl.Trainer) -> float:
    """Wall time of one ``trainer.fit`` from the same initial model; fails if a monitor
    disabled itself (``quiet`` hides its warning)."""
    torch.manual_seed(0)
    model = ModularMLP(p=datamodule.p, lr=5e-3, weight_decay=0.0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    elapsed = time.perf_counter() - start
    for monitor in trainer.callbacks:
        if getattr(monitor, "disabled_reason", None) is not None:
            name = type(monitor).__name__
            raise RuntimeError(f"{name} disabled itself: {monitor.disabled_reason}")
    return elapsed


def step_cost(datamodule, monitors: list, steps: int, warmup: int, accelerator: str) -> float:
    timer = StepTimer(block=VAL_EVERY)
    fit(datamodule, trainer_for(monitors, steps, accelerator, timer))
    return timer.cost(warmup)


def main() -> None:
    parser = arguments(__doc__, steps=300)
    parser.add_argument("--long-steps", type=int, default=3000)
    parser.add_argument("--long-repeats", type=int, default=2)
    parser.add_argument(
        "--continual-every-step",
        action="store_true",
        help="ContinualEvaluation at its own default (every step) instead of budget=0.03",
    )
    args = parser.parse_args()
    start(args)
    datamodule = ModularArithmetic(p=113, train_fraction=0.4)
    datamodule.setup("fit")
    accelerator = args.accelerator

    cheap: dict[str, Callable[[], list]] = {
        "no monitor": lambda: [],
        "SoftmaxCollapseMonitor()": lambda: [SoftmaxCollapseMonitor(verbose=False)],
        "LogitGrowthMonitor()": lambda: [LogitGrowthMonitor(verbose=False)],
        "GrokkingMonitor()": lambda: [GrokkingMonitor(verbose=False)],
    }
    step_cost(datamodule, [], 30, 5, accelerator)  # warm-up
    costs = alternate(
        {
            name: lambda make=make: step_cost(
                datamodule, make(), args.steps, args.warmup, accelerator
            )
            for name, make in cheap.items()
        },
        args.repeats,
    )
    print("1. each cheap monitor alone, step time")
    report(costs, steps=args.steps, repeats=args.repeats)

    # the latest all-monitors run's, for their schedules
    hessian: list[HessianMonitor] = []
    continual: list[ContinualEvaluation] = []
    continual_budget = None if args.continual_every_step else 0.03

    def every_monitor() -> list:
        hessian[:] = [HessianMonitor(verbose=False)]
        continual[:] = [
            ContinualEvaluation({0: datamodule.val_set}, budget=continual_budget, verbose=False)
        ]
        return [
            SoftmaxCollapseMonitor(verbose=False),
            LogitGrowthMonitor(verbose=False),
            GrokkingMonitor(verbose=False),
            *hessian,
            *continual,
        ]

    totals = alternate(
        {
            name: lambda make=make: (
                fit(datamodule, trainer_for(make(), args.long_steps, accelerator)) / args.long_steps
            )
            for name, make in {"no monitor": lambda: [], "all five monitors": every_monitor}.items()
        },
        args.long_repeats,
    )
    print(
        "\n2. all five monitors at their defaults, ContinualEvaluation("
        f"budget={continual_budget}), whole-run wall time per step"
    )
    report(totals, steps=args.long_steps, repeats=args.long_repeats)
    measured = [int(m["step"]) for m in hessian[0].history]
    print(f"HessianMonitor measured at steps {measured} of the last all-monitors run")
    schedule = continual[0].schedule
    if schedule is not None:
        print(
            f"ContinualEvaluation evaluated {schedule.measure_count} times in that run, "
            f"evaluation time ÷ training time {schedule.overhead:.3f}"
        )


if __name__ == "__main__":
    main()
