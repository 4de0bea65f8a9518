"""Cost of one ContinualEvaluation evaluation ÷ a hand-written evaluation loop doing the same work.

The anchor is the loop a user would write for continual evaluation: model to eval mode, under
``torch.inference_mode()``, for every seen task draw a random subset with an own generator,
forward it in batches, count correct top-1 predictions on the device, one host transfer at the
end, model back to train mode. The callback does the same work plus what makes it safe (every
submodule's mode saved and restored, the trainer's precision context, label checks at a task's
first evaluation only) and general (``forward_fn`` and ``metric`` hooks).

Workloads, five seen tasks each:

* ``paper``: the Split-MNIST MLP of De Lange et al. 2023 (784-400-400-10) on fresh random
  1,000-sample subsets of 2,000-sample MNIST-shaped synthetic test sets, batch 256, the sets
  given as ``TensorDataset`` (moved to the device once, batched by indexing);
* ``loader``: the same, with the sets given as plain map-style datasets, so both sides go through
  a ``DataLoader`` (the anchor builds one over a ``Subset`` per task and evaluation);
* ``digits``: the stability-gap example's MLP (64-128-10) on SplitDigits' whole test sets (about
  90 samples per task): so little compute that fixed per-evaluation costs dominate.

Two ratios per workload:

* ``measure``: :meth:`ContinualEvaluation.measure` ÷ the anchor — the evaluation itself;
* ``step``: the callback's whole evaluation step (``measure``, then ``ContinualMetrics`` update
  and summary, then the scalars handed to Lightning's ``callback_metrics``; no logger attached,
  so no file I/O) ÷ the anchor plus the same ``ContinualMetrics`` update and summary.

Rounds alternate which side runs first; the median over rounds of the per-round ratio is
reported, so drift on a busy machine hits both sides alike. Ratios only: absolute times depend on
the machine. Record figures (with machine and date) in benchmarks/RESULTS.md.

    python benchmarks/continual.py            # full run, about a minute
    python benchmarks/continual.py --quick    # seconds; a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from dynlens.callbacks.continual import ContinualEvaluation
from dynlens.continual import ContinualMetrics
from dynlens.data import SplitDigits

TASKS = 5
BATCH = 256


class Classifier(pl.LightningModule):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Plain(Dataset):
    """A map-style dataset that is not a TensorDataset: served through a DataLoader."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


@dataclass
class Workload:
    name: str
    model: Classifier
    sets: dict[int, Dataset]
    subset_size: int | None


def workloads(device: torch.device) -> list[Workload]:
    torch.manual_seed(0)
    mnist_like = {
        t: (torch.rand(2000, 784), torch.randint(2 * t, 2 * t + 2, (2000,))) for t in range(TASKS)
    }
    digits = SplitDigits(num_tasks=TASKS).test_sets()
    return [
        Workload(
            "paper",
            Classifier((784, 400, 400, 10)).to(device),
            {t: TensorDataset(*xy) for t, xy in mnist_like.items()},
            1000,
        ),
        Workload(
            "loader",
            Classifier((784, 400, 400, 10)).to(device),
            {t: Plain(*xy) for t, xy in mnist_like.items()},
            1000,
        ),
        Workload("digits", Classifier((64, 128, 10)).to(device), dict(digits), 1000),
    ]


class HandLoop:
    """The anchor: the evaluation loop a user would write by hand, same subsets and batches."""

    def __init__(self, work: Workload, device: torch.device) -> None:
        self.work, self.device = work, device
        self.generator = torch.Generator().manual_seed(0)
        self.tensors = {
            t: tuple(x.to(device) for x in s.tensors)
            for t, s in work.sets.items()
            if isinstance(s, TensorDataset)
        }

    def evaluate(self) -> dict[int, float]:
        model, size = self.work.model, self.work.subset_size
        was_training = model.training
        model.eval()
        correct, totals = [], []
        with torch.inference_mode():
            for task, dataset in self.work.sets.items():
                n = len(dataset)
                idx = torch.randperm(n, generator=self.generator)[:size] if size < n else None
                hits = []
                if task in self.tensors:
                    x, y = self.tensors[task]
                    if idx is not None:
                        idx = idx.to(self.device)
                    count = n if idx is None else len(idx)
                    for start in range(0, count, BATCH):
                        j = (
                            slice(start, start + BATCH)
                            if idx is None
                            else idx[start : start + BATCH]
                        )
                        hits.append((model(x[j]).argmax(-1) == y[j]).sum())
                else:
                    subset = dataset if idx is None else Subset(dataset, idx.tolist())
                    count = len(subset)
                    for x, y in DataLoader(subset, batch_size=BATCH):
                        x, y = x.to(self.device), y.to(self.device)
                        hits.append((model(x).argmax(-1) == y).sum())
                correct.append(torch.stack(hits).sum())
                totals.append(count)
            values = torch.stack(correct).tolist()  # one host transfer
        model.train(was_training)
        return {t: c / n for t, c, n in zip(self.work.sets, values, totals, strict=True)}


def callback_for(work: Workload, trainer: pl.Trainer) -> ContinualEvaluation:
    evaluation = ContinualEvaluation(
        work.sets, subset_size=work.subset_size, batch_size=BATCH, verbose=False
    )
    for task in work.sets:
        evaluation.metrics.start_task(task)
    evaluation.measure(trainer, work.model)  # first evaluation: label checks, tensors to device
    return evaluation


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ratio(
    ours: Callable[[], object],
    anchor: Callable[[], object],
    device: torch.device,
    rounds: int,
    reps: int,
) -> float:
    """Median over rounds of (time of `reps` calls of ours) ÷ (time of `reps` calls of anchor)."""

    def timed(fn: Callable[[], object]) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        return time.perf_counter() - start

    ratios = []
    for r in range(rounds):
        if r % 2:
            a = timed(anchor)
            o = timed(ours)
        else:
            o = timed(ours)
            a = timed(anchor)
        ratios.append(o / a)
    return statistics.median(ratios)


def run(
    work: Workload, device: torch.device, rounds: int, block_s: float
) -> tuple[float, float, float]:
    """``(measure ratio, step ratio, anchor milliseconds)``; each timed block lasts ~block_s."""
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    evaluation = callback_for(work, trainer)
    hand = HandLoop(work, device)
    hand_metrics = ContinualMetrics()
    for task in work.sets:
        hand_metrics.start_task(task)
    step = [0]

    def ours_step() -> None:
        evaluation.total_steps += 1
        evaluation._evaluate_and_log(trainer, work.model)

    def hand_step() -> None:
        step[0] += 1
        hand_metrics.update(step[0], hand.evaluate())
        hand_metrics.summary()

    # Warm-up, then the timed rounds.
    for fn in (ours_step, hand_step):
        fn()
    _sync(device)
    start = time.perf_counter()
    hand.evaluate()
    _sync(device)
    anchor_ms = 1000 * (time.perf_counter() - start)
    reps = max(1, round(block_s / (anchor_ms / 1000)))
    measure = median_ratio(
        lambda: evaluation.measure(trainer, work.model), hand.evaluate, device, rounds, reps
    )
    full = median_ratio(ours_step, hand_step, device, rounds, reps)
    return measure, full, anchor_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds, block_s = (3, 0.01) if args.quick else (21, 0.2)
    print(f"device {device}, {torch.get_num_threads()} CPU thread(s), {TASKS} seen tasks")
    print(f"{'workload':<10}{'measure':>10}{'step':>10}{'anchor ms':>12}")
    for work in workloads(device):
        measure, full, anchor_ms = run(work, device, rounds, block_s)
        print(f"{work.name:<10}{measure:>9.3f}×{full:>9.3f}×{anchor_ms:>12.2f}")
    print("ratios: ContinualEvaluation ÷ hand-written loop (median over alternating rounds)")


if __name__ == "__main__":
    main()
