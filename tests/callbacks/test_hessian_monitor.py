"""HessianMonitor through short real Trainer runs on tiny models, against exact Hessians."""

from __future__ import annotations

import copy
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dynlens import ConfigurationError
from dynlens.callbacks.hessian import HessianMonitor
from dynlens.callbacks.replay import logging_suppressed, probe_generator
from dynlens.callbacks.schedule import budget_schedule
from dynlens.compat import Callback
from dynlens.curvature import CurvatureFallbackWarning
from tests.helpers import (
    PACKAGES,
    custom_scalars_layout,
    lightning,
    scalars,
    tb_logger,
    texts,
    trainer,
)


def conformance_monitor(eval_set):
    """A small HessianMonitor for the monitor-contract suite
    (``tests/test_conformance.py``): its model has attention, BatchNorm, dropout and the logits
    from ``head``; ``eval_set`` is one of its evaluation sets."""
    return HessianMonitor(every_n_steps=1, num_probes=2, max_iter=3, verbose=False)


KEY = "dynlens/hessian/"


# --------------------------------------------------------------------------------------------
# tiny models and data
# --------------------------------------------------------------------------------------------


class Square(torch.autograd.Function):
    """x² with a first-order-only backward: no second derivatives pass through it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def tiny_module(
    package="pytorch_lightning",
    *,
    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    batchnorm=False,
    dropout=0.0,
    once_differentiable_op=False,
    scheduler=None,
    manual=False,
    init_seed=0,
):
    """A 3 → 4 → 1 network (21 parameters without BatchNorm), MSE loss, logs ``train_loss``.

    When the weights it runs with are not its own Parameters (a measurement swapped them for
    plain tensors) it also logs ``swapped_weights``: the key only a leaking measurement records.
    """
    pl = lightning(package)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)  # the same weights in every run of a test
                layers = [nn.Linear(3, 4)]
                layers += [nn.BatchNorm1d(4)] if batchnorm else []
                layers += [nn.Tanh()]
                layers += [nn.Dropout(dropout)] if dropout else []
                layers += [nn.Linear(4, 1)]
            self.net = nn.Sequential(*layers)
            self.automatic_optimization = not manual

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.net(x)
            if once_differentiable_op:
                out = Square.apply(out)
            loss = F.mse_loss(out, y)
            self.log("train_loss", loss)
            if not isinstance(self.net[0].weight, nn.Parameter):  # swapped: a measurement
                self.log("swapped_weights", 1.0)
            if manual:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            return loss

        def configure_optimizers(self):
            opt = optimizer(self.parameters())
            if scheduler is None:
                return opt
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": scheduler(opt), "interval": "step"},
            }

    return Tiny()


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)


def loader(n=8, batch_size=None, shuffle=False, seed=0):
    x, y = data(n, seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or n, shuffle=shuffle)


class Snapshot(Callback):
    """Copies the module and the batch at the start of every training batch (what is measured)."""

    def __init__(self):
        self.at = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0]
        state = {n: copy.deepcopy(opt.state.get(p, {})) for n, p in pl_module.named_parameters()}
        self.at[trainer.global_step] = (
            copy.deepcopy(pl_module.net),
            [b.clone() for b in batch],
            state,
        )


def exact_hessian(net, batch, square=False):
    """Dense float64 Hessian of the MSE loss of ``net`` (its output squared with ``square``, as
    ``tiny_module(once_differentiable_op=True)`` has it) on ``batch`` over its parameters."""
    net = copy.deepcopy(net).double()
    x, y = (b.double() for b in batch)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def loss(theta):
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        out = functional_call(net, params, (x,))
        return F.mse_loss(out * out if square else out, y)

    return torch.autograd.functional.hessian(loss, flat)


def fit(tmp_path, monitor, module=None, *, package="pytorch_lightning", max_steps=5, dl=None, **kw):
    module = module or tiny_module(package)
    callbacks = [monitor] if isinstance(monitor, HessianMonitor) else list(monitor)
    t = trainer(
        package, max_steps=max_steps, logger=tb_logger(tmp_path, package), callbacks=callbacks, **kw
    )
    t.fit(module, dl or loader())
    return t


def exact_monitor(**kw):
    # Hutch++ with ⌊m/3⌋ ≥ n = 21 sketches all of ℝⁿ and Lanczos with ≥ n steps is exact.
    return HessianMonitor(
        **{
            "every_n_steps": 2,
            "estimator": "hutchpp",
            "num_probes": 66,
            "max_iter": 40,
            "tol": 1e-7,
            "verbose": False,
            **kw,
        }
    )


def values(logged, quantity):
    return dict(logged[KEY + quantity])


# --------------------------------------------------------------------------------------------
# exact values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_logged_trace_and_sharpness_equal_the_exact_hessian(tmp_path, package):
    snap = Snapshot()
    monitor = exact_monitor()
    fit(tmp_path, [monitor, snap], tiny_module(package), package=package, max_steps=5)
    logged = scalars(tmp_path)
    steps = [s for s, _ in logged[KEY + "trace"]]
    assert steps == [0, 2, 4]
    trace, lam = values(logged, "trace"), values(logged, "lambda_max")
    for step in steps:
        net, batch, _ = snap.at[step]
        h = exact_hessian(net, batch)
        assert trace[step] == pytest.approx(torch.trace(h).item(), rel=1e-4, abs=1e-5)
        assert lam[step] == pytest.approx(torch.linalg.eigvalsh(h)[-1].item(), rel=1e-4)
        # the loss is the training step's own, at the same parameters and batch
        assert values(logged, "loss")[step] == pytest.approx(
            dict(logged["train_loss"])[step], rel=1e-6
        )
    for step in steps:
        lower, upper = values(logged, "trace_lower")[step], values(logged, "trace_upper")[step]
        stderr = values(logged, "trace_stderr")[step]
        assert lower == pytest.approx(trace[step] - stderr) and upper == pytest.approx(
            trace[step] + stderr
        )
        assert stderr < 1e-4  # the sketch took everything: nothing stochastic is left
        # SGD without momentum: η·λ/2 and η·tr/2 with η = 0.1, exactly given the logged values
        assert values(logged, "lr")[step] == pytest.approx(0.1)
        assert values(logged, "eos_threshold")[step] == pytest.approx(20.0)
        assert values(logged, "trace_threshold")[step] == pytest.approx(20.0)
        assert values(logged, "eos_ratio")[step] == pytest.approx(0.1 * lam[step] / 2, rel=1e-6)
        assert values(logged, "trace_ratio")[step] == pytest.approx(0.1 * trace[step] / 2, rel=1e-6)
        assert values(logged, "one")[step] == 1.0
    assert KEY + "precond_lambda_max" not in logged and KEY + "frobenius" not in logged
    assert monitor.latest["lambda_max"] == pytest.approx(lam[4])


def test_hutchinson_is_within_its_error_and_gives_the_frobenius_norm(tmp_path):
    snap = Snapshot()
    monitor = HessianMonitor(every_n_steps=1, estimator="hutchinson", num_probes=300, verbose=False)
    fit(tmp_path, [monitor, snap], max_steps=1)
    logged = scalars(tmp_path)
    h = exact_hessian(*snap.at[0][:2])
    stderr = values(logged, "trace_stderr")[0]
    assert 0 < stderr < 0.2 * abs(torch.trace(h).item())
    assert abs(values(logged, "trace")[0] - torch.trace(h).item()) < 4 * stderr
    assert values(logged, "frobenius")[0] == pytest.approx(torch.linalg.norm(h).item(), rel=0.1)


@pytest.mark.parametrize(
    ("optimizer", "lr", "threshold"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 0.1, 2 * 1.9 / 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 0.1, 3.8 / (2.8 * 0.1)),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.5), 0.1, 3.0 / 0.05),
        # several groups: η is the largest lr among them
        (
            lambda p: torch.optim.SGD(
                [{"params": list(p)[:2], "lr": 0.3}, {"params": list(p)[2:]}], lr=0.1
            ),
            0.3,
            2 / 0.3,
        ),
    ],
    ids=["heavy-ball", "nesterov", "dampening", "two-groups"],
)
def test_threshold_follows_the_optimizer(tmp_path, optimizer, lr, threshold):
    monitor = HessianMonitor(every_n_steps=1, trace=False, verbose=False)
    fit(tmp_path, monitor, tiny_module(optimizer=optimizer), max_steps=2)
    logged = scalars(tmp_path)
    for step in (0, 1):
        assert values(logged, "lr")[step] == pytest.approx(lr)
        assert values(logged, "eos_threshold")[step] == pytest.approx(threshold)
        lam = values(logged, "lambda_max")[step]
        assert values(logged, "eos_ratio")[step] == pytest.approx(lam / threshold, rel=1e-6)


def test_learning_rate_is_read_live_from_a_scheduler(tmp_path):
    module = tiny_module(
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    )
    fit(tmp_path, HessianMonitor(every_n_steps=1, trace=False, verbose=False), module, max_steps=5)
    lrs = values(scalars(tmp_path), "lr")
    # measured before each step, with the learning rate that step uses
    assert [lrs[s] for s in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert values(scalars(tmp_path), "eos_threshold")[4] == pytest.approx(2 / 0.025)


def test_preconditioned_sharpness_equals_the_explicit_eigenvalue_after_adam_steps(tmp_path):
    snap = Snapshot()
    monitor = exact_monitor(every_n_steps=1)
    module = tiny_module(optimizer=lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99)))
    fit(tmp_path, [monitor, snap], module, max_steps=4)
    logged = scalars(tmp_path)
    precond = values(logged, "precond_lambda_max")
    assert sorted(precond) == [1, 2, 3]  # from the first Adam step on
    for step in (1, 3):
        net, batch, state = snap.at[step]
        h = exact_hessian(net, batch)
        p = torch.cat(
            [
                ((s["exp_avg_sq"] / (1 - 0.99 ** float(s["step"]))).sqrt() + 1e-8).reshape(-1)
                for s in state.values()
            ]
        ).double()
        a = h / p.sqrt()[:, None] / p.sqrt()[None, :]  # P^{-1/2} H P^{-1/2}
        assert precond[step] == pytest.approx(torch.linalg.eigvalsh(a)[-1].item(), rel=1e-4)
        threshold = (2 + 2 * 0.8) / ((1 - 0.8) * 0.01)
        assert values(logged, "precond_threshold")[step] == pytest.approx(threshold)
        assert values(logged, "precond_ratio")[step] == pytest.approx(precond[step] / threshold)
        # eos_ratio stays the gradient-descent reference η·λ_max/2
        lam = values(logged, "lambda_max")[step]
        assert values(logged, "eos_ratio")[step] == pytest.approx(0.01 * lam / 2, rel=1e-6)


# --------------------------------------------------------------------------------------------
# how the loss is recomputed
# --------------------------------------------------------------------------------------------


def test_loss_fn_path_equals_the_training_step_path(tmp_path):
    fit(tmp_path / "step", exact_monitor())
    fit(
        tmp_path / "fn",
        exact_monitor(loss_fn=lambda module, batch: F.mse_loss(module(batch[0]), batch[1])),
    )
    by_step, by_fn = scalars(tmp_path / "step"), scalars(tmp_path / "fn")
    for quantity in ("loss", "trace", "lambda_max"):
        a, b = values(by_step, quantity), values(by_fn, quantity)
        assert a.keys() == b.keys() == {0, 2, 4}
        assert [a[s] for s in a] == pytest.approx([b[s] for s in a], rel=1e-6)


def test_measurement_logs_nothing_through_self_log(tmp_path):
    module = tiny_module(batchnorm=True, dropout=0.3)
    t = fit(tmp_path / "with", HessianMonitor(every_n_steps=1, verbose=False), module)
    logged = scalars(tmp_path / "with")
    assert len(logged[KEY + "trace"]) == 5  # measured at every step
    assert "swapped_weights" not in logged and "swapped_weights" not in t.callback_metrics
    assert "log" not in module.__dict__ and "log_dict" not in module.__dict__

    reference = trainer(max_steps=5, logger=tb_logger(tmp_path / "without"))
    reference.fit(tiny_module(batchnorm=True, dropout=0.3), loader())
    ours = {k for k in t.callback_metrics if not k.startswith("dynlens/")}
    assert ours == set(reference.callback_metrics)
    assert {k for k in logged if not k.startswith("dynlens/")} == set(scalars(tmp_path / "without"))


def test_logging_suppressed_restores_an_instance_attribute():
    module = nn.Linear(1, 1)
    module.log = "mine"
    with logging_suppressed(module):
        assert module.log(1, 2) is None
    assert module.log == "mine" and "log_dict" not in module.__dict__


def test_probe_batch_mode_measures_the_fixed_batch(tmp_path):
    probe = data(6, seed=1)
    snap = Snapshot()
    fit(tmp_path, [exact_monitor(probe_batch=probe), snap], max_steps=3)
    trace = values(scalars(tmp_path), "trace")
    for step in (0, 2):
        net = snap.at[step][0]
        on_probe = torch.trace(exact_hessian(net, probe)).item()
        on_batch = torch.trace(exact_hessian(net, snap.at[step][1])).item()
        assert trace[step] == pytest.approx(on_probe, rel=1e-4)
        assert abs(on_probe - on_batch) > 1e-2 * abs(on_probe)  # the two batches differ


def test_bf16_mixed_precision_is_measured_in_float32(tmp_path):
    snap = Snapshot()
    fit(tmp_path, [exact_monitor(), snap], max_steps=1, precision="bf16-mixed")
    h = exact_hessian(*snap.at[0][:2])
    assert values(scalars(tmp_path), "trace")[0] == pytest.approx(torch.trace(h).item(), rel=1e-4)
    # under bf16 autocast the same measurement is off by far more than that tolerance
    net, batch, _ = snap.at[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss = F.mse_loss(net(batch[0]), batch[1]).float().item()
    assert bf16_loss != pytest.approx(F.mse_loss(net(batch[0]), batch[1]).item(), rel=1e-4)


def test_a_16_bit_module_is_measured_on_float32_copies(tmp_path):
    snap = Snapshot()
    monitor = exact_monitor(every_n_steps=1)
    fit(tmp_path, [monitor, snap], max_steps=2, precision="bf16-true")
    net, batch, _ = snap.at[1]
    assert net[0].weight.dtype == batch[0].dtype == torch.bfloat16  # what training runs in
    # the exact Hessian of the bf16 weights and inputs, taken in float64
    h = exact_hessian(net, batch)
    assert values(scalars(tmp_path), "trace")[1] == pytest.approx(torch.trace(h).item(), rel=1e-4)


# --------------------------------------------------------------------------------------------
# no observer effect
# --------------------------------------------------------------------------------------------


def _train_for_identity(tmp_path, callbacks):
    pl = lightning()
    pl.seed_everything(7, verbose=False)
    module = tiny_module(
        batchnorm=True,
        dropout=0.3,
        optimizer=lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=1e-3),
    )
    t = trainer(max_steps=30, logger=tb_logger(tmp_path), callbacks=callbacks)
    t.fit(module, loader(n=24, batch_size=8, shuffle=True))  # shuffling draws from the global RNG
    return module, t.optimizers[0], scalars(tmp_path)


def test_weights_are_bit_identical_to_a_run_without_the_monitor(tmp_path):
    monitor = HessianMonitor(every_n_steps=1, num_probes=6, max_iter=5, verbose=False)
    watched, watched_opt, logged = _train_for_identity(tmp_path / "with", [monitor])
    plain, plain_opt, _ = _train_for_identity(tmp_path / "without", [])
    assert monitor.num_measurements == 30 and monitor.disabled_reason is None
    assert KEY + "precond_lambda_max" in logged  # the Adam state was read on the way
    for (name, a), (_, b) in zip(
        watched.state_dict().items(), plain.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    for pa, pb in zip(watched.parameters(), plain.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(watched_opt.state[pa][key], plain_opt.state[pb][key]), key
    assert watched.training and all(m.training for m in watched.modules())


def test_measures_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    monitor = HessianMonitor(every_n_steps=1, trace=False, verbose=False)
    fit(tmp_path, monitor, max_steps=3, accumulate_grad_batches=2, dl=loader(n=16, batch_size=4))
    assert [int(h["step"]) for h in monitor.history] == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# cadence, budget, collectives
# --------------------------------------------------------------------------------------------


class FakeClock:
    """Seconds advance only when the test says: a training step costs 1, a measurement 2."""

    def __init__(self):
        self.now = 0.0
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.now


def clocked_module(clock, **kwargs):
    module = tiny_module(**kwargs)
    step = module.training_step

    def timed_step(batch, batch_idx):
        clock.now += 1.0
        return step(batch, batch_idx)

    module.training_step = timed_step
    return module


def clocked_loss_fn(clock):
    charged = set()

    def loss_fn(module, batch):
        if module.global_step not in charged:  # one charge per measurement, however many calls
            charged.add(module.global_step)
            clock.now += 2.0
        return F.mse_loss(module(batch[0]), batch[1])

    return loss_fn


def test_budget_schedules_measurements_deterministically_with_a_fake_clock(tmp_path):
    clock = FakeClock()
    monitor = HessianMonitor(
        budget=0.25, loss_fn=clocked_loss_fn(clock), clock=clock, trace=False, verbose=False
    )
    fit(tmp_path, monitor, clocked_module(clock), max_steps=40)
    # step 0 measured (2 s); step 1 times one training step (1 s) and schedules the next
    # measurement once training pays for both at 25%: (2 + 2)/0.25 − 1 = 15 steps on, step 16;
    # from then on every 2/(0.25·1) = 8 steps.
    assert [int(h["step"]) for h in monitor.history] == [0, 16, 24, 32]
    overhead = values(scalars(tmp_path), "overhead")
    assert overhead == pytest.approx({16: 0.25, 24: 0.25, 32: 0.25})  # within budget throughout
    # one reading at train start, one at the calibration step, two per measurement, one at the end
    assert clock.calls == 1 + 1 + 2 * 4 + 1
    assert monitor.state_dict()["schedule"]["next_step"] == 40


def test_budget_schedule_formula():
    kw = {"train_time": 10.0, "train_steps": 10, "measure_time": 1.0, "measure_count": 2}
    # pays for the 1 s so far and a 0.5 s next one at 5%: 30 s of training, 20 more steps
    assert budget_schedule(10, budget=0.05, measured=True, **kw) == 30
    assert budget_schedule(10, budget=0.5, measured=False, **kw) == 10  # due now
    assert budget_schedule(10, budget=0.5, measured=True, **kw) == 11  # never the same step
    assert budget_schedule(10, budget=0.1, measured=True, **{**kw, "train_time": 20.0}) == 10 + 1
    assert budget_schedule(0, budget=0.05, measured=True, **{**kw, "train_steps": 0}) is None


def test_budget_saved_on_dear_first_measurements_is_not_spent_in_a_burst():
    # a 5 s first measurement (warm-up), then 0.1 s ones; 1 s steps, 5% budget. After 200 s of
    # training the cumulative rule alone would measure at the very next step, again and again.
    kw = {"train_time": 200.0, "train_steps": 200, "measure_time": 5.1, "measure_count": 2}
    assert budget_schedule(200, budget=0.05, measured=True, **kw) == 201
    # each measurement also pays for itself: 0.1 s at 5% of 1 s steps is 2 steps of training
    assert budget_schedule(200, budget=0.05, measured=True, last_measure_time=0.1, **kw) == 202
    # the cumulative rule still decides when it asks for more
    kw = {**kw, "train_time": 100.0, "train_steps": 100}
    assert budget_schedule(100, budget=0.05, measured=True, last_measure_time=0.1, **kw) == 153


def _recording_strategy(package="pytorch_lightning"):
    pl = lightning(package)

    class Recording(pl.strategies.SingleDeviceStrategy):
        """Records the steps at which dynlens.callbacks.hessian calls a collective."""

        calls: list

        def _mine(self):
            # a collective the monitor runs (through the base's sync or the schedule), not one
            # of Lightning's own: the monitor's module is among the callers
            frame = sys._getframe(2)
            while frame is not None:
                if frame.f_globals.get("__name__") == "dynlens.callbacks.hessian":
                    return True
                frame = frame.f_back
            return False

        def reduce(self, tensor, *args, **kwargs):
            if self._mine():
                self.calls.append(("reduce", self.lightning_module.global_step))
            return super().reduce(tensor, *args, **kwargs)

        def broadcast(self, obj, src=0):
            if self._mine():
                self.calls.append(("broadcast", self.lightning_module.global_step))
            return super().broadcast(obj, src)

    strategy = Recording(device=torch.device("cpu"))
    strategy.calls = []
    return strategy


def test_collectives_run_at_measurement_steps_only(tmp_path):
    clock = FakeClock()
    strategy = _recording_strategy()
    monitor = HessianMonitor(
        budget=0.25, loss_fn=clocked_loss_fn(clock), clock=clock, trace=False, verbose=False
    )
    fit(tmp_path, monitor, clocked_module(clock), max_steps=20, strategy=strategy)
    assert strategy.calls == [
        ("reduce", 0),
        ("broadcast", 0),
        ("broadcast", 1),  # the one-off calibration of the first gap
        ("reduce", 16),
        ("broadcast", 16),
    ]

    strategy = _recording_strategy()
    fit(
        tmp_path / "n",
        HessianMonitor(every_n_steps=3, verbose=False),
        max_steps=7,
        strategy=strategy,
    )
    assert strategy.calls == [("reduce", 0), ("reduce", 3), ("reduce", 6)]  # no schedule to share


def test_probes_depend_on_seed_rank_and_step_only():
    draw = lambda *a: torch.randint(0, 2, (8,), generator=probe_generator(*a)).tolist()  # noqa: E731
    assert draw(0, 0, 5) == draw(0, 0, 5)
    assert len({tuple(draw(0, r, s)) for r in range(3) for s in range(3)}) == 9


# --------------------------------------------------------------------------------------------
# warm starts and state
# --------------------------------------------------------------------------------------------


def test_warm_starts_with_periodic_cold_starts_track_the_same_eigenvalue(tmp_path):
    warm = HessianMonitor(every_n_steps=1, trace=False, cold_start_every=3, verbose=False)
    cold = HessianMonitor(every_n_steps=1, trace=False, cold_start_every=1, verbose=False)
    fit(tmp_path / "warm", warm, max_steps=7)
    fit(tmp_path / "cold", cold, max_steps=7)
    assert [h["cold"] for h in warm.history] == [1, 0, 0, 1, 0, 0, 1]
    assert [h["cold"] for h in cold.history] == [1] * 7
    assert [h["lambda_max"] for h in warm.history] == pytest.approx(
        [h["lambda_max"] for h in cold.history], rel=1e-3
    )


def test_resume_continues_the_schedule_and_values(tmp_path):
    whole = exact_monitor()
    fit(tmp_path / "whole", whole, max_steps=8)

    first = exact_monitor()
    t = fit(tmp_path / "first", first, max_steps=4)
    ckpt = tmp_path / "mid.ckpt"
    t.save_checkpoint(ckpt)

    resumed = exact_monitor()
    t2 = trainer(max_steps=8, logger=False, callbacks=[resumed])
    t2.fit(tiny_module(), loader(), ckpt_path=ckpt)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in whole.history]
    for quantity in ("trace", "lambda_max", "loss", "eos_ratio"):
        assert [h[quantity] for h in resumed.history] == pytest.approx(
            [h[quantity] for h in whole.history], rel=1e-5
        )
    assert resumed.num_measurements == 4
    assert resumed.latest["lambda_max"] == pytest.approx(whole.latest["lambda_max"], rel=1e-5)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_budget_schedule_survives_resume_from_a_mid_run_checkpoint(tmp_path):
    pl = lightning()
    clock = FakeClock()
    whole = HessianMonitor(budget=0.25, loss_fn=clocked_loss_fn(clock), clock=clock, trace=False)
    saver = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1, filename="{step}"
    )
    fit(
        tmp_path / "whole",
        [whole, saver],
        clocked_module(clock),
        max_steps=30,
        enable_checkpointing=True,
    )
    assert [int(h["step"]) for h in whole.history] == [0, 16, 24]

    clock = FakeClock()
    resumed = HessianMonitor(budget=0.25, loss_fn=clocked_loss_fn(clock), clock=clock, trace=False)
    t = trainer(max_steps=30, logger=False, callbacks=[resumed])
    # saved after step 11: the 11 steps since the calibration at step 1 were charged to training
    t.fit(clocked_module(clock), loader(), ckpt_path=tmp_path / "ckpt" / "step=12.ckpt")
    assert [h["step"] for h in resumed.history] == [h["step"] for h in whole.history]


def test_state_dict_round_trip_and_the_layout_before_the_base_owned_the_schedule():
    monitor = HessianMonitor(budget=0.1)
    monitor.load_state_dict(
        {
            "next_step": 40,
            "calibrating": False,
            "last_step": 31,
            "train_time": 12.5,
            "train_steps": 31,
            "measure_time": 1.0,
            "measure_count": 3,
            "since_cold": 2,
            "num_measurements": 3,
            "route": "double_backward",
            "last": {"lambda_max": 3.5},
            "history": [{"step": 31.0, "lambda_max": 3.5}],
            "events": [{"step": 31, "reason": "edge_of_stability", "message": "m"}],
        }
    )
    # the schedule's keys at the top level (before the base owned it) load into the schedule
    schedule = monitor.schedule
    assert (schedule.next_step, schedule.train_time, schedule.measure_count) == (40, 12.5, 3)
    assert monitor.state_dict()["schedule"]["next_step"] == 40
    other = HessianMonitor(budget=0.1)
    other.load_state_dict(monitor.state_dict())
    assert other.state_dict() == monitor.state_dict()
    assert other.schedule.train_steps == 31
    assert other.latest == {"lambda_max": 3.5}
    assert other.events[0]["reason"] == "edge_of_stability"
    other.load_state_dict({})  # an older checkpoint without these entries
    assert other.history == [] and other.state_dict()["schedule"]["next_step"] == 0


def test_state_key_identifies_the_configuration():
    assert HessianMonitor().state_key == HessianMonitor().state_key
    assert HessianMonitor().state_key != HessianMonitor(budget=0.1).state_key
    assert HessianMonitor().state_key != HessianMonitor(every_n_steps=10).state_key
    assert HessianMonitor().state_key != HessianMonitor(probe_batch=data()).state_key


def test_a_new_trainer_starts_a_fresh_schedule(tmp_path):
    monitor = HessianMonitor(every_n_steps=2, trace=False, verbose=False)
    fit(tmp_path / "a", monitor, max_steps=3)
    fit(tmp_path / "b", monitor, max_steps=3)
    assert [int(h["step"]) for h in monitor.history] == [0, 2, 0, 2]


# --------------------------------------------------------------------------------------------
# events, panel
# --------------------------------------------------------------------------------------------


def test_edge_of_stability_is_an_event(tmp_path):
    monitor = HessianMonitor(every_n_steps=1, trace=False)
    module = tiny_module(optimizer=lambda p: torch.optim.SGD(p, lr=3.0))
    fit(tmp_path, monitor, module, max_steps=3)
    ratios = values(scalars(tmp_path), "eos_ratio")
    first = min(s for s, r in ratios.items() if r >= 1.0)
    assert [e["reason"] for e in monitor.events] == ["edge_of_stability"]
    assert monitor.events[0]["step"] == first
    ((step, text),) = texts(tmp_path, KEY + "events")
    assert step == first and "edge of stability" in text and "2/η" in text


def test_panel_layout_matches_the_logged_tags(tmp_path):
    import re

    monitor = HessianMonitor(every_n_steps=1, estimator="hutchinson", num_probes=4, verbose=False)
    module = tiny_module(optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    fit(tmp_path, monitor, module, max_steps=3)
    logged = {k for k in scalars(tmp_path) if k.startswith(KEY)}
    (category,) = [
        c for c in custom_scalars_layout(tmp_path).category if c.title == "dynlens/hessian"
    ]
    covered = set()
    for chart in category.chart:
        if chart.HasField("multiline"):
            for regex in chart.multiline.tag:
                matched = {k for k in logged if re.match(regex, k)}
                assert len(matched) == 1, (chart.title, regex)
                covered |= matched
        else:
            series = chart.margin.series[0]
            assert {series.value, series.lower, series.upper} <= logged
            covered |= {series.value, series.lower, series.upper}
    assert covered == logged  # every logged quantity has a chart
    titles = {c.title for c in category.chart}
    assert "sharpness λ_max and its stability threshold" in titles


# --------------------------------------------------------------------------------------------
# failing soft at run time, loud at set-up
# --------------------------------------------------------------------------------------------


def _disable_warnings(record):
    return [w for w in record if "disabled itself" in str(w.message)]


def test_an_op_without_double_backward_falls_back_to_finite_differences(tmp_path):
    snap = Snapshot()
    monitor = exact_monitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = fit(tmp_path, [monitor, snap], tiny_module(once_differentiable_op=True), max_steps=3)
    (fallback,) = [w for w in record if issubclass(w.category, CurvatureFallbackWarning)]
    message = str(fallback.message)
    assert "finite differences" in message and "Square" in message
    assert "once_differentiable" in message
    assert not _disable_warnings(record) and monitor.disabled_reason is None
    (event,) = monitor.events
    assert (event["reason"], event["why"], event["step"]) == (
        "finite_difference",
        "no_exact_route",
        0,
    )
    assert t.global_step == 3 and monitor.state_dict()["route"] == "finite_difference"
    logged = scalars(tmp_path)
    assert [s for s, _ in logged[KEY + "trace"]] == [0, 1, 2]
    for step in (0, 1, 2):
        h = exact_hessian(*snap.at[step][:2], square=True)
        # float32 central differences: within 1e-3 of the float64 reference, relative to ‖H‖_F
        scale = torch.linalg.matrix_norm(h).item()
        trace, lam = values(logged, "trace")[step], values(logged, "lambda_max")[step]
        assert abs(trace - torch.trace(h).item()) <= 1e-3 * scale, (trace, scale)
        assert abs(lam - torch.linalg.eigvalsh(h)[-1].item()) <= 1e-3 * scale, (lam, scale)


def test_an_explicit_exact_route_that_fails_disables_the_monitor_and_training_goes_on(tmp_path):
    monitor = HessianMonitor(every_n_steps=1, route="double_backward", verbose=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = fit(tmp_path, monitor, tiny_module(once_differentiable_op=True), max_steps=4)
    (warning,) = _disable_warnings(record)
    assert issubclass(warning.category, RuntimeWarning)
    assert "once_differentiable" in str(warning.message) and "Square" in str(warning.message)
    assert t.global_step == 4 and monitor.disabled_reason is not None
    assert monitor.history == [] and not any(k.startswith(KEY) for k in scalars(tmp_path))


def test_a_nan_loss_disables_the_monitor_and_training_goes_on(tmp_path):
    monitor = HessianMonitor(every_n_steps=1, loss_fn=lambda m, b: m(b[0]).sum() * math.nan)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = fit(tmp_path, monitor, max_steps=3)
    (warning,) = _disable_warnings(record)
    assert "the loss is nan at step 0" in str(warning.message)
    assert t.global_step == 3 and monitor.num_measurements == 0


def test_an_unusable_training_step_output_fails_soft_naming_loss_fn(tmp_path):
    monitor = HessianMonitor(every_n_steps=1, loss_fn=lambda m, b: {"logits": m(b[0])})
    with pytest.warns(RuntimeWarning, match="dict with 'loss'.*loss_fn="):
        fit(tmp_path, monitor, max_steps=2)


class _FakeTrainer:
    """Just what ``setup`` reads: the strategy is the thing under test."""

    def __init__(self, strategy):
        self.strategy, self.loggers, self.is_global_zero = strategy, [object()], True


def _fake_trainer(strategy):
    return _FakeTrainer(strategy)


@pytest.mark.parametrize("package", PACKAGES)
def test_sharded_strategies_are_refused_at_setup(package):
    pl = lightning(package)
    monitor = HessianMonitor()
    with pytest.raises(ConfigurationError, match=r"FSDPStrategy shards them.*strategy='ddp'"):
        monitor.setup(_fake_trainer(pl.strategies.FSDPStrategy()), tiny_module(package), "fit")

    class DeepSpeedStrategy(pl.strategies.SingleDeviceStrategy):  # deepspeed is not installed
        pass

    fake = DeepSpeedStrategy(device=torch.device("cpu"))
    with pytest.raises(ConfigurationError, match="DeepSpeedStrategy"):
        monitor.setup(_fake_trainer(fake), tiny_module(package), "fit")
    monitor.setup(
        _fake_trainer(pl.strategies.SingleDeviceStrategy("cpu")), tiny_module(package), "fit"
    )


def test_sync_batchnorm_is_refused_under_ddp():
    module = tiny_module()
    module.net[1] = nn.SyncBatchNorm(4)
    fake = _FakeTrainer(lightning().strategies.SingleDeviceStrategy("cpu"))
    HessianMonitor().setup(fake, module, "fit")  # one process: plain BatchNorm behaviour
    fake.world_size = 2
    with pytest.raises(ConfigurationError, match="SyncBatchNorm"):
        HessianMonitor().setup(fake, module, "fit")


def test_manual_optimization_needs_a_loss_fn(tmp_path):
    with pytest.raises(ConfigurationError, match=r"manual optimization.*loss_fn="):
        fit(tmp_path, HessianMonitor(every_n_steps=1), tiny_module(manual=True), max_steps=1)
    monitor = HessianMonitor(
        every_n_steps=1, trace=False, loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1])
    )
    fit(tmp_path / "fn", monitor, tiny_module(manual=True), max_steps=2)
    assert monitor.num_measurements == 2


def test_optimizer_index_out_of_range_fails_at_train_start(tmp_path):
    with pytest.raises(ConfigurationError, match=r"optimizer_index=1.*1 optimizer"):
        fit(tmp_path, HessianMonitor(optimizer_index=1), max_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 5, "budget": 0.1}, "either `every_n_steps` or `budget`"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"budget": 0.0}, r"budget.*\(0, 1\)"),
        ({"budget": 1.0}, r"budget.*\(0, 1\)"),
        ({"num_probes": 0}, "num_probes"),
        (
            {"num_probes": 2, "estimator": "hutchpp"},
            "Hutch\\+\\+ needs `num_probes` >= 3.*estimator='hutchinson'",
        ),
        ({"estimator": "lanczos"}, "estimator"),
        ({"trace": False, "sharpness": False}, "Nothing to measure"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": 0.0}, "tol"),
        ({"cold_start_every": 0}, "cold_start_every"),
        ({"optimizer_index": -1}, "optimizer_index"),
        ({"route": "finite_differences"}, "route"),
        ({"loss_fn": "mse"}, "loss_fn"),
        ({"clock": 3.0}, "clock"),
        ({"prefix": ""}, "prefix"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        HessianMonitor(**kwargs)


def test_defaults_use_the_budget():
    monitor = HessianMonitor()
    assert monitor.budget == 0.05 and monitor.every_n_steps is None
    assert monitor.estimator == "hutchinson" and HessianMonitor(num_probes=1).num_probes == 1


def test_lanczos_convergence_and_residual_are_logged_and_bound_the_exact_spectrum(tmp_path):
    # 40 steps on 21 parameters converge; 2 steps do not, and the residual ‖Hx − λx‖ still
    # bounds the distance from the logged λ to an exact eigenvalue (the dense Hessian's)
    for max_iter, converged in ((40, 1.0), (2, 0.0)):
        snap = Snapshot()
        monitor = exact_monitor(every_n_steps=1, max_iter=max_iter, trace=False)
        fit(tmp_path / str(max_iter), [monitor, snap], max_steps=2)
        logged = scalars(tmp_path / str(max_iter))
        for step in (0, 1):
            assert values(logged, "lambda_max_converged")[step] == converged
            lam, residual = (values(logged, q)[step] for q in ("lambda_max", "lambda_max_residual"))
            exact = torch.linalg.eigvalsh(exact_hessian(*snap.at[step][:2]))
            assert (exact - lam).abs().min().item() <= residual * (1 + 1e-4) + 1e-6
            assert lam <= exact[-1].item() * (1 + 1e-5) + 1e-6  # a Ritz value is below λ_max
            if converged:
                assert residual <= 1e-6 * abs(lam) + 1e-9
