"""Tests for dynlens.data.digits.SplitDigits."""

from __future__ import annotations

import doctest
import sys
from typing import Any

import lightning.pytorch as L
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import dynlens.data.digits
from dynlens.data.digits import SplitDigits

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers")


def labels_of(dataset: torch.utils.data.TensorDataset) -> set[int]:
    return set(dataset.tensors[1].tolist())


def test_five_tasks_of_disjoint_digit_pairs() -> None:
    dm = SplitDigits()
    assert dm.num_tasks == 5 and dm.num_classes == 10 and dm.num_features == 64
    pairs = [dm.classes(t) for t in range(dm.num_tasks)]
    assert pairs == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for t in range(dm.num_tasks):
        assert labels_of(dm.train_set(t)) == set(pairs[t])
        assert labels_of(dm.test_set(t)) == set(pairs[t])
    total = sum(len(dm.train_set(t)) + len(dm.test_set(t)) for t in range(dm.num_tasks))
    assert total == 1797  # every image in exactly one task and one split


def test_split_is_stratified() -> None:
    dm = SplitDigits(test_fraction=0.25, seed=3)
    for t in range(dm.num_tasks):
        for digit in dm.classes(t):
            n_train = int((dm.train_set(t).tensors[1] == digit).sum())
            n_test = int((dm.test_set(t).tensors[1] == digit).sum())
            assert n_train > 0 and n_test > 0
            assert abs(n_test - 0.25 * (n_train + n_test)) <= 1


def test_features_scaled_to_unit_interval_float32_and_labels_int64() -> None:
    dm = SplitDigits()
    for t in range(dm.num_tasks):
        for ds in (dm.train_set(t), dm.test_set(t)):
            x, y = ds.tensors
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape[1] == 64
            assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_deterministic_under_a_seed_and_different_across_seeds() -> None:
    a, b, c = SplitDigits(seed=7), SplitDigits(seed=7), SplitDigits(seed=8)
    for t in range(a.num_tasks):
        for left, right in zip(a.train_set(t).tensors, b.train_set(t).tensors, strict=True):
            assert torch.equal(left, right)
    assert not torch.equal(a.test_set(0).tensors[0], c.test_set(0).tensors[0])
    # Shuffling is seeded too: the same batches in the same order, epoch after epoch.
    for _ in range(2):
        xa, ya = next(iter(a.train_dataloader()))
        xb, yb = next(iter(b.train_dataloader()))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_reshuffles_between_epochs() -> None:
    dm = SplitDigits(batch_size=400)
    loader = dm.train_dataloader()
    first, second = next(iter(loader))[1], next(iter(loader))[1]
    assert sorted(first.tolist()) == sorted(second.tolist())
    assert not torch.equal(first, second)


def test_shuffling_ignores_iterators_that_were_never_read() -> None:
    # Lightning creates such iterators (one more on a re-used Trainer than on a fresh one); the
    # batch order must not depend on them, or the same seed trains differently.
    a, b = SplitDigits(seed=3), SplitDigits(seed=3)
    la, lb = a.train_dataloader(), b.train_dataloader()
    iter(la)
    for _ in range(2):
        assert torch.equal(next(iter(la))[1], next(iter(lb))[1])


def test_task_local_labels() -> None:
    glob, local = SplitDigits(seed=1), SplitDigits(seed=1, labels="task")
    assert local.num_classes == 2
    for t in range(local.num_tasks):
        assert labels_of(local.train_set(t)) == {0, 1}
        assert torch.equal(local.train_set(t).tensors[0], glob.train_set(t).tensors[0])
        assert torch.equal(local.train_set(t).tensors[1], glob.train_set(t).tensors[1] - 2 * t)


def test_permuted_tasks_use_a_fixed_permutation_per_task() -> None:
    dm = SplitDigits(scenario="permuted", num_tasks=4, seed=2)
    again = SplitDigits(scenario="permuted", num_tasks=4, seed=2)
    other_seed = SplitDigits(scenario="permuted", num_tasks=4, seed=3)
    perms = [dm.permutation(t) for t in range(dm.num_tasks)]
    assert np.array_equal(perms[0], np.arange(64))  # task 0 keeps the original pixel order
    for t, perm in enumerate(perms):
        assert sorted(perm.tolist()) == list(range(64))
        assert np.array_equal(perm, dm.permutation(t)) and np.array_equal(
            perm, again.permutation(t)
        )
        for u in range(t):
            assert not np.array_equal(perm, perms[u])
    assert not np.array_equal(perms[1], other_seed.permutation(1))
    base_x, base_y = dm.train_set(0).tensors
    for t in range(dm.num_tasks):
        x, y = dm.train_set(t).tensors
        assert torch.equal(x, base_x[:, torch.from_numpy(perms[t])])
        assert torch.equal(y, base_y) and labels_of(dm.train_set(t)) == set(range(10))
        assert labels_of(dm.test_set(t)) == set(range(10))
    assert SplitDigits().permutation(0) is None


def test_current_task_switches_the_train_loader_classes() -> None:
    dm = SplitDigits(batch_size=64)
    for task in (0, 3, 1):
        dm.current_task = task
        seen = set()
        for _, y in dm.train_dataloader():
            seen |= set(y.tolist())
        assert seen == set(dm.classes(task))


def test_test_dataloader_serves_the_seen_tasks_and_test_sets_all() -> None:
    dm = SplitDigits(batch_size=1000)
    dm.current_task = 2
    loaders = dm.test_dataloader()
    assert [set(next(iter(dl))[1].tolist()) for dl in loaders] == [{0, 1}, {2, 3}, {4, 5}]
    sets = dm.test_sets()
    assert list(sets) == [0, 1, 2, 3, 4]
    assert sets[4] is dm.test_set(4)


def test_state_dict_round_trip_restores_current_task() -> None:
    dm = SplitDigits()
    dm.current_task = 3
    restored = SplitDigits()
    restored.load_state_dict(dm.state_dict())
    assert restored.current_task == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scenario": "rotated"}, ValueError, "'split' .*or 'permuted'"),
        ({"labels": "local"}, ValueError, "'global'.*or 'task'"),
        ({"scenario": "permuted", "labels": "task"}, ValueError, "scenario='split' only"),
        ({"num_tasks": 6}, ValueError, "at most 5 for scenario='split'"),
        ({"num_tasks": 0}, ValueError, "positive int"),
        ({"batch_size": 0}, ValueError, "`batch_size` to be a positive int"),
        ({"batch_size": 2.0}, TypeError, "`batch_size` to be an int"),
        ({"test_fraction": 1.0}, ValueError, r"`test_fraction` in \(0, 1\)"),
        ({"num_workers": -1}, ValueError, "`num_workers`"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SplitDigits(**kwargs)


def test_bad_task_ids_are_rejected() -> None:
    dm = SplitDigits(num_tasks=3)
    with pytest.raises(ValueError, match=r"task 3 does not exist: SplitDigits has tasks 0..2"):
        dm.current_task = 3
    with pytest.raises(TypeError, match="task id to be an int"):
        dm.train_set(True)  # type: ignore[arg-type]
    assert dm.current_task == 0


def test_missing_scikit_learn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'pip install "dynlens\[examples\]"'):
        SplitDigits()


def test_docstring_example_runs() -> None:
    result = doctest.testmod(dynlens.data.digits)
    assert result.attempted >= 4 and result.failed == 0


def _tiny_module(base: type) -> Any:
    class Tiny(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(64, 10)
            self.seen: set[int] = set()
            self.tested: dict[int, int] = {}

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            self.seen |= set(y.tolist())
            return nn.functional.cross_entropy(self.net(x), y)

        def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            self.tested[dataloader_idx] = self.tested.get(dataloader_idx, 0) + len(batch[0])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def _trainer(package: Any, **kwargs: Any) -> Any:
    return package.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("package", [pl, L], ids=["pytorch_lightning", "lightning.pytorch"])
def test_fits_task_after_task_with_a_real_trainer(package: Any) -> None:
    dm = SplitDigits(batch_size=16, num_tasks=2)
    model = _tiny_module(package.LightningModule)
    for task in range(dm.num_tasks):
        dm.current_task = task
        model.seen = set()
        before = model.net.weight.detach().clone()
        _trainer(package, max_steps=2).fit(model, datamodule=dm)
        assert model.seen == set(dm.classes(task))
        assert not torch.equal(before, model.net.weight)
    _trainer(package).test(model, datamodule=dm, verbose=False)
    assert model.tested == {0: len(dm.test_set(0)), 1: len(dm.test_set(1))}
