"""HessianMonitor(blocks=...): per-block traces against the exact Hessian's block diagonals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dynlens import ConfigurationError
from dynlens.callbacks.hessian import HessianMonitor
from tests.callbacks.test_hessian_monitor import KEY, data, loader, tiny_module
from tests.helpers import custom_scalars_layout, tb_logger, trainer


def exact_block_traces(module, x, y) -> dict[str, float]:
    """tr(H_bb) per layer of the 3 → 4 → 1 network (``net.0``, ``net.2``), from the exact
    Hessian of its MSE loss on (x, y)."""
    names = [k for k, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in module.named_parameters()]).double()
    sizes = [s.numel() for s in shapes]

    def loss(theta):
        params = {
            n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)
        }
        return F.mse_loss(functional_call(module.double(), params, (x.double(),)), y.double())

    diagonal = torch.autograd.functional.hessian(loss, flat).diagonal()
    module.float()
    traces: dict[str, float] = {}
    for name, part in zip(names, diagonal.split(sizes), strict=True):
        block = ".".join(name.split(".")[:2])
        traces[block] = traces.get(block, 0.0) + float(part.sum())
    return traces


def test_per_layer_traces_match_the_exact_hessian_within_their_standard_errors(tmp_path):
    module = tiny_module(optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    x, y = data()
    exact = exact_block_traces(module, x, y)
    monitor = HessianMonitor(
        every_n_steps=1, blocks="layer", num_probes=400, sharpness=False, verbose=False
    )
    run = trainer(max_steps=1, logger=tb_logger(tmp_path), callbacks=[monitor])
    run.fit(module, loader())
    logged = monitor.latest
    assert monitor.partition == {
        "net.0": ["net.0.weight", "net.0.bias"],
        "net.2": ["net.2.weight", "net.2.bias"],
    }
    for block, value in exact.items():
        stderr = logged[f"trace_stderr/{block}"]
        assert 0 < stderr < 0.2 * abs(value) + 1e-3, block
        assert logged[f"trace/{block}"] == pytest.approx(value, abs=4 * stderr), block
    # the same products: the blocks add up to the total, and so do their shares
    assert sum(logged[f"trace/{b}"] for b in exact) == pytest.approx(
        logged["trace"], rel=1e-6
    )  # float32 sums
    assert sum(logged[f"trace_share/{b}"] for b in exact) == pytest.approx(1.0, rel=1e-6)
    charts = {
        chart.title: list(chart.multiline.tag)
        for category in custom_scalars_layout(tmp_path).category
        for chart in category.chart
    }
    assert charts["trace of each block tr(H_bb)"] == [f"^{KEY}trace/"]
    assert charts["share of the trace per block"] == [f"^{KEY}trace_share/"]


def test_bad_blocks_are_refused_at_set_up_with_the_fix():
    with pytest.raises(ConfigurationError, match="estimator='hutchinson'"):
        HessianMonitor(blocks="layer", estimator="hutchpp")
    with pytest.raises(ConfigurationError, match="blocks"):
        HessianMonitor(blocks="per-head")
    monitor = HessianMonitor(every_n_steps=1, blocks={"first": ["net.0.wieght"]}, verbose=False)
    with pytest.raises(ConfigurationError, match=r"net\.0\.wieght"):
        trainer(max_steps=1, logger=False, callbacks=[monitor]).fit(tiny_module(), loader())
