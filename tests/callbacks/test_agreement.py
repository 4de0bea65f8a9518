"""Logits and targets decided by agreement with the loss (``capture/agreement.py``), against
hand-computed cross-entropies."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import dynlens
import dynlens.callbacks.capture.logits as logits_module
from dynlens.callbacks.capture import Alignment, LogitsCapture
from dynlens.callbacks.capture.agreement import (
    Reading,
    choose,
    fit_targets,
    integer_tensors,
    mean_cross_entropy,
    readings,
    tolerance,
)
from dynlens.callbacks.validate import ConfigurationError
from tests.helpers import trainer


def test_mean_cross_entropy_ignores_negative_targets_as_ignore_index_does():
    # rows [0, 0] → target 0: ln 2; [ln 3, 0] → target 1: ln 4; the third (-1, nanoGPT's) ignored
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 0.0]])
    targets = torch.tensor([0, 1, -1])
    assert mean_cross_entropy([logits], [targets]) == pytest.approx(1.5 * math.log(2.0), rel=1e-7)
    assert math.isnan(mean_cross_entropy([logits], [torch.tensor([0, 2, 1])]))  # 2 ≥ C
    assert math.isnan(mean_cross_entropy([logits], [torch.tensor([-100, -1, -100])]))


def test_targets_are_shifted_and_split_as_the_chunks_are():
    t = torch.tensor([[1, 2, 3]])
    chunks = [torch.zeros(1, 2, 5), torch.zeros(1, 1, 5)]
    a, b = fit_targets(t, chunks, shift=False)
    assert a.tolist() == [[1, 2]] and b.tolist() == [[3]]
    a, b = fit_targets(t, chunks, shift=True)
    assert a.tolist() == [[2, 3]] and b.tolist() == [[-100]]
    # one position more than the logits: the inputs were its first T (LitGPT's pretraining)
    (whole,) = fit_targets(torch.tensor([[1, 2, 3, 4]]), [torch.zeros(1, 3, 5)], shift=True)
    assert whole.tolist() == [[2, 3, 4]]
    # logits flattened to (B·T, C) take (B, T) labels; a vector of labels cannot be shifted
    (flat,) = fit_targets(t, [torch.zeros(3, 5)], shift=False)
    assert flat.tolist() == [1, 2, 3]
    assert fit_targets(torch.tensor([1, 2]), [torch.zeros(2, 5)], shift=True) is None
    assert fit_targets(t, [torch.zeros(1, 2, 5)], shift=False) is None


def test_the_batch_s_integer_tensors_come_likely_targets_first():
    ids, labels, mask = torch.tensor([1]), torch.tensor([2]), torch.tensor([True])
    keys = [k for k, _ in integer_tensors({"input_ids": ids, "mask": mask, "labels": labels})]
    assert keys == ["labels", "input_ids"]  # booleans are no class indices
    assert [k for k, _ in integer_tensors((ids, labels, torch.randn(1)))] == [1, 0]
    assert [k for k, _ in integer_tensors(ids)] == [None]


def test_the_alignment_that_reproduces_the_loss_is_chosen_and_the_class_breaks_ties():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    shifted = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    found = readings([logits], {"labels": ids}, shifted)
    best = choose(found, tolerance(torch.float32), hint_shift=False)
    assert best is not None and best.alignment == Alignment("labels", True)
    assert best.value == pytest.approx(shifted, rel=1e-6)
    assert choose(found, tolerance(torch.float32), False) == choose(found, 1e-5, True)
    assert choose(readings([logits], {"labels": ids}, shifted + 0.1), 1e-5, False) is None
    # one token everywhere: both alignments give the same loss, the model's class decides
    same = torch.full((2, 5), 3)
    loss = F.cross_entropy(logits.flatten(0, 1), same.flatten()).item()
    tie = [Reading(Alignment("y", s), loss, loss) for s in (False, True)]
    assert choose(tie, 1e-5, hint_shift=True).alignment.shift is True
    assert choose(tie, 1e-5, hint_shift=False).alignment.shift is False


def test_tolerance_is_the_coarsest_dtypes():
    assert tolerance(torch.float32) == 1e-5
    assert tolerance(torch.float32, torch.bfloat16) == 2 * 2**-7


class TwoHeads(nn.Module):
    """Two heads with the same weights: two tensors that both reproduce the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)
        self.b.load_state_dict(self.a.state_dict())

    def forward(self, x):
        return self.a(x), self.b(x)


class Tupled(nn.Module):
    """nanoGPT's shape: ``(logits, loss)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(3, 8), nn.Linear(8, 4)

    def forward(self, x, y):
        logits = self.head(torch.tanh(self.body(x)))
        return logits, F.cross_entropy(logits, y)


class Holder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def test_a_tuple_element_is_found_by_its_cross_entropy():
    torch.manual_seed(0)
    holder, x, y = Holder(Tupled()), torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 1])
    capture = LogitsCapture()
    capture.attach(holder, "Monitor")
    capture.arm((x, y))
    logits, loss = holder.model(x, y)
    (taken,) = capture.take({"loss": loss}, "Monitor")
    assert torch.equal(taken, logits) and capture.found[0] == "model" and capture.how == "[0]"
    assert capture.alignment == Alignment(1, False)
    capture.arm((x, y))
    later, _ = holder.model(x, y)
    (again,) = capture.take({"loss": loss}, "Monitor")
    assert torch.equal(again, later)


def test_two_different_outputs_that_both_reproduce_the_loss_are_named_in_the_error():
    torch.manual_seed(0)
    holder, x, y = Holder(TwoHeads()), torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 1])
    capture = LogitsCapture()
    capture.attach(holder, "Monitor")
    capture.arm((x, y))
    first, _ = holder.model(x)
    with pytest.raises(ConfigurationError, match="Several outputs reproduce the loss"):
        capture.take({"loss": F.cross_entropy(first, y)}, "Monitor")


def test_a_failing_hook_never_raises_into_the_forward_and_the_monitor_fails_soft(monkeypatch):
    class Step(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = Tupled()

        def training_step(self, batch, batch_idx):
            return self.model(*batch)[1]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def boom(output, how):
        raise RuntimeError("simulated failure inside a forward hook")

    data = [(torch.randn(3), torch.tensor(i % 4)) for i in range(8)]

    def fit(callbacks):
        torch.manual_seed(0)
        module = Step()
        trainer(max_steps=2, callbacks=callbacks, logger=False).fit(
            module, torch.utils.data.DataLoader(data, batch_size=4)
        )
        return [p.detach().clone() for p in module.parameters()]

    reference = fit([])
    monkeypatch.setattr(logits_module, "_extract", boom)
    monitor = dynlens.SoftmaxCollapseMonitor(every_n_steps=1, logits_module="model", verbose=False)
    with pytest.warns(RuntimeWarning, match="simulated failure inside a forward hook"):
        trained = fit([monitor])
    assert all(torch.equal(a, b) for a, b in zip(trained, reference, strict=True))
    assert "simulated failure" in monitor.disabled_reason


def test_every_rank_takes_rank_0s_decisions():
    # ranks decide from their own batches; rank 0's decision is broadcast and adopted
    torch.manual_seed(0)
    holder, x, y = Holder(Tupled()), torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 1])
    rank_0 = (("model.head", "the output of `model.head`"), "", Alignment(0, True), None)

    class Strategy:
        def broadcast(self, obj, src=0):
            assert src == 0 and obj[0][0] == "model"  # this rank's own decision, sent
            return rank_0

    class Trainer:
        world_size, strategy = 2, Strategy()

    holder._trainer = Trainer()
    capture = LogitsCapture()
    capture.attach(holder, "Monitor")
    capture.arm((x, y))
    _, loss = holder.model(x, y)
    capture.take({"loss": loss}, "Monitor")
    assert capture.found == rank_0[0] and capture.how == "" and capture.hooked
    assert capture.alignment == Alignment(0, True)
    capture.arm((x, y))
    later, _ = holder.model(x, y)
    (again,) = capture.take({"loss": loss}, "Monitor")
    assert torch.equal(again, later)  # now read through the hook on model.head
