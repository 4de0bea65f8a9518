"""Timing shared by the training-overhead benchmarks: alternate configurations, robust step cost.

Each benchmark trains the same model under several configurations (no monitor, monitor A, ...),
alternating them round by round in one process so that a slow phase of a shared machine hits all
of them alike. A run's cost is its step time measured by :class:`StepTimer` from one
``on_train_batch_start`` to the next (every hook of the step counts, the monitor's logging at the
end included): the median over blocks of ``block`` consecutive steps of the block's mean step
time, robust to the spikes a plain mean is not. Ratios are reported against the first
configuration's median.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch


def arguments(doc: str, *, steps: int) -> argparse.ArgumentParser:
    """The options every overhead benchmark takes (add its own before parsing)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="switch each monitor on and off in alternate blocks of one run (Toggled) and report "
        "the median over runs of the run's on/off ratio, instead of alternating whole runs",
    )
    return parser


def start(args: argparse.Namespace) -> None:
    """Quiet the run and apply ``--threads``."""
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)


def quiet() -> None:
    """Silence Lightning's info lines and warnings (they would be timed too)."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


class StepTimer(pl.Callback):
    """Wall time of each training step: from its batch start to the next one's."""

    def __init__(self, block: int = 10) -> None:
        self.block = block
        self.times: dict[int, float] = {}
        self._last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times[trainer.global_step - 1] = now - self._last
        self._last = now

    def _blocks(self, warmup: int) -> dict[int, float]:
        """Mean step time of every whole block of ``block`` steps after ``warmup`` (blocks
        aligned to multiples of ``block``), by block index."""
        first = -(-warmup // self.block) * self.block
        blocks = {}
        for start in range(first, max(self.times) + 1, self.block):
            steps = [self.times.get(s) for s in range(start, start + self.block)]
            if None not in steps:
                blocks[start // self.block] = sum(steps) / self.block
        return blocks

    def cost(self, warmup: int) -> float:
        """Median over whole blocks of ``block`` steps (aligned to multiples of ``block``, after
        ``warmup``) of the block's mean step time, in seconds."""
        blocks = self._blocks(warmup)
        if not blocks:
            raise ValueError(f"no whole block of {self.block} steps after warm-up {warmup}")
        return statistics.median(blocks.values())

    def paired(self, warmup: int) -> float:
        """With a :class:`Toggled` callback of the same ``block``: the median step time of the
        "on" blocks over that of the "off" blocks (whole blocks after ``warmup``)."""
        sides: tuple[list[float], list[float]] = ([], [])
        for index, mean in self._blocks(warmup).items():
            sides[index % 2].append(mean)
        if not (sides[0] and sides[1]):
            raise ValueError(f"need whole on and off blocks of {self.block} steps after {warmup}")
        return statistics.median(sides[0]) / statistics.median(sides[1])


class Toggled(pl.Callback):
    """``callback``, switched on and off in alternate blocks of ``block`` steps of one run.

    In "on" blocks (steps ``s`` with ``(s // block) % 2 == 0``) the per-step hooks reach
    ``callback``; in "off" blocks they do not. Set-up, the start and end of training and state
    always do. With :meth:`StepTimer.paired`, one training run gives the step time with and
    without the callback, block by block: the model, the process and the state of the machine are
    the same on both sides, which from one run to the next (a few percent apart here) they are
    not. The callback measures every other block of steps, and pools and logs what it measured.
    """

    def __init__(self, callback: pl.Callback, block: int = 10) -> None:
        self.callback = callback
        self.block = block
        self._on = False

    @property
    def state_key(self) -> str:
        return self.callback.state_key

    def setup(self, trainer, pl_module, stage) -> None:
        self.callback.setup(trainer, pl_module, stage)

    def teardown(self, trainer, pl_module, stage) -> None:
        self.callback.teardown(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        self.callback.on_train_start(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.callback.on_train_end(trainer, pl_module)

    def state_dict(self) -> dict:
        return self.callback.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.callback.load_state_dict(state_dict)

    def on_train_batch_start(self, trainer, *args) -> None:
        self._on = (trainer.global_step // self.block) % 2 == 0
        if self._on:
            self.callback.on_train_batch_start(trainer, *args)

    def on_before_backward(self, *args) -> None:
        if self._on:
            self.callback.on_before_backward(*args)

    def on_before_optimizer_step(self, *args) -> None:
        if self._on:
            self.callback.on_before_optimizer_step(*args)

    def on_train_batch_end(self, *args) -> None:
        if self._on:
            self.callback.on_train_batch_end(*args)


def rounds(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call every run once per round for ``repeats`` rounds; every run's results, in order.

    Each round starts one configuration later than the previous one, so that no configuration
    always runs in the same place of a round (first after the previous round's clean-up, say)."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(runs[name]())
    return results


def alternate(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """:func:`rounds` of runs returning step costs; the median cost of each."""
    return {name: statistics.median(values) for name, values in rounds(runs, repeats).items()}


def report(costs: dict[str, float], *, steps: int, repeats: int) -> None:
    """Print each configuration's step time and its ratio to the first one."""
    names = list(costs)
    base = costs[names[0]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {steps} steps per run")
    print(f"{names[0]}: {1e3 * base:.2f} ms per step (median of {repeats} alternating runs)")
    for name in names[1:]:
        print(f"{name}: {costs[name] / base:.3f}x  ({1e3 * costs[name]:.2f} ms per step)")


def report_paired(ratios: dict[str, list[float]], *, steps: int, block: int) -> None:
    """Print each configuration's median on/off ratio over its runs, with the quartiles."""
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {steps} steps per run, "
        f"monitor on and off in alternate blocks of {block} steps"
    )
    for name, values in ratios.items():
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        print(
            f"{name}: {statistics.median(values):.3f}x on/off (median of {len(values)} runs; "
            f"quartiles {q1:.3f}–{q3:.3f})"
        )
