"""HessianMonitor's micro-batches: the batch split by samples, the check that its loss is their
mean, and exact values when the products run micro-batch by micro-batch in a real Trainer run.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dynlens.callbacks.microbatch import batch_rows, batch_samples, micro_batched
from dynlens.callbacks.replay import replay
from dynlens.curvature import MemoryMeter, MicroBatchLoss, RssMemoryMeter
from tests.callbacks.test_hessian_memory import _check_exact
from tests.callbacks.test_hessian_monitor import (
    Snapshot,
    exact_monitor,
    fit,
    loader,
    scalars,
    tiny_module,
)

Pair = namedtuple("Pair", "x y")


class Encoding(Mapping):
    """A Mapping that is not a dict (as Hugging Face's BatchEncoding is)."""

    def __init__(self, data):
        self.data = dict(data)

    def __getitem__(self, key):
        return self.data[key]

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)


def test_a_batch_is_split_along_the_samples_its_tensors_share():
    x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    batch = {"pair": Pair(x, y), "enc": Encoding({"ids": y}), "list": [x], "name": "text"}
    assert batch_samples(batch) == 6
    part = batch_rows(batch, 2, 5)
    assert isinstance(part["pair"], Pair) and isinstance(part["enc"], Encoding)
    assert torch.equal(part["pair"].x, x[2:5]) and torch.equal(part["enc"]["ids"], y[2:5])
    assert torch.equal(part["list"][0], x[2:5]) and part["name"] == "text"
    assert batch_samples((x, torch.zeros(5))) is None  # no shared sample dimension
    assert batch_samples(("no tensors",)) is None


def _module(norm: str = "none", dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(3, 5)]
    if norm == "batch":
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(5, 4)]
    net = nn.Sequential(*layers)

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y, ignore_index=-100)

    return Step()


def _split(module, batch):
    params, loss_on, prepare = replay(module, 0)
    return micro_batched(module, prepare(batch), params, loss_on), params, loss_on


def test_a_mean_loss_is_split_and_its_weighted_halves_add_up_to_it():
    module = _module()
    x, y = torch.randn(7, 3), torch.randint(0, 4, (7,))
    (split, why), params, loss_on = _split(module, (x, y))
    assert why is None and isinstance(split, MicroBatchLoss) and split.samples == 7
    total = sum(w * fn(params) for w, fn in split.chunks(3))
    torch.testing.assert_close(total, loss_on(params, (x, y)), rtol=1e-6, atol=0)


def test_batchnorm_in_training_mode_is_not_split():
    (split, why), _, _ = _split(_module("batch"), (torch.randn(6, 3), torch.randint(0, 4, (6,))))
    assert split is not None and not split.exact and "BatchNorm" in why  # sliced, never summed


def test_a_loss_normalised_by_a_count_that_differs_per_half_is_not_split():
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    y[:2] = -100  # ignored targets: the halves' means are over 1 and 3 samples, not 3 and 3
    (split, why), _, _ = _split(_module(), (x, y))
    assert split is not None and not split.exact
    assert "not the mean of its samples' losses" in why and split.why_not == why


def test_the_check_runs_with_dropout_off_and_restores_every_mode():
    module = _module(dropout=0.5)
    module.train()
    modes = [m.training for m in module.modules()]
    (split, why), _, _ = _split(module, (torch.randn(8, 3), torch.randint(0, 4, (8,))))
    assert why is None and split is not None  # dropout on would have drawn other masks
    assert [m.training for m in module.modules()] == modes


class RowsMeter(MemoryMeter):
    """A device where a pass's peak is 100 bytes per sample of its largest forward (seen by a
    hook on the network), over 10⁹ bytes in use; a training step peaks at 650 bytes over."""

    def __init__(self):
        self.largest, self.passes = 0, []

    def hook(self, module, args, output):
        self.largest = max(self.largest, args[0].shape[0])

    def in_use(self):
        return 10**9

    def reset_peak(self):
        self.largest = 0

    def peak(self):
        return 10**9 + 650

    def measure(self, fn, probes):
        self.largest = 0
        out = fn()
        self.passes.append(self.largest)
        return out, 10**9 + 100 * self.largest


def test_products_micro_batch_by_micro_batch_are_exact_in_a_real_run(tmp_path):
    # 1300 bytes over the 10⁹ in use (1170 planned) at 100 bytes a sample: the batch of 16
    # does not fit, micro-batches of 11 do (the trial of one sample says so, and the plan keeps
    # to it once it has seen 11)
    module = tiny_module()
    device = RowsMeter()
    module.net[0].register_forward_hook(device.hook)
    snap = Snapshot()
    monitor = exact_monitor(memory=10**9 + 1300, memory_meter=device)
    fit(tmp_path, [monitor, snap], module, max_steps=3, dl=loader(n=16))
    assert monitor.events == [] and monitor.disabled_reason is None
    assert device.passes[0] == 1 and max(device.passes) == 11  # the trial, then ≤ 11 samples
    _check_exact(scalars(tmp_path), snap, [0, 2])


def test_the_rss_meter_counts_from_its_baseline():
    meter = RssMemoryMeter()
    meter.rebase()
    assert abs(meter.in_use()) < 16 * 2**20  # the process's state before is not counted
    size = 256 * 2**20
    out, peak = meter.measure(lambda: torch.ones(size // 4), 1)
    assert peak >= size // 2
    del out
    assert "before training" in meter.counts and meter.resolution == 64 * 2**20


def test_the_reason_a_batch_is_not_split_is_said_once(tmp_path):
    module = tiny_module(batchnorm=True)
    monitor = exact_monitor(every_n_steps=1)
    fit(tmp_path, monitor, module, max_steps=3)
    reasons = [e["reason"] for e in monitor.events]
    assert reasons.count("whole_batch") == 1
    (event,) = [e for e in monitor.events if e["reason"] == "whole_batch"]
    assert "BatchNorm" in event["message"]
