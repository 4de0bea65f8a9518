"""HessianMonitor under a memory limit: short real Trainer runs with an injected memory meter.

CI has no GPU, so the device is a fake :class:`MemoryMeter` whose passes cost known bytes and
which runs out of memory where a test says; the products are the real ones.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dynlens import ConfigurationError
from dynlens.callbacks.hessian import HessianMonitor
from dynlens.curvature import CurvatureFallbackWarning, MemoryMeter
from tests.callbacks.test_hessian_monitor import (
    KEY,
    Snapshot,
    exact_hessian,
    exact_monitor,
    fit,
    loader,
    scalars,
    tiny_module,
    values,
)


class FakeDevice(MemoryMeter):
    """Holds ``base`` bytes; a training step (or the stand-in gradient) peaks at ``train_peak``;
    a pass of k probes peaks at base + per·k; calls for which ``oom(call)`` is true run out."""

    def __init__(self, *, base=10**9, train_peak=15 * 10**8, per=10**8, oom=lambda call: False):
        self.base, self.train_peak, self.per, self.oom = base, train_peak, per, oom
        self.resets = 0
        self.passes: list[int] = []
        self.peaks: list[int] = []

    def in_use(self):
        return self.base

    def reset_peak(self):
        self.resets += 1

    def peak(self):
        return self.train_peak

    def measure(self, fn, probes):
        call = len(self.passes)
        self.passes.append(probes)
        if self.oom(call):
            raise torch.OutOfMemoryError("fake: CUDA out of memory")
        out = fn()
        self.peaks.append(self.base + self.per * probes)
        return out, self.peaks[-1]


def _check_exact(logged, snap, steps, tolerance=1e-4):
    for step in steps:
        h = exact_hessian(*snap.at[step][:2])
        scale = torch.linalg.matrix_norm(h).item()
        assert abs(values(logged, "trace")[step] - torch.trace(h).item()) <= tolerance * scale
        lam = torch.linalg.eigvalsh(h)[-1].item()
        assert abs(values(logged, "lambda_max")[step] - lam) <= tolerance * scale


def test_auto_limit_is_twice_the_training_peak_and_no_pass_exceeds_it(tmp_path):
    device = FakeDevice(per=2 * 10**8)
    snap = Snapshot()
    monitor = exact_monitor(memory_meter=device)
    fit(tmp_path, [monitor, snap], max_steps=5)
    logged = scalars(tmp_path)
    assert [s for s, _ in logged[KEY + "trace"]] == [0, 2, 4]
    _check_exact(logged, snap, [0, 2, 4])
    # step 0 metered a gradient of the loss (the stand-in), steps 0 and 1 were metered training
    assert monitor._limit.limit == 2 * 15 * 10**8
    state = monitor.state_dict()
    assert (state["train_peak"], state["metered_steps"]) == (15 * 10**8, 2)
    # a pass of k probes costs 0.2·k GB over 1 GB in use: at most ⌊0.9·2/0.2⌋ = 9 per pass
    assert max(device.peaks) <= 3 * 10**9 and max(device.passes) == 9
    assert device.passes[:2] == [1, 1]  # the graph, then one probe while nothing was known
    assert KEY + "product_error" not in logged  # exact products: nothing to estimate


def test_products_that_do_not_fit_fall_back_to_finite_differences(tmp_path):
    device = FakeDevice(oom=lambda call: call == 0)  # the exact route's graph runs out
    snap = Snapshot()
    monitor = exact_monitor(every_n_steps=1, memory_meter=device)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = fit(tmp_path, [monitor, snap], max_steps=2)
    (fallback,) = [w for w in record if issubclass(w.category, CurvatureFallbackWarning)]
    assert "do not fit in memory" in str(fallback.message)
    assert [(e["reason"], e["why"]) for e in monitor.events] == [("finite_difference", "memory")]
    assert monitor.disabled_reason is None and t.global_step == 2
    assert monitor.state_dict()["route"] == "finite_difference"
    logged = scalars(tmp_path)
    _check_exact(logged, snap, [0, 1], tolerance=1e-3)
    # each measurement logs the self-check's estimate of the products' error
    assert sorted(values(logged, "product_error")) == [0, 1]
    assert all(0 < e < 1e-3 for e in values(logged, "product_error").values())


def test_out_of_memory_on_every_route_disables_the_monitor_and_training_goes_on(tmp_path):
    device = FakeDevice(oom=lambda call: True)
    monitor = HessianMonitor(every_n_steps=1, num_probes=3, memory_meter=device, verbose=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = fit(tmp_path, monitor, max_steps=3)
    (disabled,) = [w for w in record if "disabled itself" in str(w.message)]
    assert "out of memory at one Hessian-vector product" in str(disabled.message)
    assert "'finite_difference'" in str(disabled.message)
    assert t.global_step == 3 and monitor.history == []
    assert not any(k.startswith(KEY) for k in scalars(tmp_path))


def test_an_absolute_limit_needs_no_training_peak(tmp_path):
    device = FakeDevice()
    monitor = HessianMonitor(
        every_n_steps=2,
        num_probes=12,
        max_iter=4,
        memory=15 * 10**8,
        memory_meter=device,
        verbose=False,
    )
    fit(tmp_path, monitor, max_steps=3)
    assert monitor._limit.limit == 15 * 10**8 and monitor.state_dict()["metered_steps"] == 0
    assert device.resets == 0  # training is never metered
    # ⌊0.9·0.5/0.1⌋ = 4 probes per pass at most
    assert max(device.passes) == 4 and max(device.peaks) <= 15 * 10**8


def test_no_limit_meters_nothing(tmp_path):
    device = FakeDevice()
    monitor = HessianMonitor(
        every_n_steps=1, num_probes=3, max_iter=3, memory=None, memory_meter=device, verbose=False
    )
    fit(tmp_path, monitor, max_steps=2)
    assert device.passes == [] and device.resets == 0 and monitor.num_measurements == 2


def test_the_memory_plan_survives_resume():
    device = FakeDevice()
    monitor = HessianMonitor(memory_meter=device, verbose=False)
    monitor._train_peak, monitor._metered_steps = 15 * 10**8, 2
    limit = monitor._memory_limit(torch.device("cpu"))
    limit.record("double_backward", 1, 10**9, 11 * 10**8)
    limit.failed("double_backward", 8)
    restored = HessianMonitor(memory_meter=device, verbose=False)
    restored.load_state_dict(monitor.state_dict())
    assert (restored._train_peak, restored._metered_steps) == (15 * 10**8, 2)
    again = restored._memory_limit(torch.device("cpu"))
    assert again.meter is device and again.limit == 3 * 10**9
    assert again.probes_per_pass("double_backward", 20) == 4  # the cap after the OOM at 8


@pytest.mark.parametrize("memory", [0, -5, True, "big", 1.5])
def test_bad_memory_arguments_fail_at_construction(memory):
    with pytest.raises(ConfigurationError, match=r"`memory` to be 'auto'.*bytes.*None"):
        HessianMonitor(memory=memory)


def test_a_bad_memory_meter_fails_at_construction():
    with pytest.raises(ConfigurationError, match="MemoryMeter"):
        HessianMonitor(memory_meter=object())  # type: ignore[arg-type]


def test_finite_difference_fallback_on_the_once_differentiable_op_keeps_the_default_limit(
    tmp_path,
):
    device = FakeDevice()
    monitor = HessianMonitor(every_n_steps=1, num_probes=3, max_iter=3, memory_meter=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureFallbackWarning)
        fit(tmp_path, monitor, tiny_module(once_differentiable_op=True), max_steps=2)
    assert monitor.num_measurements == 2 and max(device.peaks) <= monitor._limit.limit
    assert "finite_difference" in monitor._limit.state_dict()["passes"]


def relu_module():
    """A ReLU MLP on a classification batch: in float32 the finite-difference step crosses kinks."""
    import pytorch_lightning as pl

    class Relu(pl.LightningModule):
        def __init__(self):
            super().__init__()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.net = torch.nn.Sequential(
                    torch.nn.Linear(3, 64),
                    torch.nn.ReLU(),
                    torch.nn.Linear(64, 64),
                    torch.nn.ReLU(),
                    torch.nn.Linear(64, 1),
                )

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Relu()


def test_finite_differences_across_kinks_switch_the_monitor_off_instead_of_logging(tmp_path):
    monitor = HessianMonitor(
        every_n_steps=1, num_probes=3, max_iter=3, route="finite_difference", verbose=False
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = fit(tmp_path, monitor, relu_module(), max_steps=3, dl=loader(256))
    (disabled,) = [w for w in record if "disabled itself" in str(w.message)]
    assert "not smooth at the scale of their step" in str(disabled.message)
    assert t.global_step == 3 and monitor.history == []
    assert not any(k.startswith(KEY + "trace") for k in scalars(tmp_path))
