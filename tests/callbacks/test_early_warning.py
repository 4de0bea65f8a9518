"""EarlyWarningMonitor: each logged signal against a brute-force value, the events exactly, the
warning rule on signals whose forecast is known in closed form, and the actions."""

from __future__ import annotations

import math
import re

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynlens
from dynlens.callbacks.schedule import dense_cadence
from dynlens.callbacks.validate import ConfigurationError
from dynlens.loss_events import LossWatch
from tests.helpers import trainer as make_trainer


def conformance_monitor(eval_set):
    """A small EarlyWarningMonitor for the monitor-contract suite
    (``tests/test_conformance.py``): its model has attention, BatchNorm, dropout and the logits
    from ``head``; ``eval_set`` is one of its evaluation sets."""
    return dynlens.EarlyWarningMonitor(
        every_n_steps=1, curvature_every_n_steps=2, window=4, logits_module="head", verbose=False
    )


def loader(n: int = 8, d: int = 3, classes: int = 2, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(
        torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    )
    return DataLoader(data, batch_size=n)


class Scripted(pl.LightningModule):
    """Logits ``[slope · step, 0]`` for every sample and a loss ``curve(step)``, both with a
    gradient through a weight that never changes what they are (lr 0)."""

    def __init__(self, slope: float = 0.0, curve=None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.slope, self.curve = slope, curve

    def training_step(self, batch, batch_idx):
        x, _ = batch
        t = float(self.global_step)  # the step Lightning logs this batch at
        logits = torch.zeros(len(x), 2) + self.w
        logits = logits + torch.tensor([self.slope * t, 0.0])
        loss = F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long))
        if self.curve is not None:
            loss = loss * 0 + self.w + self.curve(int(t))
        return {"loss": loss, "logits": logits.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(model, monitor, steps: int, **kwargs) -> pl.Trainer:
    trainer = make_trainer(max_steps=steps, logger=False, callbacks=[monitor], **kwargs)
    trainer.fit(model, loader())
    return trainer


def test_bad_arguments_say_what_to_do():
    for kwargs in (
        {"instabilities": "collapse"},
        {"instabilities": ()},
        {"z": 0},
        {"horizon": {"collapse": 0}},
        {"horizon": 2.5},
        {"consecutive": {"spikes": 2}},
        {"instabilities": ("collapse", "spikes")},
        {"every_n_steps": 10, "curvature_every_n_steps": 25},
        {"window": 3},
        {"window": {"divergence": 3}},
        {"window": {"spikes": 8}},
        {"action": "email"},
        {"horizon": 0},
    ):
        with pytest.raises(ConfigurationError):
            dynlens.EarlyWarningMonitor(**kwargs)


def test_a_gap_growing_with_the_step_is_forecast_exactly_and_collapse_is_over_half_collapsed():
    # the gap grows by 0.05 per step (a power of the step, exponent 1): it reaches
    # ln(2/eps_float32) = 16.64 at step 332.7, and the samples collapse (log_softmax's max
    # rounds to 0) from the first step whose gap does
    slope, horizon = 0.05, 100
    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False,
        instabilities=("collapse",),
        every_n_steps=5,
        window=4,
        horizon=horizon,
        logits_module=None,
        verbose=False,
    )
    fit(Scripted(slope), monitor, 400)
    threshold = dynlens.collapse.collapse_threshold(torch.float32)
    expected = math.ceil(threshold / slope)
    # measured steps are multiples of 5; the first with the crossing within the horizon, and
    # one measured point more in a row (collapse's consecutive=2 by default)
    first = next(s for s in range(20, 400, 5) if threshold / slope - s <= horizon)
    assert monitor.policy.consecutive["collapse"] == 2
    warned = first + 5
    assert len(monitor.warnings) == 1
    warning = monitor.warnings[0]
    assert {k: warning[k] for k in ("event", "step", "expected_step", "reason")} == {
        "event": "collapse",
        "step": warned,
        "expected_step": expected,
        "reason": "warn_collapse",
    }
    collapsed = next(
        s for s in range(5, 400, 5) if F.log_softmax(torch.tensor([slope * s, 0.0]), -1).max() == 0
    )
    assert monitor.happened["collapse"] == collapsed
    assert [e["reason"] for e in monitor.events] == ["warn_collapse", "collapse"]
    assert monitor.policy.active == []


class PowerGap(Scripted):
    """Logits ``[1e-4 · t², 0]`` at step t."""

    def training_step(self, batch, batch_idx):
        x, _ = batch
        t = float(self.global_step)
        logits = torch.zeros(len(x), 2) + self.w + torch.tensor([1e-4 * t * t, 0.0])
        loss = F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long))
        return {"loss": loss, "logits": logits.detach()}


def test_a_gap_growing_as_a_power_of_the_step_is_forecast_exactly():
    # 1e-4 t² reaches the float32 threshold 16.64 at t = 407.9: a straight line through the last
    # four points (a window of 15 steps) would expect it at 426, 18 steps late
    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False,
        instabilities=("collapse",),
        every_n_steps=5,
        window=4,
        horizon=100,
        logits_module=None,
    )
    fit(PowerGap(), monitor, 450)
    crossing = math.sqrt(dynlens.collapse.collapse_threshold(torch.float32) / 1e-4)
    first = next(s for s in range(20, 450, 5) if crossing - s <= 100)
    (warning,) = monitor.warnings  # one more measured point in a row: consecutive=2
    assert (warning["step"], warning["expected_step"]) == (first + 5, math.ceil(crossing))


def test_collapse_signals_equal_their_brute_force_values():
    logged = {}

    class Read(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logits = outputs["logits"].double()
            top2 = logits.topk(2, dim=-1).values
            logged[trainer.global_step - 1] = (
                (top2[:, 0] - top2[:, 1]).median().item(),
                (F.log_softmax(logits.float(), -1).amax(-1) == 0).float().mean().item(),
            )

    class Random(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 5)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.head(x) * torch.linspace(1.0, 80.0, len(x))[:, None]
            return {"loss": F.cross_entropy(logits, y), "logits": logits.detach()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False,
        instabilities=("collapse",),
        every_n_steps=1,
        logits_module=None,
        verbose=False,
    )
    trainer = make_trainer(max_steps=1, logger=False, callbacks=[Read(), monitor])
    trainer.fit(Random(), loader(n=9, classes=5))
    gap, share = logged[0]
    assert 0 < share < 1  # some samples collapsed, some not
    assert monitor.latest["collapse/gap_median"] == pytest.approx(gap, rel=1e-5)
    assert monitor.latest["collapse/sc_fraction"] == pytest.approx(share)
    assert monitor.latest["collapse/threshold"] == pytest.approx(24 * math.log(2))


def test_divergence_and_spikes_are_the_loss_rules_read_at_every_step():
    # falls from 2 to 1 by step 40, spikes to 30 at step 30 and comes back, then gives back more
    # than half the ground it covered from step 60 on: one spike, and a divergence at step 60
    def curve(step):
        return 30.0 if step == 30 else (2.0 - step / 40 if step < 40 else 1.0 if step < 60 else 3.0)

    watch = LossWatch()
    expected = [(e.step, e.kind) for step in range(100) for e in watch.observe(step, curve(step))]
    assert ("spike", 30) in [(k, s) for s, k in expected] and (60, "divergence") in expected
    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False, instabilities=("divergence", "spike"), every_n_steps=10, verbose=False
    )
    fit(Scripted(curve=curve), monitor, 100)
    assert monitor.happened == {"divergence": 60, "spike": 30}
    spikes = [e["step"] for e in monitor.events if e["reason"] == "spike"]
    assert spikes == [s for s, kind in expected if kind == "spike"]
    assert monitor.latest["spike/count"] == len(spikes) and monitor.policy.losses.loss_min == 1.0
    assert monitor.latest["spike/rate"] == pytest.approx(len(spikes) / 100)

    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False, instabilities=("divergence",), every_n_steps=10, verbose=False
    )
    fit(Scripted(curve=lambda s: math.inf if s == 23 else 1.0), monitor, 30)
    assert monitor.happened == {"divergence": 23}


def test_an_exponentially_growing_loss_is_forecast_to_the_divergence_threshold():
    # 5 for ten steps (the start), then 1 (the lowest) until step 100, then e^(0.01 (t − 100)):
    # the threshold is 1 + half the ground covered = 3, crossed at t = 209.86, the divergence at
    # step 210. Each point is the mean loss of ten steps at their mean step, which on an
    # exponential lies 0.04 steps off the curve: the forecast is 210 too
    rate, horizon = 0.01, 100
    crossing = 100 + math.log(3) / rate

    def curve(step):
        return 5.0 if step < 10 else 1.0 if step < 100 else math.exp(rate * (step - 100))

    monitor = dynlens.EarlyWarningMonitor(  # consecutive=1: the first point in the horizon warns
        dense_early=False,
        instabilities=("divergence",),
        every_n_steps=10,
        window=4,
        horizon=horizon,
        consecutive=1,
        verbose=False,
    )
    fit(Scripted(curve=curve), monitor, 300)
    assert monitor.happened == {"divergence": math.ceil(crossing)}
    assert monitor.latest["divergence/threshold"] == pytest.approx(3.0)
    (warning,) = monitor.warnings
    # the first measured step whose window holds four points of the exponential (from step 140)
    # and whose last point (4.5 steps back) is within the horizon of the crossing
    warned = next(s for s in range(140, 300, 10) if crossing - (s - 4.5) <= horizon)
    assert (warning["step"], warning["expected_step"]) == (warned, math.ceil(crossing))


def test_a_loss_that_jumps_and_levels_off_does_not_warn_and_one_that_keeps_growing_does():
    # a catapult's shape: from a start at 20, the loss falls to 1, jumps to 2.2 at step 300 and
    # stays there (with a little batch-to-batch noise), below the divergence threshold (1 + half
    # the ground covered: about 10.5); against it the same jump followed by growth of 1% a step
    noise = torch.randn(700, generator=torch.Generator().manual_seed(0)).mul(0.02).tolist()

    def levels_off(step):
        return (20.0 if step < 10 else 1.0 if step < 300 else 2.2) * (1 + noise[step])

    def keeps_growing(step):
        return levels_off(step) * math.exp(0.01 * max(step - 300, 0))

    catapult = dynlens.EarlyWarningMonitor(
        dense_early=False, instabilities=("divergence",), verbose=False
    )
    fit(Scripted(curve=levels_off), catapult, 700)
    assert catapult.warnings == [] and catapult.happened == {"divergence": None}
    growing = dynlens.EarlyWarningMonitor(
        dense_early=False, instabilities=("divergence",), verbose=False
    )
    fit(Scripted(curve=keeps_growing), growing, 700)
    # the threshold (about 0.96 + (20 − 0.96) / 2 = 10.5) at about 300 + ln(10.5 / 2.2) / 0.01
    threshold = growing.latest["divergence/threshold"]
    assert threshold == pytest.approx(10.5, rel=0.02)
    crossing = 300 + math.log(threshold / 2.2) / 0.01
    assert [w["event"] for w in growing.warnings] == ["divergence"]
    assert growing.warnings[0]["step"] < growing.happened["divergence"]
    assert crossing - 5 <= growing.happened["divergence"] <= crossing + 5


class Regression(pl.LightningModule):
    """Least squares: a quadratic loss, so the secant along the step is exact."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1, bias=False)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.lin(x).squeeze(-1), y.float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_the_update_ratio_is_the_step_size_over_two_over_the_curvature_along_the_gradient():
    # MSE on X: H = 2 XᵀX / n; for a gradient step η·g the ratio is η gᵀHg / (2 gᵀg)
    torch.manual_seed(0)
    model = Regression(lr=0.3)
    data = loader(n=8, d=3)
    x, _ = next(iter(data))
    expected = {}

    class Before(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            g = pl_module.lin.weight.grad.reshape(-1).double()
            h = 2 * x.double().T @ x.double() / len(x)
            expected[trainer.global_step] = 0.3 * float(g @ h @ g) / (2 * float(g @ g))

    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False,
        instabilities=("divergence",),
        every_n_steps=1,
        curvature_every_n_steps=1,
        verbose=False,
    )
    seen = {}

    class After(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen[trainer.global_step - 1] = monitor.latest["divergence/update_ratio"]

    trainer = make_trainer(max_steps=4, logger=False, callbacks=[Before(), monitor, After()])
    trainer.fit(model, data)
    assert set(seen) == {0, 1, 2, 3}
    for step, ratio in seen.items():
        assert ratio == pytest.approx(expected[step], rel=1e-4), step


def test_the_update_ratio_is_not_measured_under_gradient_accumulation():
    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False,
        instabilities=("divergence",),
        every_n_steps=1,
        curvature_every_n_steps=1,
        verbose=False,
    )
    trainer = make_trainer(
        max_steps=2, logger=False, callbacks=[monitor], accumulate_grad_batches=2
    )
    trainer.fit(Regression(lr=0.1), DataLoader(loader().dataset, batch_size=4))
    assert "divergence/update_ratio" not in monitor.latest
    assert [e["reason"] for e in monitor.events] == ["no_update_ratio"]


class Attention(pl.LightningModule):
    """One SDPA call whose logits the module computes itself too (for the brute-force max)."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(4, 8)
        self.head = nn.Linear(4, 2)
        self.largest: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        seq = x[:, None, :].expand(-1, 3, -1) * torch.arange(1.0, 4.0)[None, :, None]
        q, k = self.qk(seq).chunk(2, dim=-1)
        scores = q @ k.transpose(-1, -2) / 2.0  # scale 1/sqrt(4)
        self.largest[self.global_step] = scores.max().item()
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], seq[:, None])
        return F.cross_entropy(self.head(out[:, 0].mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_the_attention_signal_is_the_largest_attention_logit():
    model = Attention()
    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False, instabilities=("attention",), every_n_steps=2, verbose=False
    )
    seen = {}

    class After(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if "attention/max_logit" in monitor.latest:
                seen[trainer.global_step - 1] = monitor.latest["attention/max_logit"]

    trainer = make_trainer(max_steps=6, logger=False, callbacks=[monitor, After()])
    trainer.fit(model, loader(n=8, d=4))
    for step in (0, 2, 4):  # the measured steps
        assert seen[step] == pytest.approx(model.largest[step], rel=1e-5)
    assert seen[1] == seen[0] and seen[5] == seen[4]  # nothing measured in between


def _attention_seen(monitor, callbacks):
    """Fit the Attention module with ``callbacks``; the monitor's attention signal by the step
    it was measured at, the module, and the steps the monitor armed its own capture at."""
    model, seen, armed = Attention(), {}, []
    own_arm = monitor.attention_capture.arm
    monitor.attention_capture.arm = lambda *a, **k: armed.append(1) or own_arm(*a, **k)

    class After(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if "attention/max_logit" in monitor.latest:
                seen[trainer.global_step - 1] = monitor.latest["attention/max_logit"]

    trainer = make_trainer(max_steps=6, logger=False, callbacks=[*callbacks, After()])
    trainer.fit(model, loader(n=8, d=4))
    return seen, model, armed


@pytest.mark.parametrize("first", ["warning", "logits"])
def test_the_attention_signal_is_read_from_a_logit_growth_monitor_measuring_the_same_steps(first):
    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False, instabilities=("attention",), every_n_steps=2, verbose=False
    )
    growth = dynlens.LogitGrowthMonitor(
        output_logits=False, attention_every_n_steps=1, verbose=False
    )
    order = [monitor, growth] if first == "warning" else [growth, monitor]
    seen, model, armed = _attention_seen(monitor, order)
    assert monitor.attention_from is growth and not armed  # measured once, by the other
    for step in (0, 2, 4):  # whichever monitor's hook runs first, the same step's values
        assert seen[step] == pytest.approx(model.largest[step], rel=1e-5)
    assert [e["reason"] for e in monitor.events].count("attention_shared") == 1


def test_a_logit_growth_monitor_on_other_steps_or_one_that_stops_is_not_read():
    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False, instabilities=("attention",), every_n_steps=2, verbose=False
    )
    growth = dynlens.LogitGrowthMonitor(
        output_logits=False, attention_every_n_steps=3, verbose=False
    )
    seen, model, armed = _attention_seen(monitor, [monitor, growth])
    assert monitor.attention_from is None and len(armed) == 3  # its own, at steps 0, 2, 4
    assert seen[4] == pytest.approx(model.largest[4], rel=1e-5)

    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False, instabilities=("attention",), every_n_steps=2, verbose=False
    )
    growth = dynlens.LogitGrowthMonitor(
        output_logits=False, attention_every_n_steps=1, verbose=False
    )

    class StopsAt(pl.Callback):  # the other monitor switches itself off after step 1
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                growth.disable("simulated failure")

    seen, model, armed = _attention_seen(monitor, [StopsAt(), growth, monitor])
    assert seen[0] == pytest.approx(model.largest[0], rel=1e-5)
    # step 2 finds it off and goes without a point; from step 4 the monitor measures itself
    assert 2 not in seen and len(armed) == 1
    assert seen[4] == pytest.approx(model.largest[4], rel=1e-5)
    assert "attention_own" in [e["reason"] for e in monitor.events]


class PowerAttention(Scripted):
    """q = k = (√(c) · t, …) over 4 dimensions at step t: the largest attention logit is
    4 c t² / √4 = 2 c t², with c = 0.02 reaching 1e4 at t = 500."""

    def training_step(self, batch, batch_idx):
        t = float(self.global_step)
        qk = torch.full((1, 1, 2, 4), math.sqrt(0.02) * t) + self.w
        F.scaled_dot_product_attention(qk, qk, qk)
        return self.w * 0 + 1.0


def test_a_power_law_attention_logit_is_forecast_exactly():
    monitor = dynlens.EarlyWarningMonitor(  # consecutive=1: the first point in the horizon warns
        dense_early=False,
        instabilities=("attention",),
        every_n_steps=10,
        window=4,
        horizon=105,
        consecutive=1,
        verbose=False,
    )
    fit(PowerAttention(), monitor, 600)
    assert monitor.happened == {"attention": 510}  # the first measured step above 1e4
    (warning,) = monitor.warnings  # the first measured step within 105 steps of 500
    assert warning["step"] == 400
    assert warning["expected_step"] in (
        500,
        501,
    )  # the ceiling of 500 up to the logarithms' rounding
    assert [e["reason"] for e in monitor.events] == ["warn_attention", "attention"]


def test_flat_noise_warns_of_nothing():
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(400, generator=g) * 4).tolist()

    class Noisy(Scripted):
        def training_step(self, batch, batch_idx):
            x, _ = batch
            gap = 10.0 + noise[self.global_step]
            logits = torch.zeros(len(x), 2) + self.w + torch.tensor([gap, 0.0])
            loss = F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long))
            return {"loss": loss, "logits": logits.detach()}

    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False,
        instabilities=("collapse",),
        every_n_steps=5,
        horizon=200,
        logits_module=None,
        verbose=False,
    )
    fit(Noisy(), monitor, 300)
    assert monitor.warnings == [] and monitor.happened == {"collapse": None}
    # the default window: the points of the last half of the run, measured every 5 steps
    steps = [int(s) for s, _ in monitor.policy.history["collapse"]]
    assert monitor.policy.windows["collapse"] == "auto"
    assert steps == list(range(math.ceil(steps[-1] / 2 / 5) * 5, steps[-1] + 1, 5))


@pytest.mark.parametrize("action", ["stop", "checkpoint", "callable"])
def test_actions(action, tmp_path):
    got = []
    monitor = dynlens.EarlyWarningMonitor(
        dense_early=False,
        instabilities=("collapse",),
        every_n_steps=5,
        window=4,
        horizon=100,
        logits_module=None,
        action=got.append if action == "callable" else action,
        checkpoint_dir=str(tmp_path),
        verbose=False,
    )
    trainer = fit(Scripted(0.05), monitor, 400)
    (warning,) = monitor.warnings
    if action == "stop":
        assert trainer.global_step == warning["step"] + 1  # stopped after that step
    elif action == "checkpoint":
        path = tmp_path / f"dynlens-warning-collapse-step{warning['step']}.ckpt"
        assert warning["checkpoint"] == str(path) and path.exists()
        saved = torch.load(path, weights_only=False)
        assert saved["global_step"] == warning["step"] + 1  # resumes with the next step
    else:
        assert got == [warning]


def test_the_panel_escapes_the_prefix_in_its_tag_patterns():
    monitor = dynlens.EarlyWarningMonitor(prefix="run.1+a", verbose=False)
    pattern = monitor.panel()["expected steps to each event (while one is expected)"][1][0]
    assert re.fullmatch(pattern, "run.1+a/warning/collapse/steps_to")
    assert not re.fullmatch(pattern, "runX1+a/warning/collapse/steps_to")


class Isotropic(pl.LightningModule):
    """Least squares on three orthogonal inputs of length √3: H = 2·I, so along any gradient
    step the update ratio is η·λ/2 = η and the stability limit η_c = 2/λ = 1 exactly. Each batch
    draws new targets, so the weights never settle; the learning rate ramps geometrically from
    0.1 by 1% a step and passes 1 at step 232 (0.1 · 1.01^231.4 = 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1, bias=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.lin(x).squeeze(-1), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        ramp = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.01**t)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}


def isotropic_batches(steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = (math.sqrt(3) * torch.eye(3)).repeat(steps, 1)
    return DataLoader(TensorDataset(x, torch.randn(3 * steps, generator=g)), batch_size=3)


def fit_isotropic(instability: str) -> dynlens.EarlyWarningMonitor:
    """400 steps of :class:`Isotropic` watched for ``instability`` alone (a window of 16)."""
    monitor = dynlens.EarlyWarningMonitor(
        instabilities=(instability,), horizon=300, window=16, consecutive=1, verbose=False
    )
    trainer = make_trainer(max_steps=400, logger=False, callbacks=[monitor])
    trainer.fit(Isotropic(), isotropic_batches(400))
    return monitor


def test_the_scheduled_rate_passing_the_measured_stability_limit_is_forecast_exactly():
    crossing = math.ceil(math.log(10) / math.log(1.01))  # 232
    monitor = fit_isotropic("divergence")
    (warning,) = monitor.warnings
    assert warning["signal"] == "stability_limit" and warning["expected_step"] == crossing
    assert f"range {crossing}–∞" in warning["message"]
    # the ratio is measured densely from the start: the crossing is forecast once the window of
    # divergence (16 points) holds measurements, at step 28
    ratio_steps = [
        s for s in range(400) if s % dense_cadence(s, 10, 8) == s % dense_cadence(s, 100, 4) == 0
    ]
    assert warning["step"] == ratio_steps[15] == 28
    # the loss diverges about there: the noise the batches drive grows as η nears the limit
    # (its variance goes as 1/(2 − ηλ)), and past it the weights run away
    happened = monitor.happened["divergence"]
    assert crossing - 10 <= happened <= crossing + 100
    limits = [limit for _, limit in monitor.policy.history["limit"]]
    assert limits == pytest.approx([1.0] * len(limits), rel=1e-3)  # η_c = 2/λ, measured


def test_a_spike_is_forecast_from_the_same_stability_limit():
    # watching spikes alone: the update ratio is measured for them, and the crossing warns
    crossing = math.ceil(math.log(10) / math.log(1.01))  # 232
    monitor = fit_isotropic("spike")
    (warning,) = monitor.warnings  # and none of the divergence, which is not watched
    assert warning["event"] == "spike" and warning["signal"] == "stability_limit"
    assert warning["expected_step"] == crossing and warning["step"] == 28
    # here the spikes come before the crossing: the noise the batches drive grows as η nears
    # the limit (its variance as 1/(2 − ηλ)), and the 6 sigma rule reads its growth as a spike
    assert 28 < monitor.happened["spike"] < crossing
    assert "divergence" not in monitor.happened


class Steps(pl.loggers.Logger):
    """The steps at which a key was logged."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key, self.steps = key, []

    name, version = "steps", 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        if self.key in metrics:
            self.steps.append(step)


def test_measured_densely_early_then_every_n_steps():
    steps = Steps("dynlens/warning/divergence/loss")
    monitor = dynlens.EarlyWarningMonitor(instabilities=("divergence",), verbose=False)
    trainer = make_trainer(max_steps=300, logger=steps, callbacks=[monitor])
    trainer.fit(Scripted(curve=lambda s: 1.0), loader())
    # every step up to 15, every 2 up to 31, 4 up to 63, 8 up to 127, then every 10
    # (and the last step, where the losses since the last measured one are read at the end)
    expected = [s for s in range(300) if s % dense_cadence(s, 10, 8) == 0] + [299]
    assert expected[:22] == [*range(16), 16, 18, 20, 22, 24, 26]
    assert expected[-3:] == [280, 290, 299] and 120 in expected and 124 not in expected
    assert steps.steps == expected
