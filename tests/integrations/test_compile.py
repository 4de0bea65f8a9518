"""The monitors on a ``torch.compile``'d Hugging Face model: the values of eager mode, and no
recompilation at every measured step."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

import dynlens
from tests.helpers import trainer as make_trainer

from .models import Wrapped, gpt2, lm_batches

STEPS = 4


class Counting:
    """A Dynamo backend that counts the graphs it compiles and runs them through aot_eager
    (AOTAutograd, so the backward is compiled as well)."""

    def __init__(self) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs = 0
        self._aot = lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self._aot(gm, example_inputs)


def run(impl: str, compiled: bool, monitors: list, steps: int = STEPS):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = gpt2(impl, dropout=0.0)
    backend = Counting()
    if compiled:
        model = torch.compile(model, backend=backend)
    trainer = make_trainer(max_steps=steps, callbacks=monitors, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Wrapped(model), DataLoader(lm_batches(0), batch_size=4))
    return backend.graphs, [str(w.message) for w in caught]


def captures() -> list:
    return [
        dynlens.SoftmaxCollapseMonitor(every_n_steps=2, verbose=False),
        dynlens.LogitGrowthMonitor(every_n_steps=2, attention_every_n_steps=2, verbose=False),
    ]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_compiled_model_logs_the_eager_values_without_recompiling_per_step(impl):
    eager, compiled = captures(), captures()
    run(impl, compiled=False, monitors=eager)
    graphs, caught = run(impl, compiled=True, monitors=compiled)
    alone, _ = run(impl, compiled=True, monitors=[])
    longer, _ = run(impl, compiled=True, monitors=captures(), steps=2 * STEPS)
    for a, b in zip(eager, compiled, strict=True):
        assert b.disabled_reason is None
        assert a.latest.keys() == b.latest.keys()  # layer names as in eager mode
        for key, value in a.latest.items():
            assert b.latest[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # arming and pausing the captures adds a bounded number of graphs, the same for 2 measured
    # steps as for 4: nothing recompiles at every measured step
    assert graphs - alone <= 2, (graphs, alone)
    assert longer == graphs
    assert not [m for m in caught if "recompile" in m.lower()]


def test_hessian_of_a_compiled_model_falls_back_and_agrees_with_eager():
    eager = dynlens.HessianMonitor(num_probes=2, max_iter=3, verbose=False)
    compiled = dynlens.HessianMonitor(num_probes=2, max_iter=3, verbose=False)
    run("sdpa", compiled=False, monitors=[eager], steps=1)
    _, caught = run("sdpa", compiled=True, monitors=[compiled], steps=1)
    assert compiled.disabled_reason is None and math.isfinite(compiled.latest["trace"])
    assert compiled.latest["trace"] == pytest.approx(eager.latest["trace"], rel=1e-3)
    assert len([m for m in caught if "fell back" in m]) <= 1  # said once, if at all
