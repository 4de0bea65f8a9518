"""HessianMonitor(density=True): the spectrum and its top eigenvalues against the exact Hessian."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import dynlens.callbacks.hessian_measure as hessian_measure
from dynlens import ConfigurationError, curvature
from dynlens.callbacks.hessian import HessianMonitor
from dynlens.callbacks.replay import probe_generator
from dynlens.report.server import TensorBoardServer
from tests.callbacks.test_hessian_monitor import (
    KEY,
    FakeClock,
    Snapshot,
    _train_for_identity,
    clocked_loss_fn,
    clocked_module,
    exact_hessian,
    fit,
    loader,
    scalars,
    tiny_module,
    values,
)
from tests.helpers import custom_scalars_layout, event_accumulator, trainer

N = 21  # parameters of the 3 → 4 → 1 network


def density_monitor(**kw) -> HessianMonitor:
    # 30 ≥ n Lanczos steps span the whole Krylov space: the quadrature is exact
    return HessianMonitor(
        **{
            "every_n_steps": 1,
            "trace": False,
            "sharpness": False,
            "density": True,
            "density_iter": 30,
            "verbose": False,
            **kw,
        }
    )


def exact_quadrature(h: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The measure vᵀδ(t − H)v / n of the exact H: its eigenvalues and the weights
    (uᵢᵀv)²/n that a Lanczos run from v/√n converges to, eigenvalues within 1e-9 merged."""
    evals, evecs = torch.linalg.eigh(h)
    w = (evecs.T @ v) ** 2 / v.numel()
    return evals, w


def test_spectrum_and_top_eigenvalues_match_the_exact_hessian(tmp_path):
    monitor = density_monitor(density_top_k=4)
    snap = Snapshot()
    fit(tmp_path, [monitor, snap], max_steps=2)
    net, batch, _ = snap.at[1]
    h = exact_hessian(net, batch)
    evals = torch.linalg.eigvalsh(h)
    logged = scalars(tmp_path)
    # the top eigenvalues, descending, at the measured step (float32 products)
    scale = evals.abs().max().item()
    for i in range(4):
        top = values(logged, f"spectrum_top/{i + 1}")[1]
        assert top == pytest.approx(evals[-1 - i].item(), abs=1e-4 * scale), i
    # the histogram: the Ritz values of the start v = the first Rademacher draw of the step's
    # probe generator, weighted n·(uᵢᵀv)²/n: counts sum to n, and its sum and sum of squares
    # are the quadrature's moments n·Σ w λ = vᵀHv and vᵀH²v, exactly (k ≤ 2m − 1)
    v = (2 * torch.randint(0, 2, (N,), generator=probe_generator(0, 0, 1)) - 1).double()
    (spectrum,) = [
        e for e in event_accumulator(tmp_path).Histograms(KEY + "spectrum") if e.step == 1
    ]
    histo = spectrum.histogram_value
    assert histo.num == N
    assert sum(histo.bucket) == pytest.approx(N, rel=1e-9)
    assert histo.sum == pytest.approx((v @ h @ v).item(), rel=1e-4)
    assert histo.sum_squares == pytest.approx((v @ h @ h @ v).item(), rel=1e-4)
    # each exact eigenvalue away from the null cluster carries its weight (uᵢᵀv)² in the
    # histogram's buckets within 1e-4·‖H‖ of it
    exact_at, exact_w = exact_quadrature(h, v)
    right = torch.tensor(histo.bucket_limit, dtype=torch.float64)
    counts = torch.tensor(histo.bucket, dtype=torch.float64)
    outside_null = exact_at.abs() > 1e-3 * scale
    assert int(outside_null.sum()) >= 6
    for at, w in zip(exact_at[outside_null], exact_w[outside_null], strict=True):
        near = (right - at).abs() <= 1e-4 * scale
        assert counts[near].sum().item() == pytest.approx(N * w.item(), abs=1e-4), at
    # the histogram is what the monitor pooled: its nodes and weights, weights summing to 1
    last = monitor.last_spectrum
    assert last["step"] == 1 and sum(last["weights"]) == pytest.approx(1.0, rel=1e-9)
    assert last["counts"] == pytest.approx(list(histo.bucket), rel=1e-6)
    assert last["edges"][-1] == pytest.approx(histo.max) and last["edges"][0] == pytest.approx(
        histo.min
    )
    assert histo.max == pytest.approx(evals[-1].item(), rel=1e-4)
    # one chart for the top eigenvalues
    charts = {
        chart.title: list(chart.multiline.tag)
        for category in custom_scalars_layout(tmp_path).category
        for chart in category.chart
    }
    assert charts["top eigenvalues λ_1 … λ_k (Lanczos quadrature)"] == [f"^{KEY}spectrum_top/"]


def test_spectrum_histogram_buckets_point_masses():
    nodes = torch.tensor([2.0, -1.0, 2.0 + 1e-9, 5.0], dtype=torch.float64)
    weights = torch.tensor([0.25, 0.5, 0.125, 0.125], dtype=torch.float64)
    edges, counts = curvature.spectrum_histogram(nodes, weights, 8)
    # 2 and 2 + 1e-9 merged (within 1e-6 of the span 6) at their weighted mean; δ = 6e-3
    at = 2.0 + 1e-9 / 3
    assert edges.tolist() == pytest.approx([-1.006, -1.0, at - 0.006, at, 4.994, 5.0])
    assert counts.tolist() == [4.0, 0.0, 3.0, 0.0, 1.0]
    # one node: one bucket; δ from its magnitude
    edges, counts = curvature.spectrum_histogram(torch.tensor([3.0]), torch.tensor([1.0]), 5)
    assert edges.tolist() == pytest.approx([2.997, 3.0]) and counts.tolist() == [5.0]
    # a gap narrower than δ: δ is half of it, so buckets never overlap
    edges, _ = curvature.spectrum_histogram(
        torch.tensor([0.0, 1e-3, 10.0]), torch.tensor([0.5, 0.25, 0.25]), 4
    )
    assert torch.all(edges.diff() > 0) and edges[2].item() == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="as many weights as nodes"):
        curvature.spectrum_histogram(torch.tensor([1.0, 2.0]), torch.tensor([1.0]), 2)


def test_histogram_is_served_by_a_real_tensorboard(tmp_path):
    logdir = tmp_path / "logs"
    monitor = density_monitor(every_n_steps=2)
    fit(logdir / "run", monitor, max_steps=4)
    with TensorBoardServer(logdir, timeout=45.0) as server:
        tags = server.get("/data/plugin/histograms/tags")
        assert KEY + "spectrum" in tags["run"]
        served = server.get("/data/plugin/histograms/histograms", run="run", tag=KEY + "spectrum")
    assert [step for _, step, _ in served] == [0, 2]
    for (_, _, buckets), last in zip(served, [None, monitor.last_spectrum], strict=True):
        # [left, right, count] per bucket, counts summing to n; each mass ends at a Ritz value
        assert sum(count for _, _, count in buckets) == pytest.approx(N, rel=1e-5)
        assert all(left <= right for left, right, _ in buckets)
        if last is not None:
            assert [c for _, _, c in buckets] == pytest.approx(last["counts"], rel=1e-5)
            assert [r for _, r, _ in buckets] == pytest.approx(last["edges"][1:], rel=1e-5)


def test_density_leaves_the_other_measurements_and_the_weights_unchanged(tmp_path):
    plain = HessianMonitor(every_n_steps=1, num_probes=4, max_iter=5, verbose=False)
    dense = HessianMonitor(
        every_n_steps=1, num_probes=4, max_iter=5, density=True, density_iter=8, prefix="dense"
    )
    fit(tmp_path, [plain, dense], max_steps=3)
    assert plain.num_measurements == dense.num_measurements == 3
    for quantity in ("trace", "lambda_max"):
        assert [h[quantity] for h in plain.history] == [h[quantity] for h in dense.history]
    assert all("spectrum_top/1" in h for h in dense.history)
    # and the trained weights are bit-identical to a run without any monitor
    monitor = density_monitor(density_iter=6)
    watched, _, _ = _train_for_identity(tmp_path / "with", [monitor])
    bare, _, _ = _train_for_identity(tmp_path / "without", [])
    assert monitor.num_measurements == 30 and monitor.disabled_reason is None
    for (name, a), (_, b) in zip(
        watched.state_dict().items(), bare.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_density_is_paid_from_the_same_budget(tmp_path, monkeypatch):
    clock = FakeClock()
    density = curvature.spectral_density

    def dear_density(*args, **kwargs):
        clock.now += 2.0  # the quadrature costs as much as the rest of the measurement
        return density(*args, **kwargs)

    monkeypatch.setattr(hessian_measure.curvature, "spectral_density", dear_density)
    monitor = HessianMonitor(
        budget=0.25,
        loss_fn=clocked_loss_fn(clock),
        clock=clock,
        trace=False,
        density=True,
        density_iter=5,
        verbose=False,
    )
    fit(tmp_path, monitor, clocked_module(clock), max_steps=60)
    # 4 s per measurement (2 s replay + 2 s density) against 1 s steps at 25%: step 1 calibrates,
    # (4 + 4)/0.25 − 1 = 31 steps on is step 32, then every 4/0.25 = 16 steps (without the
    # density: 16, 24, 32, … as in test_hessian_monitor's fake-clock test)
    assert [int(h["step"]) for h in monitor.history] == [0, 32, 48]
    assert values(scalars(tmp_path), "overhead") == pytest.approx({32: 0.25, 48: 0.25})


def test_a_failing_density_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no quadrature today")

    monkeypatch.setattr(hessian_measure.curvature, "spectral_density", broken)
    monitor = density_monitor(sharpness=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(tmp_path, monitor, max_steps=3)
    disabled = [w for w in caught if "disabled itself" in str(w.message)]
    assert len(disabled) == 1 and "no quadrature today" in str(disabled[0].message)
    assert t.global_step == 3 and monitor.num_measurements == 0


def test_density_without_tensorboard_logs_the_top_eigenvalues(tmp_path):
    monitor = density_monitor(density_top_k=2)
    run = trainer(max_steps=1, logger=False, callbacks=[monitor])
    run.fit(tiny_module(), loader())
    assert set(monitor.latest) >= {"spectrum_top/1", "spectrum_top/2"}
    assert monitor.latest["spectrum_top/1"] >= monitor.latest["spectrum_top/2"]
    top = monitor.latest["spectrum_top/1"]
    assert float(run.callback_metrics[KEY + "spectrum_top/1"]) == pytest.approx(top, rel=1e-6)
    assert monitor.last_spectrum is not None and monitor.last_spectrum["step"] == 0


def test_a_resumed_run_measures_the_spectrum_as_an_uninterrupted_one(tmp_path):
    whole = density_monitor(every_n_steps=2, density_iter=6)
    fit(tmp_path / "whole", whole, max_steps=8)
    first = density_monitor(every_n_steps=2, density_iter=6)
    t = fit(tmp_path / "first", first, max_steps=4)
    t.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = density_monitor(every_n_steps=2, density_iter=6)
    trainer(max_steps=8, logger=False, callbacks=[resumed]).fit(
        tiny_module(), loader(), ckpt_path=tmp_path / "mid.ckpt"
    )
    assert [h["step"] for h in resumed.history] == [0.0, 2.0, 4.0, 6.0]
    for i in range(1, 6):
        key = f"spectrum_top/{i}"
        assert [h[key] for h in resumed.history] == pytest.approx(
            [h[key] for h in whole.history], rel=1e-5
        )
    assert resumed.last_spectrum["step"] == 6
    assert resumed.last_spectrum["nodes"] == pytest.approx(whole.last_spectrum["nodes"], rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": "yes"}, "`density` to be True or False"),
        ({"density": True, "density_iter": 0}, "`density_iter` to be a positive int"),
        ({"density": True, "density_runs": 1.5}, "`density_runs` to be a positive int"),
        ({"density": True, "density_top_k": -1}, "`density_top_k` to be a positive int"),
        ({"trace": False, "sharpness": False}, "`density` are all False"),
    ],
)
def test_bad_density_arguments_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        HessianMonitor(**kwargs)


def test_density_alone_is_something_to_measure():
    monitor = HessianMonitor(trace=False, sharpness=False, density=True)
    assert monitor.density and math.isclose(monitor.budget, 0.05)
