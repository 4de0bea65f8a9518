"""Micro-batched Hessian-vector products: exact on every route, and planned under a memory limit.

H of a batch-mean loss = Σ_i (|B_i|/N) H_i: the products micro-batch by micro-batch are checked
against the dense Hessian of the whole batch; the plan (samples per micro-batch) against a fake
device whose passes cost a known number of bytes per sample of the largest forward they ran.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dynlens.curvature import (
    CurvatureMemoryError,
    HessianOperator,
    MemoryLimit,
    MicroBatchLoss,
    RssMemoryMeter,
    hutchinson_trace,
    top_eigenvalue,
)

from .test_memory import FakeDevice, dense_hessian, probes

D = torch.float64
EXACT_ROUTES = (
    "double_backward",
    "batched_double_backward",
    "forward_over_reverse",
    "vmap_forward_over_reverse",
)


class Rows:
    """Counts the samples of the largest forward since the last reset (a pass's memory)."""

    def __init__(self) -> None:
        self.largest = 0

    def reset(self) -> None:
        self.largest = 0


def mlp_batch(samples: int = 13, seed: int = 0, rows: Rows | None = None):
    """A tanh MLP's mean cross-entropy over ``samples`` samples, as a MicroBatchLoss."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D) / 2)
    x = torch.randn(samples, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (samples,), generator=g)

    def loss_of_rows(p: dict[str, Tensor], start: int, stop: int) -> Tensor:
        if rows is not None:
            rows.largest = max(rows.largest, stop - start)
        return F.cross_entropy(functional_call(model, p, (x[start:stop],)), y[start:stop])

    params = {k: v.detach() for k, v in model.named_parameters()}
    return MicroBatchLoss(loss_of_rows, samples), params


def test_the_chunks_partition_the_batch_with_weights_summing_to_one():
    loss, params = mlp_batch(13)
    chunks = loss.chunks(5)
    assert [w for w, _ in chunks] == [5 / 13, 5 / 13, 3 / 13]
    total = sum(w * fn(params) for w, fn in chunks)
    torch.testing.assert_close(total, loss(params), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="positive"):
        loss.chunks(0)
    with pytest.raises(ValueError, match="positive int"):
        MicroBatchLoss(lambda p, a, b: p["w"].sum(), 0)


@pytest.mark.parametrize("route", EXACT_ROUTES)
@pytest.mark.parametrize("size", [1, 4, 13])
def test_micro_batched_products_equal_the_dense_hessian_of_the_batch(route: str, size: int):
    loss, params = mlp_batch(13)
    h = dense_hessian(loss, params)
    v = probes(3, h.shape[0])
    op = HessianOperator(loss, params, route=route, samples_per_chunk=size)  # type: ignore[arg-type]
    assert op._chunked() == (size < 13)
    torch.testing.assert_close(op @ v, v @ h, rtol=0, atol=1e-12)
    torch.testing.assert_close(op @ v[0], h @ v[0], rtol=0, atol=1e-12)  # and again: no graph kept
    if size < 13:
        assert op._graph is None  # each micro-batch's graph was freed


def test_micro_batched_finite_differences_equal_the_whole_batch_ones():
    loss, params = mlp_batch(13)
    h = dense_hessian(loss, params)
    v = probes(2, h.shape[0])
    whole = HessianOperator(loss, params, route="finite_difference") @ v
    chunked = HessianOperator(loss, params, route="finite_difference", samples_per_chunk=3) @ v
    # the same differences, summed in another order: equal up to rounding divided by 2ε
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-9)
    torch.testing.assert_close(chunked, v @ h, rtol=1e-6, atol=1e-8)


def test_samples_per_chunk_needs_a_micro_batch_loss():
    loss, params = mlp_batch(13)
    with pytest.raises(ValueError, match="MicroBatchLoss"):
        HessianOperator(lambda p: loss(p), params, samples_per_chunk=4)
    with pytest.raises(ValueError, match="positive int"):
        HessianOperator(loss, params, samples_per_chunk=0)


class PerSampleDevice(FakeDevice):
    """A device holding ``base`` bytes on which a pass peaks at base + per_sample · (samples of
    its largest forward) + per_probe · probes; ``passes`` holds (samples, probes) of each. A
    pass whose forwards exceed ``capacity`` samples runs out of memory, as a smaller device than
    the limit says would."""

    def __init__(self, rows: Rows, *, per_sample=10, per_probe=5, capacity=None):
        super().__init__(base=1000)
        self.rows, self.per_sample, self.per_probe = rows, per_sample, per_probe
        self.capacity = capacity

    def measure(self, fn, probes):
        self.rows.reset()
        out = fn()
        self.passes.append((self.rows.largest, probes))
        if self.capacity is not None and self.rows.largest > self.capacity:
            raise torch.OutOfMemoryError("fake: CUDA out of memory")
        self.peaks.append(self.base + self.per_sample * self.rows.largest + self.per_probe * probes)
        return out, self.peaks[-1]


def planned_problem(k: int, device_class=None, **device_kw):
    """The 16-sample MLP, its dense Hessian, k probes and a device counting its samples."""
    rows = Rows()
    loss, params = mlp_batch(16, rows=rows)
    h = dense_hessian(loss, params)
    device = (device_class or PerSampleDevice)(rows, **device_kw)
    return loss, params, h, probes(k, h.shape[0]), device


def test_the_plan_sizes_micro_batches_from_trials_that_double_while_they_fit():
    loss, params, h, v, device = planned_problem(2)
    memory = MemoryLimit(1100, meter=device)  # 100 bytes of headroom, 90 planned
    op = HessianOperator(loss, params, route="double_backward", memory=memory)
    torch.testing.assert_close(op @ v, v @ h, rtol=0, atol=1e-12)
    # a first pass of one sample (not read), then 1, 2, 4, 8 samples (15, 25, 45, 85 bytes),
    # each where twice the last reading fits in 90; 16 would not (2·85): micro-batches of 8
    assert device.passes[:6] == [(1, 1), (1, 1), (2, 1), (4, 1), (8, 1), (8, 1)]
    assert op.samples_per_chunk == 8
    assert max(device.peaks) <= memory.limit
    op2 = HessianOperator(loss, params, route="double_backward", memory=memory)
    torch.testing.assert_close(op2 @ v[0], h @ v[0], rtol=0, atol=1e-12)
    assert op2.samples_per_chunk == 8 and max(device.peaks) <= memory.limit
    assert (1, 1) not in device.passes[6:]  # the trials are not run again


def test_a_batch_that_fits_keeps_one_graph_for_every_product():
    loss, params, h, v, device = planned_problem(3)
    memory = MemoryLimit(10**6, meter=device)
    op = HessianOperator(loss, params, route="double_backward", memory=memory)
    torch.testing.assert_close(op @ v, v @ h, rtol=0, atol=1e-12)
    assert op.samples_per_chunk is None and op._graph is not None
    # the trials up to the whole batch, its graph once, then passes through it
    assert device.passes[:7] == [(1, 1), (1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (16, 1)]
    assert device.passes[7:] == [(0, 1), (0, 2)]


def test_when_not_even_one_sample_fits_the_measurement_is_refused_before_it_runs():
    loss, params, _, _, device = planned_problem(1, per_sample=100)
    memory = MemoryLimit(1090, meter=device)  # 81 planned; the trial of one sample takes 105
    op = HessianOperator(loss, params, route="double_backward", memory=memory)
    with pytest.raises(CurvatureMemoryError, match="one sample on the"):
        op @ probes(1, op.numel)
    assert device.passes == [(1, 1), (1, 1)]  # the trials only


@pytest.mark.parametrize("limit", [150, 10**6])
def test_a_batch_that_cannot_be_split_is_sliced_only_to_plan_the_whole(limit: int):
    loss, params, h, v, device = planned_problem(2)
    coupled = MicroBatchLoss(loss.loss_of_rows, 16, exact=False, why_not="BatchNorm, say")
    op = HessianOperator(
        coupled, params, route="double_backward", memory=MemoryLimit(1000 + limit, meter=device)
    )
    if limit == 150:  # trials of 2, 4, 8 samples (85 bytes): 16 would take 170 of 135
        with pytest.raises(CurvatureMemoryError, match=r"one batch .*cannot be split: BatchNorm"):
            op @ v
        assert device.passes == [(2, 1), (2, 1), (4, 1), (8, 1)]
        assert op._graph is None  # nothing built whole
        return
    torch.testing.assert_close(op @ v, v @ h, rtol=0, atol=1e-12)
    assert device.passes[:6] == [(2, 1), (2, 1), (4, 1), (8, 1), (16, 1), (16, 1)]
    assert op.samples_per_chunk is None
    with pytest.raises(ValueError, match="MicroBatchLoss"):
        HessianOperator(coupled, params, samples_per_chunk=4)


def test_estimators_take_a_micro_batch_loss_unchanged():
    loss, params = mlp_batch(12)
    h = dense_hessian(loss, params)
    g = torch.Generator().manual_seed(3)
    rows = Rows()
    loss_t, _ = mlp_batch(12, rows=rows)
    memory = MemoryLimit(1000 + 10 * 5 + 5 + 20, meter=PerSampleDevice(rows))
    est = hutchinson_trace(loss_t, params, num_probes=400, generator=g, memory=memory)
    assert abs(est.value - float(torch.trace(h))) < 4 * est.stderr + 1e-9
    eig = top_eigenvalue(loss_t, params, max_iter=60, tol=1e-10, memory=memory)
    assert eig.value == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-8)


class FillingDevice(PerSampleDevice):
    """As PerSampleDevice, but 12 more bytes are in use after every pass (a Lanczos basis
    growing beside the products), and each pass peaks over what is in use when it runs."""

    def in_use(self) -> int:
        return self.base + 12 * len(self.passes)

    def measure(self, fn, probes):
        held = self.in_use()
        out, peak = super().measure(fn, probes)
        self.peaks[-1] = peak = peak - self.base + held
        return out, peak


def test_micro_batches_shrink_when_what_the_measurement_holds_grows():
    loss, params, h, v, device = planned_problem(6, FillingDevice)
    memory = MemoryLimit(1150, meter=device)
    op = HessianOperator(loss, params, route="double_backward", memory=memory)
    torch.testing.assert_close(op @ v, v @ h, rtol=0, atol=1e-12)
    sizes = [samples for samples, _ in device.passes]
    # the trials (1, 1, 2, 4, 8 samples), then micro-batches of 7 (8 · 10.6 B would not fit
    # beside the 60 bytes the trials left), then fewer as the headroom falls by 12 a pass
    assert sizes[:6] == [1, 1, 2, 4, 8, 7] and sizes[5:] == sorted(sizes[5:], reverse=True)
    assert min(sizes[5:]) < 7
    assert max(device.peaks) <= memory.limit


def test_under_the_rss_meter_the_plan_keeps_a_real_measurement_within_its_limit():
    # A tanh MLP on 4,096 samples: the whole batch's graph and product take about 0.4 GiB of RSS,
    # the limit leaves 160 MiB over what is in use; the process's own RSS is the meter.
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 2048), nn.Tanh(), nn.Linear(2048, 4))
    x, y = torch.randn(4096, 64, generator=g), torch.randint(0, 4, (4096,), generator=g)

    def rows(p: dict[str, Tensor], a: int, b: int) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x[a:b],)), y[a:b])

    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = MicroBatchLoss(rows, 4096)
    v = probes(2, sum(p.numel() for p in params.values()), torch.float32)
    meter = RssMemoryMeter()
    meter.rebase()
    memory = MemoryLimit(meter.in_use() + 160 * 2**20, meter=meter)
    chunked = HessianOperator(loss, params, route="double_backward", memory=memory) @ v
    assert memory.peak_seen <= memory.limit
    sizes = {int(k.split("@")[1]) for k in memory._passes if "@" in k}
    assert sizes and max(sizes) < 4096  # micro-batches, never the whole batch
    whole = HessianOperator(loss, params, route="double_backward") @ v
    error = (chunked - whole).norm(dim=1) / whole.norm(dim=1)
    assert error.max() < 1e-5, error


def test_out_of_memory_halves_the_micro_batches_and_the_products_stay_exact():
    # the limit allows the whole batch; the device runs out above 5 samples, in the trials
    # (at 8) and again where the plan would take more
    loss, params, h, v, device = planned_problem(3, capacity=5)
    memory = MemoryLimit(10**6, meter=device)
    op = HessianOperator(loss, params, route="double_backward", memory=memory)
    torch.testing.assert_close(op @ v, v @ h, rtol=0, atol=1e-12)
    assert ("double_backward:samples", 8) in memory.out_of_memory
    assert op.samples_per_chunk is not None and op.samples_per_chunk <= 4
    assert max(samples for samples, _ in device.passes[5:]) <= 4  # after the failed trial


def test_out_of_memory_in_the_first_trial_frees_what_it_held_and_raises():
    loss, params, _, v, device = planned_problem(1, capacity=0)
    op = HessianOperator(loss, params, memory=MemoryLimit(10**6, meter=device))
    with pytest.raises(CurvatureMemoryError, match="out of memory at one Hessian-vector product"):
        op @ v
    assert op._graph is None and device.passes == [(1, 1)]
