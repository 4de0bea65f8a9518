"""Declared reductions: ``sync_to_host`` against a brute force over simulated ranks, one
collective per reduction and one host copy, and ``Monitor.sync`` over declared fields."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dynlens.attention import AttentionLogitSums
from dynlens.callbacks.base import Monitor
from dynlens.callbacks.sync import field_reductions, sync_to_host
from dynlens.logits import OutputLogitSums
from tests.callbacks.test_continual_evaluation import CountHostSyncs


class Ranks:
    """A trainer of ``len(others) + 1`` ranks: this rank's tensors are reduced with the other
    ranks' values for the same call, as ``strategy.reduce`` does (the others are given per call,
    in call order)."""

    def __init__(self, *others: list[torch.Tensor]) -> None:
        self.others = others
        self.calls: list[str] = []
        self.strategy = SimpleNamespace(reduce=self._reduce, root_device=torch.device("cpu"))

    def _reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        k = len(self.calls)
        self.calls.append(reduce_op)
        stacked = torch.stack([tensor, *(rank[k].to(tensor) for rank in self.others)])
        if reduce_op == "sum":
            return stacked.sum(0)
        if reduce_op == "mean":
            return stacked.mean(0)
        if reduce_op == "max":
            return stacked.amax(0)
        return stacked.amin(0)


def test_each_reduction_is_one_collective_and_everything_one_host_copy():
    counts = torch.tensor([[3, 1], [5, 0]])  # two steps' counts, summed
    gap = torch.tensor(2.0)
    # the other rank's values, flattened in the order the leaves are joined per reduction:
    # the sums (counts, then 7 samples), the maxima, the means
    other = [
        torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0]),
        torch.tensor([9.0]),
        torch.tensor([4.0, 6.0]),
    ]
    trainer = Ranks(other)
    with CountHostSyncs() as syncs:
        host = sync_to_host(
            trainer,
            {
                "counts": (counts, "sum"),
                "samples": (7, "sum"),
                "worst": (gap, "max"),
                "means": ({"a": torch.tensor(2.0), "b": 4}, "mean"),
                "cosine": (torch.tensor(0.5), "local"),
            },
        )
    assert trainer.calls == ["sum", "max", "mean"]
    assert syncs.calls == ["tolist"]  # one copy to the host for all of it
    assert host == {
        "counts": [[4.0, 2.0], [7.0, 2.0]],
        "samples": 10.0,
        "worst": 9.0,
        "means": {"a": 3.0, "b": 5.0},
        "cosine": 0.5,
    }


def test_a_dataclass_of_statistics_reduces_field_by_field_as_its_class_declares():
    mine = AttentionLogitSums(torch.tensor(3.0), torch.tensor(10.0), torch.tensor(4.0), chunks=2)
    theirs = AttentionLogitSums(torch.tensor(5.0), torch.tensor(6.0), torch.tensor(2.0))
    assert field_reductions(mine) == {"max_logit": "max", "sum_squares": "sum", "count": "sum"}
    # in the order of the class's fields: the maximum first, then the sums (sum_squares, count)
    trainer = Ranks([torch.tensor([5.0]), torch.tensor([6.0, 2.0])])
    (pooled,) = sync_to_host(trainer, {"layer": (mine, "by_field")}).values()
    brute = mine.merge(theirs)
    assert pooled == AttentionLogitSums(
        float(brute.max_logit), float(brute.sum_squares), float(brute.count), chunks=2
    )  # chunks: this rank's count of pieces, a host number, kept as it is
    output = OutputLogitSums(
        samples=4.0,
        entries=12.0,
        sum_squares=torch.tensor(8.0),
        logz_sum=torch.tensor(2.0),
        spread_sum=torch.tensor(1.0),
        max_abs=torch.tensor(3.0),
        logz_max=torch.tensor(1.5),
    )
    one = sync_to_host(Ranks([torch.zeros(5), torch.zeros(2)]), {"o": (output, "by_field")})
    assert one["o"].compute() == pytest.approx({k: float(v) for k, v in output.compute().items()})


def test_a_tensor_field_without_a_declared_reduction_is_refused():
    stats = AttentionLogitSums(1.0, 2.0, 3.0, chunks=torch.tensor(1))
    with pytest.raises(TypeError, match="chunks holds a tensor but is named in none"):
        field_reductions(stats)


class Declared(Monitor):
    name = "declared"


def test_sync_takes_the_declared_fields_holding_values_and_resets_them():
    monitor = Declared()
    monitor.add_state("_total", None, persistent=False, reduce="sum")
    monitor.add_state("_largest", None, persistent=False, reduce="max")
    monitor.add_state("_unused", None, persistent=False, reduce="mean")
    monitor._total, monitor._largest = torch.tensor([1.0, 2.0]), torch.tensor(3.0)
    trainer = Ranks([torch.tensor([10.0, 20.0]), torch.tensor([1.0])])
    assert monitor.sync(trainer) == {"_total": [11.0, 22.0], "_largest": 3.0}
    assert trainer.calls == ["sum", "max"]  # the field holding nothing takes no part
    assert monitor._total is None and monitor._largest is None
    assert "_total" not in monitor.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduce": "median"}, "must be one of"),
        ({"reduce": "sum", "persistent": True}, "declare it persistent=False"),
    ],
)
def test_a_reduction_is_declared_on_a_field_of_the_moment(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Declared().add_state("_x", None, **kwargs)
