"""SplitDigits: a continual-learning benchmark small enough for tests and CPU examples.

scikit-learn's bundled 8×8 handwritten digits (1,797 images, ten classes, no download) as a
sequence of tasks, in the two settings studied by De Lange et al. 2023 (*Continual evaluation for
lifelong learning: identifying the stability gap*) and named after van de Ven et al. 2022 (*Three
types of incremental learning*):

- ``scenario="split"`` (class-incremental, like Split-MNIST): task t holds the digits
  {2t, 2t + 1}, so five tasks {0, 1}, {2, 3}, ..., {8, 9}. Labels stay the original digits 0-9
  for one shared 10-way head (``labels="global"``); ``labels="task"`` gives task-local labels
  0/1 instead (digit − 2t), for a task-incremental set-up with one head per task.
- ``scenario="permuted"`` (domain-incremental, like Permuted-MNIST): every task holds all ten
  digits, with the 64 pixels shuffled by a fixed permutation per task (seeded; task 0 keeps the
  original pixel order, as in van de Ven et al.). Labels are the digits 0-9.

One stratified, seeded train/test split of the whole data set is shared by all tasks, so every
digit appears in both splits in the proportions of the data. Features are the 64 pixel
intensities scaled from 0..16 to [0, 1] as float32 (reshape to ``(-1, 1, 8, 8)`` for a CNN);
labels are int64.

scikit-learn is an optional dependency: ``pip install "dynlens[examples]"``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from dynlens.compat import LightningDataModule

__all__ = ["SplitDigits"]

Scenario = Literal["split", "permuted"]
LabelMode = Literal["global", "task"]

_NUM_CLASSES = 10
_NUM_PIXELS = 64
_MAX_PIXEL = 16.0  # load_digits stores pixel intensities as integers 0..16
_SPLIT_TASKS = _NUM_CLASSES // 2


def _load_digits_split(
    test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features in [0, 1] and digit labels, split once, stratified by digit and seeded."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(
            "SplitDigits needs scikit-learn (for its bundled digits data): "
            'pip install "dynlens[examples]"'
        ) from err
    data = load_digits()
    x = (data.data / _MAX_PIXEL).astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return x_train, x_test, y_train, y_test


class SplitDigits(LightningDataModule):
    """The 8×8 digits as a sequence of tasks, as a LightningDataModule.

    ``train_dataloader()`` serves the task named by :attr:`current_task` (shuffled with a seeded
    generator per task); set it between fits to move to the next task. ``test_dataloader()``
    returns one loader per seen task (0..current_task), in task order. An evaluation callback
    uses :meth:`test_sets` (``{task: TensorDataset}``, all tasks) or :meth:`test_set`.

    Args:
        scenario: ``"split"`` (class-incremental: task t = digits {2t, 2t + 1}) or
            ``"permuted"`` (domain-incremental: task t = all digits under pixel permutation t).
        labels: ``"global"`` keeps the digit 0-9 as label (one 10-way head); ``"task"``
            (``scenario="split"`` only) gives task-local labels 0/1.
        num_tasks: number of tasks; default 5. At most 5 for ``"split"`` (the first pairs).
        batch_size: batch size of every loader.
        test_fraction: share of each digit held out for testing (stratified).
        seed: seeds the split, the permutations and the shuffling.
        num_workers: ``DataLoader`` workers (0 loads in the main process; the data is tiny).

    Example:

    >>> dm = SplitDigits(batch_size=16, seed=0)
    >>> dm.num_tasks, dm.num_classes, dm.classes(1), len(dm.train_set(1)), len(dm.test_set(1))
    (5, 10, (2, 3), 270, 90)
    >>> dm.current_task = 1
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), x.dtype, sorted(set(y.tolist()))
    ((16, 64), torch.float32, [2, 3])
    """

    def __init__(
        self,
        *,
        scenario: Scenario = "split",
        labels: LabelMode = "global",
        num_tasks: int | None = None,
        batch_size: int = 32,
        test_fraction: float = 0.25,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if scenario not in ("split", "permuted"):
            raise ValueError(
                f"Expected `scenario` to be 'split' (class-incremental) or 'permuted' "
                f"(domain-incremental), got {scenario!r}"
            )
        if labels not in ("global", "task"):
            raise ValueError(
                f"Expected `labels` to be 'global' (digits 0-9) or 'task' (0/1 within each "
                f"task), got {labels!r}"
            )
        if labels == "task" and scenario != "split":
            raise ValueError(
                "labels='task' applies to scenario='split' only: in 'permuted' every task has "
                "all ten digits, so its labels are already the digits 0-9"
            )
        max_tasks = _SPLIT_TASKS if scenario == "split" else None
        if num_tasks is None:
            num_tasks = _SPLIT_TASKS
        if (
            isinstance(num_tasks, bool)
            or not isinstance(num_tasks, int)
            or num_tasks < 1
            or (max_tasks is not None and num_tasks > max_tasks)
        ):
            limit = f" at most {max_tasks} for scenario='split'" if max_tasks else ""
            raise ValueError(f"Expected `num_tasks` to be a positive int{limit}, got {num_tasks!r}")
        for name, value in (("batch_size", batch_size), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Expected `{name}` to be an int, got {value!r}")
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive int, got {batch_size}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"Expected `num_workers` to be an int >= 0, got {num_workers!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(
                f"Expected `test_fraction` in (0, 1), e.g. 0.25, got {test_fraction!r}"
            )

        self.scenario: Scenario = scenario
        self.labels: LabelMode = labels
        self.num_tasks = num_tasks
        self.batch_size = batch_size
        self.test_fraction = float(test_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self._current_task = 0

        # Eager: the data is small (about 0.5 MB) and loading at construction makes a missing
        # scikit-learn fail here, at set-up, rather than in the middle of a fit.
        self._x_train, self._x_test, self._y_train, self._y_test = _load_digits_split(
            self.test_fraction, seed
        )
        self._permutations: list[np.ndarray] | None = None
        if scenario == "permuted":
            # Own seed stream (not the split's) so permutations do not depend on test_fraction.
            rng = np.random.default_rng([seed, 1])
            self._permutations = [np.arange(_NUM_PIXELS)] + [
                rng.permutation(_NUM_PIXELS) for _ in range(num_tasks - 1)
            ]
        self._train_sets: dict[int, TensorDataset] = {}
        self._test_sets: dict[int, TensorDataset] = {}
        self._generators: dict[int, torch.Generator] = {}
        self._worker_generators: dict[int, torch.Generator] = {}

    # -- task bookkeeping -----------------------------------------------------------------------

    @property
    def current_task(self) -> int:
        """The task ``train_dataloader()`` serves; set it (0..num_tasks − 1) between fits."""
        return self._current_task

    @current_task.setter
    def current_task(self, task: int) -> None:
        self._current_task = self._check_task(task)

    @property
    def num_classes(self) -> int:
        """Output size the model's head needs: 10, or 2 with ``labels="task"``."""
        return 2 if self.labels == "task" else _NUM_CLASSES

    @property
    def num_features(self) -> int:
        """Input size: 64 pixels."""
        return _NUM_PIXELS

    def classes(self, task: int) -> tuple[int, ...]:
        """The digits in ``task``: ``(2t, 2t + 1)`` for ``"split"``, ``(0, ..., 9)`` otherwise."""
        task = self._check_task(task)
        if self.scenario == "split":
            return (2 * task, 2 * task + 1)
        return tuple(range(_NUM_CLASSES))

    def permutation(self, task: int) -> np.ndarray | None:
        """The pixel order of ``task`` (``x_task = x[:, perm]``); ``None`` for ``"split"``."""
        task = self._check_task(task)
        if self._permutations is None:
            return None
        return self._permutations[task].copy()

    # -- data sets ------------------------------------------------------------------------------

    def train_set(self, task: int) -> TensorDataset:
        """The training examples of ``task`` as ``TensorDataset(features, labels)``."""
        task = self._check_task(task)
        if task not in self._train_sets:
            self._train_sets[task] = self._make_set(task, self._x_train, self._y_train)
        return self._train_sets[task]

    def test_set(self, task: int) -> TensorDataset:
        """The held-out examples of ``task`` as ``TensorDataset(features, labels)``."""
        task = self._check_task(task)
        if task not in self._test_sets:
            self._test_sets[task] = self._make_set(task, self._x_test, self._y_test)
        return self._test_sets[task]

    def test_sets(self) -> dict[int, TensorDataset]:
        """``{task: test set}`` for every task, in task order (evaluate the seen ones)."""
        return {t: self.test_set(t) for t in range(self.num_tasks)}

    def _make_set(self, task: int, x: np.ndarray, y: np.ndarray) -> TensorDataset:
        if self.scenario == "split":
            keep = np.isin(y, self.classes(task))
            x, y = x[keep], y[keep]
            if self.labels == "task":
                y = y - 2 * task
        else:
            assert self._permutations is not None
            x = x[:, self._permutations[task]]
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.copy()))

    # -- Lightning hooks ------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the current task; the same seed gives the same order."""
        task = self._current_task
        if task not in self._generators:
            # Per task, kept across calls, so reloading the loader each epoch continues the
            # shuffling sequence instead of repeating the first epoch's order. Two streams:
            # the sampler's shuffles, and the base seed every DataLoader *iterator* draws for
            # its workers. Were they one generator, each iterator Lightning creates without
            # iterating (a re-used Trainer creates one more than a fresh Trainer) would shift
            # every later shuffle.
            shuffle_seed, worker_seed = np.random.SeedSequence([self.seed, task]).generate_state(2)
            self._generators[task] = torch.Generator().manual_seed(int(shuffle_seed))
            self._worker_generators[task] = torch.Generator().manual_seed(int(worker_seed))
        dataset = self.train_set(task)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=RandomSampler(dataset, generator=self._generators[task]),
            generator=self._worker_generators[task],
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per seen task (0..current_task), in task order, unshuffled."""
        return [
            DataLoader(self.test_set(t), batch_size=self.batch_size, num_workers=self.num_workers)
            for t in range(self._current_task + 1)
        ]

    def val_dataloader(self) -> list[DataLoader]:
        """The same held-out loaders as :meth:`test_dataloader`: every seen task's test split.

        Defined explicitly (not left to Lightning's default) so both Lightning packages see a
        validation source; see :mod:`dynlens.compat`.
        """
        return self.test_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """The current task, saved in Lightning checkpoints so a resumed fit serves it again."""
        return {"current_task": self._current_task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.current_task = state_dict.get("current_task", 0)

    def _check_task(self, task: Any) -> int:
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)):
            raise TypeError(f"Expected a task id to be an int, got {task!r}")
        if not 0 <= task < self.num_tasks:
            raise ValueError(
                f"task {task} does not exist: SplitDigits has tasks 0..{self.num_tasks - 1} "
                f"(num_tasks={self.num_tasks})"
            )
        return int(task)
