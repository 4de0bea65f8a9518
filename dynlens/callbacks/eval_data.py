"""Continual evaluation's data: each task's held-out set, its subsets, and one pass over them.

:class:`TaskEvaluator` evaluates the seen tasks for
:class:`~dynlens.callbacks.continual.ContinualEvaluation`: it draws each evaluation's subsets,
runs the model batch by batch, and sums each task's sufficient statistics (correct, total,
labels outside the outputs) on the device; the callback sums them over ranks and brings them to
the host in one copy (``Monitor.sync``), and :func:`accuracies` reads the accuracies off them.
:class:`_EvalSource` serves one task's data: a ``TensorDataset`` from the device by indexing, any
other map-style dataset or a ``DataLoader`` through a loader that keeps the user's batching.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset

from .context import own_forward, sharding_strategy
from .replay import map_tensors
from .validate import ConfigurationError

SubsetMode = Literal["random", "fixed"]
#: ``metric(outputs, targets) -> (correct, total)``: tensors or numbers, summed over batches.
Metric = Callable[[Any, Any], tuple[Any, Any]]
#: ``forward_fn(pl_module, batch, task) -> (outputs, targets)``.
ForwardFn = Callable[[Any, Any, int], tuple[Any, Any]]
EvalSets = Mapping[int, Dataset | DataLoader] | Sequence[Dataset | DataLoader]


def accuracy_counts(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Top-1 accuracy as sufficient statistics: ``(number correct, number of samples)``.

    ``outputs`` are logits (or any scores) of shape ``(N, C)``, ``targets`` class indices of
    shape ``(N,)``; correct means ``outputs.argmax(-1) == targets`` with every score of the
    sample finite (``argmax`` would take a NaN for the largest score: a model that diverged to
    NaN predicts nothing, rather than class 0). The count stays on the
    device (no host sync); the total is known on the host. This is the default ``metric`` of
    :class:`~dynlens.callbacks.continual.ContinualEvaluation`; a custom metric returns the same
    pair, e.g. top-5 accuracy::

        def top5(outputs, targets):
            hit = (outputs.topk(5, dim=-1).indices == targets[:, None]).any(-1)
            return hit.sum(), targets.numel()

    >>> accuracy_counts(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
    (tensor(2), 3)
    >>> accuracy_counts(torch.tensor([[float("nan"), 1.0], [0.0, 3.0]]), torch.tensor([0, 1]))
    (tensor(1), 2)
    """
    hit = (outputs.argmax(dim=-1) == targets) & outputs.isfinite().all(dim=-1)
    return hit.sum(), targets.numel()


def default_forward(pl_module: Any, batch: Any, task: int) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ConfigurationError(
            f"ContinualEvaluation calls `pl_module(batch[0])` and compares with `batch[1]`, but "
            f"the evaluation batches of task {task} are {type(batch).__name__}, not an (inputs, "
            f"targets) pair. Pass `forward_fn=lambda module, batch, task: (module(inputs), "
            f"targets)` that says how to run your model on one batch."
        )
    return pl_module(batch[0]), batch[1]


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other objects pass through."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


class _IndexSampler(Sampler[int]):
    """Yields the indices chosen for the current evaluation (set before each pass)."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _EvalSource:
    """One task's evaluation data, built once: a user loader re-sampled, or tensors on the device.

    A ``TensorDataset`` is moved to the model's device once and batched by indexing (no
    DataLoader, no collate: the fast path). Any other map-style dataset, or a ``DataLoader``, is
    served by a ``DataLoader`` that keeps the user's batching (batch size, ``collate_fn``,
    workers) and takes its indices from this source, so each evaluation can use a new subset.
    """

    def __init__(self, data: Dataset | DataLoader, batch_size: int) -> None:
        self.data = data
        self.batch_size = batch_size
        self.tensors: tuple[torch.Tensor, ...] | None = None
        self.loader: DataLoader | None = None
        self.sampler: _IndexSampler | None = None
        self.device: torch.device | None = None

    def __len__(self) -> int:
        dataset = self.data.dataset if isinstance(self.data, DataLoader) else self.data
        return len(dataset)  # type: ignore[arg-type]

    def batches(self, indices: torch.Tensor | None, device: torch.device) -> Iterator[Any]:
        """Batches of the samples at ``indices`` (``None``: all, in order), on ``device``."""
        if isinstance(self.data, TensorDataset):
            if self.tensors is None or self.device != device:
                self.tensors = tuple(t.to(device) for t in self.data.tensors)
                self.device = device
            n = len(self.tensors[0])
            if indices is None:
                for start in range(0, n, self.batch_size):
                    yield tuple(t[start : start + self.batch_size] for t in self.tensors)
                return
            if device.type == "cuda":
                # A copy from pageable memory waits for the GPU; from pinned memory it does not.
                indices = indices.pin_memory()
            indices = indices.to(device, non_blocking=True)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                yield tuple(t[chunk] for t in self.tensors)
            return
        if self.loader is None:
            self.sampler = _IndexSampler()
            self.loader = self._build_loader(self.sampler)
        assert self.sampler is not None
        self.sampler.indices = (
            list(range(len(self))) if indices is None else indices.tolist()  # CPU indices
        )
        for batch in self.loader:
            yield _to_device(batch, device)

    def _build_loader(self, sampler: _IndexSampler) -> DataLoader:
        # Each pass over a DataLoader draws its workers' base seed from the loader's generator,
        # by default the global RNG: an own generator leaves training's random streams untouched
        generator = torch.Generator().manual_seed(0)
        if not isinstance(self.data, DataLoader):
            return DataLoader(
                self.data, batch_size=self.batch_size, sampler=sampler, generator=generator
            )
        user = self.data
        return DataLoader(
            user.dataset,
            batch_size=user.batch_size or self.batch_size,
            sampler=sampler,
            collate_fn=user.collate_fn,
            num_workers=user.num_workers,
            pin_memory=user.pin_memory,
            worker_init_fn=user.worker_init_fn,
            persistent_workers=user.persistent_workers,
            multiprocessing_context=user.multiprocessing_context,
            generator=generator,
        )


def check_eval_sets(eval_sets: EvalSets) -> dict[int, Dataset | DataLoader]:
    how = (
        "pass `eval_sets={task: dataset}` with one held-out set per task, e.g. "
        "`ContinualEvaluation(SplitDigits().test_sets())`"
    )
    if isinstance(eval_sets, Mapping):
        items = list(eval_sets.items())
    elif isinstance(eval_sets, Sequence) and not isinstance(eval_sets, (str, bytes)):
        items = list(enumerate(eval_sets))
    else:
        raise ConfigurationError(f"Expected `eval_sets` to be a mapping, got {eval_sets!r}: {how}.")
    if not items:
        raise ConfigurationError(f"`eval_sets` is empty, so there is nothing to evaluate: {how}.")
    checked: dict[int, Dataset | DataLoader] = {}
    for task, data in items:
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or task < 0:
            raise ConfigurationError(
                f"Expected every task id in `eval_sets` to be a non-negative int, got {task!r}: "
                f"{how}."
            )
        dataset = data.dataset if isinstance(data, DataLoader) else data
        if not isinstance(data, (Dataset, DataLoader)):
            raise ConfigurationError(
                f"`eval_sets[{task}]` is a {type(data).__name__}; expected a torch Dataset or "
                f"DataLoader: {how}."
            )
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ConfigurationError(
                f"`eval_sets[{task}]` is an iterable-style dataset; continual evaluation draws "
                f"subsets by index, so it needs a map-style dataset (with __len__ and "
                f"__getitem__), e.g. a TensorDataset of the task's held-out samples."
            )
        if len(dataset) == 0:
            raise ConfigurationError(f"`eval_sets[{task}]` is empty: {how}.")
        checked[int(task)] = data
    return checked


class TaskEvaluator:
    """Evaluates tasks on their held-out sets (the measuring of ``ContinualEvaluation``).

    Args:
        eval_sets: ``{task id: Dataset or DataLoader}``, as :func:`check_eval_sets` returns.
        batch_size: evaluation batch size for datasets given without a ``DataLoader``.
        subset_size: samples per task and evaluation; ``None`` for all.
        subset: ``"random"`` (a new subset every evaluation, drawn from the generator passed to
            each call) or ``"fixed"`` (one per task, seeded by ``seed`` and the task id).
        metric: ``metric(outputs, targets) -> (correct, total)``.
        forward_fn: ``forward_fn(pl_module, batch, task) -> (outputs, targets)``.
        check_labels: count labels outside the outputs at a task's first evaluation (the default
            metric's check).
    """

    def __init__(
        self,
        eval_sets: Mapping[int, Dataset | DataLoader],
        *,
        batch_size: int,
        subset_size: int | None,
        subset: SubsetMode,
        seed: int,
        metric: Metric,
        forward_fn: ForwardFn,
        check_labels: bool,
    ) -> None:
        self.sources = {task: _EvalSource(data, batch_size) for task, data in eval_sets.items()}
        self.subset_size, self.subset, self.seed = subset_size, subset, seed
        self.metric, self.forward_fn, self.check_labels = metric, forward_fn, check_labels
        self.fixed: dict[int, torch.Tensor] = {}
        self.labels_checked: set[int] = set()

    def subset_indices(
        self,
        task: int,
        generator: torch.Generator,
        world_size: int,
        rank: int,
        sharded: bool = False,
    ) -> torch.Tensor | None:
        """This rank's sample indices of ``task`` for one evaluation (``None``: the whole set).

        With ``sharded`` parameters (FSDP) every forward pass is a collective, so every rank must
        run as many batches: the subset is cut to a multiple of ``world_size`` (at most
        ``world_size - 1`` samples fewer) so that the ranks' strides are equally long.
        """
        n = len(self.sources[task])
        if self.subset_size is None or self.subset_size >= n:
            indices = None if world_size == 1 else torch.arange(n)
        elif self.subset == "fixed":
            if task not in self.fixed:
                # Its own seed per task: the subset does not depend on when the task appears.
                seed = int(np.random.SeedSequence([self.seed, task]).generate_state(1)[0])
                fixed = torch.Generator().manual_seed(seed)
                self.fixed[task] = torch.randperm(n, generator=fixed)[: self.subset_size]
            indices = self.fixed[task]
        else:
            indices = torch.randperm(n, generator=generator)[: self.subset_size]
        # Every rank drew the same subset (same generator state); each evaluates a stride.
        if indices is None or world_size == 1:
            return indices
        if sharded:
            indices = indices[: len(indices) - len(indices) % world_size]
        return indices[rank::world_size]

    def measure(
        self, trainer: Any, pl_module: Any, tasks: Sequence[int], generator: torch.Generator
    ) -> torch.Tensor:
        """Evaluate this rank's share of ``tasks`` once: the sufficient statistics per task,
        ``[correct, total, labels outside the outputs]`` one after the other, as one float64
        tensor (float32 on MPS) on the module's device, not yet summed over ranks (see
        :func:`accuracies`).

        Runs on every rank: it draws the subsets (every rank the same) and evaluates this rank's
        shard, in eval mode and under ``torch.inference_mode()``, then restores every module's
        mode. Nothing waits for the device: sums a metric returns as tensors stay there, and
        those it returns as numbers (the default metric's totals) join them at the end.
        """
        tasks = list(tasks)
        device = pl_module.device
        world_size, rank = int(trainer.world_size), int(trainer.global_rank)
        sharded = sharding_strategy(trainer) is not None
        # Tensors a metric returns stay on the device (with their flat position task·3 +
        # column); numbers it returns are known on the host and stay there.
        values: list[torch.Tensor] = []
        positions: list[int] = []
        host = [0.0] * (3 * len(tasks))
        modes = [(module, module.training) for module in pl_module.modules()]
        precision = getattr(trainer, "precision_plugin", None)
        context = precision.val_step_context() if precision else contextlib.nullcontext()
        try:
            pl_module.eval()
            with torch.inference_mode(), context, own_forward():
                for i, task in enumerate(tasks):
                    indices = self.subset_indices(task, generator, world_size, rank, sharded)
                    for column, value in self._task_values(pl_module, task, indices, device):
                        if isinstance(value, torch.Tensor):
                            values.append(value.reshape(()).to(device))
                            positions.append(3 * i + column)
                        else:
                            host[3 * i + column] += float(value)
        finally:
            for module, training in modes:
                module.training = training
        # float64 keeps counts exact up to 2**53; MPS has no float64.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        local = torch.tensor(host, dtype=dtype).to(device)
        if values:
            where = torch.tensor(positions, device=device)
            local = local.index_add(0, where, torch.stack(values).to(dtype))
        return local

    def _task_values(
        self, pl_module: Any, task: int, indices: torch.Tensor | None, device: torch.device
    ) -> Iterator[tuple[int, Any]]:
        """``(column, value)`` pairs of this rank's samples of ``task``, batch by batch."""
        if indices is not None and len(indices) == 0:
            return
        # Labels are checked at a task's first evaluation, so a mismatch is found before any
        # of its numbers is trusted; later evaluations skip the extra work.
        check = self.check_labels and task not in self.labels_checked
        for batch in self.sources[task].batches(indices, device):
            outputs, targets = self.forward_fn(pl_module, batch, task)
            if check:  # first, so bad outputs fail with what to pass, not inside the metric
                yield 2, _check_outputs(outputs, targets, task)
            result = self.metric(outputs, targets)
            if not isinstance(result, (tuple, list)) or len(result) != 2:
                raise ConfigurationError(
                    f"`metric(outputs, targets)` must return a pair (correct, total), got "
                    f"{result!r}."
                )
            yield 0, result[0]
            yield 1, result[1]
        if check:
            self.labels_checked.add(task)


def accuracies(tasks: Sequence[int], table: Sequence[float]) -> dict[int, float]:
    """``{task: accuracy}`` from :meth:`TaskEvaluator.measure`'s statistics summed over ranks
    (``table``, on the host): Σ correct / Σ total, NaN for a task with no samples. Labels outside
    the outputs are a :class:`ConfigurationError` naming the task and the fix.

        >>> accuracies([0, 1], [3.0, 4.0, 0.0, 0.0, 0.0, 0.0])
        {0: 0.75, 1: nan}
    """
    result: dict[int, float] = {}
    for i, task in enumerate(tasks):
        correct, total, bad = table[3 * i : 3 * i + 3]
        if bad:
            raise ConfigurationError(
                f"task {task} has {int(bad)} evaluation labels outside the model's outputs "
                f"(targets must be class indices 0..C-1 for C logits). For class-incremental "
                f"tasks with one shared head, give the head one output per class over all "
                f"tasks (e.g. SplitDigits(labels='global') with a 10-way head); for one head "
                f"per task, use task-local labels and pass `forward_fn` to pick the head; or "
                f"pass your own `metric`."
            )
        result[task] = correct / total if total > 0 else math.nan
    return result


def _check_outputs(outputs: Any, targets: Any, task: int) -> torch.Tensor:
    """Count labels outside ``0..C-1`` (on the device); shape errors raise at once."""
    if (
        not isinstance(outputs, torch.Tensor)
        or not isinstance(targets, torch.Tensor)
        or outputs.ndim < 2
        or outputs.shape[:-1] != targets.shape
        or targets.is_floating_point()
    ):
        got = (
            f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
            if isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)
            else f"{type(outputs).__name__} outputs and {type(targets).__name__} targets"
        )
        raise ConfigurationError(
            f"the default metric (top-1 accuracy) needs logits (N, C) and integer class "
            f"targets (N,), but task {task} gave {got}. Return them from `forward_fn`, or pass "
            f"`metric(outputs, targets) -> (correct, total)` for other outputs."
        )
    return ((targets < 0) | (targets >= outputs.shape[-1])).sum()
