"""LRAhead: where the trainer's schedule stops raising the learning rate, read ahead without a
trace: every scheduler and parameter group as it was, and training's learning rates unchanged."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, TensorDataset

import dynlens
from dynlens.callbacks.lr_ahead import LRAhead
from tests.helpers import trainer as make_trainer


def fake_trainer(make_scheduler, interval="step", frequency=1, optimizer=None):
    """A trainer as LRAhead reads it: the global step, the optimizers and scheduler configs."""
    optimizer = optimizer or torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0, momentum=0.9)
    scheduler = make_scheduler(optimizer)
    config = SimpleNamespace(scheduler=scheduler, interval=interval, frequency=frequency)
    trainer = SimpleNamespace(global_step=0, optimizers=[optimizer], lr_scheduler_configs=[config])
    return trainer, optimizer, scheduler


def advance(trainer, scheduler, steps):
    """Train ``steps`` steps as Lightning does: the optimizer, then the scheduler."""
    for _ in range(steps):
        trainer.optimizers[0].step()
        scheduler.step()
        trainer.global_step += 1


def warmup(steps):
    return lambda o: lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / steps))


def test_a_linear_warm_up_stops_rising_at_its_last_step():
    trainer, optimizer, scheduler = fake_trainer(warmup(20))  # the rate rises to step 19
    ahead = LRAhead(trainer)
    assert ahead.rise_ends_before(100) == 19
    assert ahead.rise_ends_before(19) is None  # it rises up to step 19 and beyond
    advance(trainer, scheduler, 10)
    assert ahead.rise_ends_before(30) == 19
    assert ahead.rise_ends_before(15) is None
    advance(trainer, scheduler, 9)
    assert trainer.global_step == 19 and optimizer.param_groups[0]["lr"] == 1.0
    assert ahead.rise_ends_before(1000) is None  # it no longer rises
    # a fresh reader that has not seen the peak before finds the same
    assert LRAhead(trainer).rise_ends_before(1000) is None


def test_the_rates_ahead_are_the_schedule_s_and_it_is_left_as_it_was():
    trainer, optimizer, scheduler = fake_trainer(
        lambda o: lr_scheduler.LambdaLR(o, lambda t: 1.01**t)
    )
    advance(trainer, scheduler, 3)
    before = copy.deepcopy(scheduler.state_dict())
    rates = LRAhead(trainer).rates(5)
    assert rates == pytest.approx([1.01**t for t in range(3, 9)])
    assert scheduler.state_dict() == before and optimizer.param_groups[0]["lr"] == rates[0]
    # a schedule that ends (OneCycleLR past its last step) holds its last rate from there
    trainer, _, _ = fake_trainer(lambda o: lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=10))
    ending = LRAhead(trainer).rates(20)
    assert len(ending) == 21 and len(set(ending[11:])) == 1
    # without a step-interval scheduler the rate stays what it is
    trainer, _, _ = fake_trainer(warmup(5), interval="epoch")
    assert LRAhead(trainer).rates(3) == [trainer.optimizers[0].param_groups[0]["lr"]] * 4


def test_a_rise_that_lasts_past_the_step_asked_about_and_a_falling_rate():
    trainer, _, _ = fake_trainer(warmup(1000))
    ahead = LRAhead(trainer)
    assert ahead.rise_ends_before(500) is None  # rising the whole way
    assert ahead.rise_ends_before(400) is None  # known from the first look
    assert ahead.rise_ends_before(1200) == 999
    cosine, _, _ = fake_trainer(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=100))
    assert LRAhead(cosine).rise_ends_before(50) is None


def test_the_scheduler_and_the_parameter_groups_are_as_they_were():
    def one_cycle(o):
        return lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=40)

    trainer, optimizer, scheduler = fake_trainer(one_cycle)  # it moves the momentum too
    advance(trainer, scheduler, 3)
    state = copy.deepcopy(scheduler.state_dict())
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    # the peak of the one cycle (30% of 40 steps), also when asked past the cycle's end, where
    # the scheduler refuses to step
    assert LRAhead(trainer).rise_ends_before(13) == 11
    assert LRAhead(trainer).rise_ends_before(100) == 11
    assert scheduler.state_dict() == state
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups
    assert scheduler.get_last_lr() == [g["lr"] for g in optimizer.param_groups]


def test_schedules_it_does_not_read():
    epoch, _, _ = fake_trainer(warmup(20), interval="epoch")
    assert LRAhead(epoch).rise_ends_before(100) is None
    plateau, _, _ = fake_trainer(lambda o: lr_scheduler.ReduceLROnPlateau(o))
    assert LRAhead(plateau).rise_ends_before(100) is None
    none = SimpleNamespace(global_step=0, optimizers=[], lr_scheduler_configs=[])
    assert LRAhead(none).rise_ends_before(100) is None


def test_a_scheduler_stepped_every_few_steps():
    trainer, _, _ = fake_trainer(warmup(10), frequency=3)  # ten rises, one every three steps
    assert LRAhead(trainer).rise_ends_before(100) == 27


class Regression(pl.LightningModule):
    def __init__(self, schedule: str) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)
        self.schedule = schedule

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        if self.schedule == "warm-up then cosine":
            scheduler = lr_scheduler.SequentialLR(
                optimizer,
                [
                    lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=20),
                    lr_scheduler.CosineAnnealingLR(optimizer, T_max=40),
                ],
                milestones=[20],
            )
        else:
            scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=60)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class Rates(pl.Callback):
    def __init__(self) -> None:
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        group = trainer.optimizers[0].param_groups[0]
        self.seen.append((group["lr"], group["betas"]))


class Ahead(pl.Callback):
    """Looks ahead at every step, before the rates are read."""

    def __init__(self) -> None:
        self.ends = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(LRAhead(trainer).rise_ends_before(trainer.global_step + 30))


@pytest.mark.parametrize("schedule", ["warm-up then cosine", "one cycle"])
def test_training_sees_the_same_rates_and_weights_while_it_looks_ahead(schedule):
    data = TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
    runs = []
    for callbacks in ([Rates()], [Ahead(), Rates()]):
        torch.manual_seed(0)
        model = Regression(schedule)
        trainer = make_trainer(max_steps=60, logger=False, callbacks=callbacks)
        trainer.fit(model, DataLoader(data, batch_size=4))
        runs.append((callbacks[-1].seen, [p.detach().clone() for p in model.parameters()]))
    (rates, weights), (rates_ahead, weights_ahead) = runs
    assert rates_ahead == rates
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_ahead, strict=True))
    ends = callbacks[0].ends
    # LinearLR reaches the full rate at its 20th step; the one cycle peaks at 0.3 · 60 − 1
    peak = 20 if schedule == "warm-up then cosine" else 17
    assert ends[0] == peak and ends[peak + 1 :] == [None] * (len(ends) - peak - 1)


def test_the_monitor_does_not_forecast_past_the_end_of_a_warm_up():
    """From a start at 19, the loss falls to 1 and grows exponentially from step 100: it crosses
    the divergence threshold (1 + half the ground covered, 10) at step 330.3, the divergence at
    step 331. Without a schedule, or under a warm-up that rises past that step, the warning
    comes at step 240, the first measured step whose window of four points lies within 100 steps
    of the crossing; under a warm-up that ends at step 299, at step 300, the first measured step
    whose learning rate no longer rises."""
    from tests.callbacks.test_early_warning import Scripted, loader

    def curve(step):
        if step < 10:
            return 19.0
        return 1.0 if step < 100 else torch.tensor(0.01 * (step - 100)).exp().item()

    class WarmedUp(Scripted):
        def __init__(self, steps):
            super().__init__(curve=curve)
            self.steps = steps

        def configure_optimizers(self):  # a rate too small to move the loss in float32
            optimizer = torch.optim.SGD(self.parameters(), lr=1e-12)
            if self.steps is None:
                return optimizer
            scheduler = warmup(self.steps)(optimizer)
            config = {"scheduler": scheduler, "interval": "step"}
            return {"optimizer": optimizer, "lr_scheduler": config}

    warned = {}
    for steps in (None, 300, 1000):
        monitor = dynlens.EarlyWarningMonitor(
            dense_early=False,
            instabilities=("divergence",),
            window=4,
            horizon=100,
            consecutive=1,
            verbose=False,
        )
        trainer = make_trainer(max_steps=400, logger=False, callbacks=[monitor])
        trainer.fit(WarmedUp(steps), loader())
        assert monitor.happened == {"divergence": 331}
        warned[steps] = [w["step"] for w in monitor.warnings]
    assert warned == {None: [240], 300: [300], 1000: [240]}
