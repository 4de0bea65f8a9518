"""OptimizerMonitor against values computed by hand on tiny models: norms, the step SGD takes,
Adam's second moment from its own state, clipping and spikes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynlens
from dynlens.optimizer_stats import BINS_PER_DECADE, histogram_quantile, is_spike
from tests.helpers import trainer


def conformance_monitor(eval_set):
    """A small OptimizerMonitor for the monitor-contract suite (``tests/test_conformance.py``)."""
    return dynlens.OptimizerMonitor(every_n_steps=1, verbose=False)


class Regression(pl.LightningModule):
    """Two layers (two blocks under ``blocks="module"``), MSE, plain SGD or Adam."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, spike_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 1)
        self.optimizer, self.lr, self.spike_at = optimizer, lr, spike_at

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x).squeeze(-1), y)
        return loss * 100 if self.global_step == self.spike_at else loss

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, eps=1e-3)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def batches(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(-1).sin()), batch_size=n)


class Snapshot(pl.Callback):
    """θ, g and Adam's state just before each optimizer step (the brute force's inputs)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        state = optimizer.state
        self.steps.append(
            {
                "theta": {n: p.detach().clone() for n, p in module.named_parameters()},
                "grad": {n: p.grad.detach().clone() for n, p in module.named_parameters()},
                "v": {
                    n: (state[p]["exp_avg_sq"].clone(), float(state[p]["step"]))
                    for n, p in module.named_parameters()
                    if "exp_avg_sq" in state.get(p, {})
                },
            }
        )


def run(module, monitor, steps=1, **kwargs):
    snapshot = Snapshot()
    torch.manual_seed(0)
    trainer(max_steps=steps, callbacks=[snapshot, monitor], logger=False, **kwargs).fit(
        module, batches()
    )
    return snapshot.steps


def norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


# θ is float32: the step it took, θ_after − θ_before, carries the rounding of θ (float32's ε
# times |θ| / |Δθ|, about 1e-5 here) against the exact −η·g
STEP = 1e-4


def test_sgd_s_step_is_minus_the_learning_rate_times_the_gradient():
    monitor = dynlens.OptimizerMonitor(every_n_steps=1, blocks="module", verbose=False)
    (seen,) = run(Regression(lr=0.1), monitor)
    g, theta = seen["grad"], seen["theta"]
    got = monitor.latest
    assert got["grad_norm"] == pytest.approx(norm(g.values()), rel=1e-6)
    assert got["param_norm"] == pytest.approx(norm(theta.values()), rel=1e-6)
    assert got["update_norm"] == pytest.approx(0.1 * norm(g.values()), rel=STEP)
    assert got["update_to_weight"] == pytest.approx(
        0.1 * norm(g.values()) / norm(theta.values()), rel=STEP
    )
    assert got["cos_update_grad"] == pytest.approx(1.0, abs=1e-6)
    for block in ("first", "second"):
        mine = [v for n, v in g.items() if n.startswith(block)]
        weights = [v for n, v in theta.items() if n.startswith(block)]
        assert got[f"grad_norm/{block}"] == pytest.approx(norm(mine), rel=1e-6)
        assert got[f"update_to_weight/{block}"] == pytest.approx(
            0.1 * norm(mine) / norm(weights), rel=STEP
        )
    assert "grad_norm_clipped" not in got and not any(k.startswith("adam/") for k in got)
    (said,) = [e["message"] for e in monitor.events if e["reason"] == "memory"]
    size = sum(t.numel() for t in theta.values()) * 4 / 2**20  # float32
    assert f"{size:.4g} MiB" in said


def test_adam_s_second_moment_is_read_from_its_own_state():
    monitor = dynlens.OptimizerMonitor(every_n_steps=1, blocks=None, verbose=False)
    seen = run(Regression("adam", lr=0.01), monitor, steps=3)
    last = seen[-1]  # Adam's state before the third step: v after two steps
    ratios, below, count = [], 0, 0
    for name, (v, step) in last["v"].items():
        v_hat = v.double() / (1 - 0.999**step)
        g2 = last["grad"][name].double().square()
        below += int((v_hat.sqrt() < 1e-3).sum())
        count += v_hat.numel()
        ratios.extend((g2 / v_hat).flatten().tolist())
    got = monitor.latest
    assert got["adam/eps_share"] == pytest.approx(below / count, abs=1e-12)
    for q, key in ((0.5, "adam/g2_over_v_median"), (0.99, "adam/g2_over_v_p99")):
        exact = float(np.quantile(ratios, q, method="inverted_cdf"))
        edge = (math.floor(math.log10(exact) * BINS_PER_DECADE) + 1) / BINS_PER_DECADE
        assert got[key] == pytest.approx(10**edge, rel=1e-9), (key, exact)
    assert not any("/" in k and k.split("/")[0] in ("grad_norm", "update_to_weight") for k in got)


def test_clipping_is_seen_before_and_after():
    monitor = dynlens.OptimizerMonitor(every_n_steps=1, verbose=False)
    (seen,) = run(Regression(), monitor, gradient_clip_val=1e-3)
    got = monitor.latest
    assert got["grad_norm"] == pytest.approx(norm(seen["grad"].values()), rel=1e-6)
    assert got["grad_norm_clipped"] == pytest.approx(1e-3, rel=1e-5)
    assert got["clipped_share"] == 1.0
    assert got["update_norm"] == pytest.approx(0.1 * 1e-3, rel=1e-4)  # SGD on the clipped g
    assert got["cos_update_grad"] == pytest.approx(1.0, abs=1e-6)


def test_a_loss_spike_is_counted_and_said():
    monitor = dynlens.OptimizerMonitor(every_n_steps=1, verbose=False)
    run(Regression(lr=0.01, spike_at=12), monitor, steps=14)
    spikes = [(e["step"], e["reason"]) for e in monitor.events if e["reason"].endswith("spike")]
    assert spikes == [(12, "gradient_spike"), (12, "loss_spike")]  # the gradient with the loss
    assert monitor.latest["spike/count"] == 2 and monitor.latest["spike/rate"] == 2 / 14


def test_without_the_update_nothing_is_copied_or_logged_of_it():
    monitor = dynlens.OptimizerMonitor(every_n_steps=1, update=False, blocks=None, verbose=False)
    run(Regression(), monitor)
    assert set(monitor.latest) == {"grad_norm", "param_norm", "spike/count", "spike/rate"}
    assert not monitor.events  # no copy, nothing to say


def test_the_pure_rules():
    assert histogram_quantile([0.0] * 122, 0.5) != histogram_quantile([0.0] * 122, 0.5)  # NaN
    assert histogram_quantile([1.0] + [0.0] * 121, 0.5) == 0.0
    assert histogram_quantile([0.0] * 121 + [1.0], 0.5) == math.inf
    assert not is_spike([1.0] * 7, 100.0)  # too few values to judge
    assert not is_spike([1.0] * 8, math.nan)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"blocks": "layers"}, "blocks"),
        ({"update": 1}, "update"),
        ({"spike_window": 0}, "spike_window"),
        ({"every_n_steps": 0}, "every_n_steps"),
    ],
)
def test_bad_arguments_say_what_to_pass(kwargs, match):
    with pytest.raises(dynlens.ConfigurationError, match=match):
        dynlens.OptimizerMonitor(**kwargs)


def test_early_warning_reads_the_gradient_spikes():
    # the spike at step 12 is seen by OptimizerMonitor in the gradient norm; an attached
    # EarlyWarningMonitor takes it as a spike of its own (whichever callback runs first)
    for order in (0, 1):
        optimizer = dynlens.OptimizerMonitor(every_n_steps=1, verbose=False)
        early = dynlens.EarlyWarningMonitor(every_n_steps=1, instabilities=["spike"], verbose=False)
        monitors = [optimizer, early] if order == 0 else [early, optimizer]
        torch.manual_seed(0)
        trainer(max_steps=16, callbacks=monitors, logger=False).fit(
            Regression(lr=0.01, spike_at=12), batches()
        )
        said = [e for e in early.events if "gradient norm (OptimizerMonitor)" in e["message"]]
        assert [(e["step"], e["reason"]) for e in said] == [(12, "spike")], order
        assert early.policy.happened["spike"] == 12
