"""Curvature at a real model size: each Hessian-vector-product route's time and peak memory
against a training step of the same model, and the monitors' cost at their defaults.

Three models, each against its own anchor (a training step: forward, backward, AdamW step), in
the same run:

* ``gpt2``: a GPT-2 causal LM built from a config (Hugging Face ``GPT2LMHeadModel`` when
  ``transformers`` is installed, else an equivalent pre-LayerNorm GPT-2 written here; each
  result line says which, and ``--plain`` asks for the one written here). ``--size cpu``
  (default): 4 layers, d = 256, 4 heads, sequence 256, batch 8, vocabulary 2,048 (3.75M
  parameters). ``--size gpt2-small``: GPT-2 small, 12 layers, d = 768, 12 heads, sequence
  1,024, batch 8, vocabulary 50,257 (124M parameters).
* ``llama``: a Llama-shaped causal LM from a ``transformers`` config (RMSNorm, rotary positions,
  SwiGLU, grouped-query attention), of the GPT-2-shaped model's size (``cpu``: 2 key-value heads
  of 8).
* ``convnet``: a residual convolutional network with BatchNorm on 32×32 RGB images (``cpu``:
  width 64, batch 64; ``gpt2-small``: width 128, batch 128).

Part 1, ``routes``: for each route of :class:`dynlens.curvature.HessianOperator`, a fresh
operator at the trained parameters is applied to ``--probes`` Rademacher probes in one call (the
vectorised routes in one pass); the time per product includes the gradient graph that the
double-backward routes build once, and the peak memory is the increment over what the process
held before (CUDA: the allocator's ``max_memory_allocated``; CPU: the peak resident set size,
``VmHWM``, with glibc told to return large blocks at once so that freed memory is not counted
twice). Both are divided by a training step's. The error is the relative error
‖Hv − Hv_exact‖ / ‖Hv_exact‖ against the double-backward products of the same probes (largest
over the probes). Each (model, route) runs in its own process, so one route's memory cannot
hide in another's. ``--samples-per-chunk s`` takes the products micro-batch by micro-batch
(:class:`dynlens.curvature.MicroBatchLoss`). The peers run as routes of their own, on the same
model, loss and batch: ``curvlinops`` (``HessianLinearOperator``; micro-batches are its data
loader) and ``pyhessian`` (the whole batch; it sets eval mode, so the Transformers run without
dropout for every route). They are benchmark-only dependencies; a plain ``pip install`` of
curvlinops pulls a CUDA torch through ``backpack-for-pytorch``'s torchvision requirement, so
install them beside the CPU torch with ``pip install --no-deps curvlinops-for-pytorch
backpack-for-pytorch einconv unfoldNd linear_operator pyhessian`` (plus ``einops opt-einsum``).
A peer that is absent or fails is reported as failed with its error.

Part 2, ``monitors``: a Lightning run of ``--fit-steps`` steps per configuration, each in its
own process, the batch coming through the loader as in a user's run: no monitor,
``HessianMonitor()`` at its defaults (``memory="auto"``, ``budget=0.05``) and all five monitors
at their defaults with ``ContinualEvaluation(budget=0.03)`` (``--configs`` picks). Peak
memory over the memory held before ``fit`` and wall time, as ratios to the run
without monitors; the HessianMonitor's own ``overhead`` (measurement time ÷ training time) is
printed too. A budget monitor measures at step 0, before any training can pay for it, so in a
short run that first measurement dominates the time ratio; the budget bounds the time after it.

    python benchmarks/scale.py                        # CPU, a few minutes
    python benchmarks/scale.py --device cuda --size gpt2-small
    python benchmarks/scale.py --parts routes --models gpt2 --routes double_backward

Record the figures, with the machine and date, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from dynlens.callbacks.replay import _BATCHNORM_STATE
from dynlens.callbacks.schedule import synchronize
from dynlens.curvature import (
    EXPLICIT_ROUTES,
    HessianOperator,
    MemoryMeter,
    MicroBatchLoss,
    memory_meter,
)

SIZES = {
    "cpu": {
        "gpt2": dict(n_layer=4, n_embd=256, n_head=4, seq=256, batch=8, vocab=2048),
        "llama": dict(
            n_layer=4, n_embd=256, n_inner=688, n_head=8, n_kv_head=2, seq=256, batch=8, vocab=2048
        ),
        "convnet": dict(width=64, blocks=4, batch=64),
    },
    "gpt2-small": {
        "gpt2": dict(n_layer=12, n_embd=768, n_head=12, seq=1024, batch=8, vocab=50257),
        "llama": dict(
            n_layer=12,
            n_embd=768,
            n_inner=2048,
            n_head=12,
            n_kv_head=4,
            seq=1024,
            batch=8,
            vocab=32000,
        ),
        "convnet": dict(width=128, blocks=8, batch=128),
    },
}
#: Vectorised routes take every probe in one pass.
VECTORISED = ("batched_double_backward", "vmap_forward_over_reverse")
#: glibc: blocks of 1 MiB and more are mapped and unmapped on their own, so RSS falls on free.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_TRIM_THRESHOLD_": str(2**20)}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    """A GPT-2 block: pre-LayerNorm causal self-attention and a 4× GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)
        )

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = self.attn(self.ln_1(h)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).flatten(2))
        return h + self.mlp(self.ln_2(h))


class PlainGPT2(nn.Module):
    """GPT-2 (token and learned position embeddings, blocks, final LayerNorm, tied head)."""

    def __init__(self, n_layer: int, n_embd: int, n_head: int, seq: int, vocab: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(seq, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.wte.weight.T


class Workload(NamedTuple):
    """A model, its training loss, what it is, and a labelled set of one batch for
    ContinualEvaluation with the forward that evaluates it."""

    model: nn.Module
    loss_of: Callable[[nn.Module], Tensor]
    impl: str
    eval_set: TensorDataset
    forward_fn: Callable
    #: The batch's inputs and targets (a causal LM's targets are its inputs, shifted), for the
    #: micro-batched products and the peers.
    inputs: Tensor | None = None
    targets: Tensor | None = None


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _lm_forward(module, batch, task):
    """ContinualEvaluation's forward on a causal LM: next-token logits and targets."""
    logits = _logits(module.model, batch[0])
    return logits[:, :-1].flatten(0, 1), batch[0][:, 1:].flatten()


def batch_loss(model: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
    """The workload's loss on inputs ``x`` (a causal LM's mean next-token loss when ``y`` is
    None): what ``loss_of`` computes on the whole batch."""
    if y is not None:
        return F.cross_entropy(_logits(model, x), y)
    return F.cross_entropy(_logits(model, x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())


def gpt2(device: torch.device, size: dict) -> Workload:
    shape = (size["batch"], size["seq"])
    tokens = torch.randint(0, size["vocab"], shape, device=device)
    eval_set = TensorDataset(torch.randint(0, size["vocab"], shape))

    forward_fn = _lm_forward
    try:
        if os.environ.get("DYNLENS_SCALE_PLAIN"):
            raise ImportError("the plain GPT-2 was asked for")
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        model = PlainGPT2(
            size["n_layer"], size["n_embd"], size["n_head"], size["seq"], size["vocab"]
        )

        def loss(m: nn.Module) -> Tensor:
            logits = m(tokens)[:, :-1]
            return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

        impl = "the plain GPT-2 of scale.py"
        return Workload(model.to(device), loss, impl, eval_set, forward_fn, tokens)
    hf_logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=size["n_layer"],
        n_embd=size["n_embd"],
        n_head=size["n_head"],
        n_positions=size["seq"],
        vocab_size=size["vocab"],
    )
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).to(device)
    return Workload(
        model,
        lambda m: m(input_ids=tokens, labels=tokens).loss,
        "Hugging Face GPT2LMHeadModel",
        eval_set,
        forward_fn,
        tokens,
    )


def llama(device: torch.device, size: dict) -> Workload:
    """A Llama-shaped causal LM (RMSNorm, rotary positions, SwiGLU, grouped-query attention with
    2 key-value heads) built from a ``transformers`` config, of the GPT-2-shaped model's size."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    shape = (size["batch"], size["seq"])
    tokens = torch.randint(0, size["vocab"], shape, device=device)
    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["n_embd"],
        intermediate_size=size["n_inner"],
        num_hidden_layers=size["n_layer"],
        num_attention_heads=size["n_head"],
        num_key_value_heads=size["n_kv_head"],
        max_position_embeddings=size["seq"],
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
    return Workload(
        model,
        lambda m: m(input_ids=tokens, labels=tokens).loss,
        "Hugging Face LlamaForCausalLM (grouped-query attention)",
        TensorDataset(torch.randint(0, size["vocab"], shape)),
        _lm_forward,
        tokens,
    )


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


def convnet(device: torch.device, size: dict) -> Workload:
    width, blocks = size["width"], size["blocks"]
    stages: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
    for i in range(blocks):
        stages.append(ResidualBlock(width))
        if i == blocks // 2 - 1:
            stages.append(nn.MaxPool2d(2))
    model = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
    x = torch.randn(size["batch"], 3, 32, 32, device=device)
    y = torch.randint(0, 10, (size["batch"],), device=device)
    eval_set = TensorDataset(
        torch.randn(size["batch"], 3, 32, 32), torch.randint(0, 10, (size["batch"],))
    )
    return Workload(
        model.to(device),
        lambda m: F.cross_entropy(m(x), y),
        "residual CNN with BatchNorm",
        eval_set,
        lambda module, batch, task: (module.model(batch[0]), batch[1]),
        x,
        y,
    )


MODELS = {"gpt2": gpt2, "llama": llama, "convnet": convnet}


# --------------------------------------------------------------------------------------------
# Part 1, in a child process: one route against a training step
# --------------------------------------------------------------------------------------------


def measure_route(
    model_name: str,
    route: str,
    size_name: str,
    device: torch.device,
    probes: int,
    samples_per_chunk: int = 0,
) -> dict:
    torch.manual_seed(0)
    work = MODELS[model_name](device, SIZES[size_name][model_name])
    model, loss_of, impl = work.model, work.loss_of, work.impl
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not batch_norm:
        # dropout off, as PyHessian sets it and curvlinops checks for: deterministic products
        # that every implementation can be held to
        model.eval()
    meter = memory_meter(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        loss_of(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # the first steps allocate AdamW's state and warm the kernels up
        train_step()
    step_times, step_peaks = [], []
    for _ in range(3):
        gc.collect()
        synchronize(device)
        before = meter.in_use()
        meter.reset_peak()
        start = time.perf_counter()
        train_step()
        synchronize(device)
        step_times.append(time.perf_counter() - start)
        step_peaks.append(meter.peak() - before)

    # BatchNorm in train mode, as the training step runs it, without updating running statistics.
    buffers = {
        n: None for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in _BATCHNORM_STATE
    }
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return loss_of(_Bound(model, {**p, **buffers}))

    x, y = work.inputs, work.targets
    samples = len(x) if x is not None else 1
    chunk = samples_per_chunk if 0 < samples_per_chunk < samples else 0
    if chunk and batch_norm:
        raise SystemExit("BatchNorm in training mode couples the batch: no micro-batches")

    def rows_loss(p: dict[str, Tensor], a: int, b: int) -> Tensor:
        assert x is not None
        return batch_loss(_Bound(model, {**p, **buffers}), x[a:b], None if y is None else y[a:b])

    def operator(route: str) -> HessianOperator:
        if chunk:
            split = MicroBatchLoss(rows_loss, samples)
            return HessianOperator(split, params, route=route, samples_per_chunk=chunk)
        return HessianOperator(loss_fn, params, route=route)

    def products(route: str, v: Tensor) -> Tensor:
        if route in PEERS:
            return PEERS[route](model, x, y, chunk or samples, v)
        return operator(route) @ v

    n = sum(p.numel() for p in params.values())
    g = torch.Generator(device=device).manual_seed(1)
    batch = (torch.randint(0, 2, (probes, n), generator=g, device=device) * 2 - 1).float()
    products(route, batch[:1])  # warm-up: kernels, vmap rules
    gc.collect()
    synchronize(device)
    before = meter.in_use()
    meter.reset_peak()
    start = time.perf_counter()
    out = products(route, batch)
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = meter.peak() - before
    # the reference: the whole batch's products by double backward
    exact = HessianOperator(loss_fn, params, route="double_backward") @ batch
    errors = ((out - exact).norm(dim=1) / exact.norm(dim=1)).tolist()
    return {
        "model": model_name,
        "impl": impl,
        "parameters": n,
        "route": route + (f" in micro-batches of {chunk}" if chunk else ""),
        "probes": probes,
        "step_s": statistics.median(step_times),
        "step_peak": max(step_peaks),
        "product_s": elapsed / probes,
        "product_peak": peak,
        "error": max(errors),
    }


class _Flat(nn.Module):
    """The model's logits as the peers take them: (samples, classes), a causal LM's shifted."""

    def __init__(self, model: nn.Module, causal: bool) -> None:
        super().__init__()
        self.model, self.causal = model, causal

    def forward(self, inputs: Tensor) -> Tensor:
        logits = _logits(self.model, inputs)
        return logits[:, :-1].flatten(0, 1) if self.causal else logits


def _math_sdpa():
    """The math attention kernel, the one with second derivatives (dynlens's routes pick it
    themselves; the peers run under it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def curvlinops_products(model, x, y, chunk: int, v: Tensor) -> Tensor:
    """curvlinops' ``HessianLinearOperator`` over the same model, loss and batch (in micro-batches
    of ``chunk`` samples: its data loader), its products of the rows of ``v``."""
    from curvlinops import HessianLinearOperator

    causal = y is None
    data = [
        (x[a : a + chunk], x[a : a + chunk, 1:].flatten() if causal else y[a : a + chunk])
        for a in range(0, len(x), chunk)
    ]
    op = HessianLinearOperator(
        _Flat(model, causal),
        nn.CrossEntropyLoss(),
        [p for p in model.parameters() if p.requires_grad],
        data,
        check_deterministic=False,  # checked here against the double-backward reference instead
        num_data=len(x),
        batch_size_fn=lambda inputs: inputs.shape[0],
    )
    with _math_sdpa():
        return (op @ v.T).T


def pyhessian_products(model, x, y, chunk: int, v: Tensor) -> Tensor:
    """PyHessian's ``hessian`` on the whole batch (it sets the model to eval mode) and its
    ``hessian_vector_product`` of each row of ``v``."""
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product

    if chunk < len(x):
        raise RuntimeError("PyHessian is run on the whole batch only here")

    causal = y is None
    targets = x[:, 1:].flatten() if causal else y
    with _math_sdpa():
        flat, loss = _Flat(model, causal), nn.CrossEntropyLoss()
        comp = hessian(flat, loss, data=(x, targets), cuda=x.is_cuda)
    shapes = [p.shape for p in comp.params]
    sizes = [shape.numel() for shape in shapes]
    rows = []
    for row in v:
        pieces = [c.reshape(s) for c, s in zip(row.split(sizes), shapes, strict=True)]
        hv = hessian_vector_product(comp.gradsH, comp.params, pieces)
        rows.append(torch.cat([h.reshape(-1) for h in hv]))
    model.zero_grad(set_to_none=True)  # PyHessian leaves the graph in .grad
    return torch.stack(rows)


#: The peers, run as routes of their own (benchmark-only dependencies).
PEERS = {"curvlinops": curvlinops_products, "pyhessian": pyhessian_products}


class _Bound(nn.Module):
    """``module`` called with the tensors ``values`` in place of its own (functional_call)."""

    def __init__(self, module: nn.Module, values: dict) -> None:
        super().__init__()
        self.module, self.values = module, values

    def __call__(self, *args, **kwargs):
        return functional_call(self.module, self.values, args, kwargs)


# --------------------------------------------------------------------------------------------
# Part 2, in a child process: a Lightning run with monitors at their defaults
# --------------------------------------------------------------------------------------------


def measure_fit(
    model_name: str, config: str, size_name: str, device: torch.device, steps: int
) -> dict:
    import logging
    import warnings

    import pytorch_lightning as pl

    from dynlens import (
        ContinualEvaluation,
        GrokkingMonitor,
        HessianMonitor,
        LogitGrowthMonitor,
        SoftmaxCollapseMonitor,
    )

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    work = MODELS[model_name](device, SIZES[size_name][model_name])
    model, impl = work.model, work.impl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            # the batch comes through the loader, as in a user's run (the monitor splits it)
            return batch_loss(self.model, batch[0], batch[1] if len(batch) > 1 else None)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    meter = RunPeak(memory_meter(device))
    hessian = HessianMonitor(memory_meter=meter, verbose=False)
    counted: dict = {"products": 0, "chunks": []}
    matmul = HessianOperator.matmul

    def counting(op: HessianOperator, vectors: Tensor) -> Tensor:
        out = matmul(op, vectors)
        counted["products"] += 1 if vectors.ndim == 1 else len(vectors)
        chunk = getattr(op, "samples_per_chunk", None)  # (None before micro-batches existed)
        if chunk not in counted["chunks"]:
            counted["chunks"].append(chunk)
        return out

    HessianOperator.matmul = counting  # type: ignore[method-assign]
    monitors: list = {
        "none": [],
        "hessian": [hessian],
        "all five": [
            hessian,
            SoftmaxCollapseMonitor(verbose=False),
            LogitGrowthMonitor(verbose=False),
            GrokkingMonitor(verbose=False),
            ContinualEvaluation(
                {0: work.eval_set},
                budget=0.03,
                forward_fn=work.forward_fn,
                batch_size=len(work.eval_set),
                verbose=False,
            ),
        ],
    }[config]
    # the same batch at every step (built before fit, so not counted as training's memory)
    one = (work.inputs,) if work.targets is None else (work.inputs, work.targets)
    loader = torch.utils.data.DataLoader(range(steps), collate_fn=lambda _: one)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            max_steps=steps,
            logger=pl.loggers.CSVLogger(logdir),
            callbacks=monitors,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        gc.collect()
        synchronize(device)
        before = meter.absolute()
        meter.start()
        start = time.perf_counter()
        trainer.fit(Module(), loader)
        synchronize(device)
        elapsed = time.perf_counter() - start
        peak = meter.run_peak() - before
    result = {
        "model": model_name,
        "impl": impl,
        "config": config,
        "fit_s": elapsed,
        "peak": peak,
        "process_peak": meter.run_peak(),
    }
    if config != "none":
        schedule = hessian.schedule
        result.update(
            route=hessian.state_dict()["route"],
            measurements=schedule.measure_count,
            # one measurement in training steps, and measurement time ÷ training time
            measurement_steps=(schedule.measure_time / max(schedule.measure_count, 1))
            / (schedule.train_time / max(schedule.train_steps, 1)),
            overhead=schedule.overhead,
            next_step=schedule.next_step,
            events=[e["reason"] for e in hessian.events],
            products=counted["products"],
            # samples per micro-batch of the operators (None: the whole batch)
            chunks=counted["chunks"],
            product_steps=(schedule.measure_time / max(counted["products"], 1))
            / (schedule.train_time / max(schedule.train_steps, 1)),
            messages=[e["message"] for e in hessian.events],
            disabled=[type(m).__name__ for m in monitors if m.disabled_reason is not None],
        )
    return result


class RunPeak(MemoryMeter):
    """The device's meter, keeping the peak over the whole run across the resets that
    HessianMonitor's metering makes (each reset would otherwise hide the peak before it).
    It reads what the monitor's meter reads (over the baseline the monitor rebases to); the
    run's own figures (:meth:`absolute`, :meth:`run_peak`) add the baseline back."""

    def __init__(self, inner: MemoryMeter) -> None:
        self.inner, self.available, self._peak = inner, inner.available, 0
        # (getattr: the figures before these attributes existed are measured with this script)
        self.counts = getattr(inner, "counts", "")
        self.resolution = getattr(inner, "resolution", 0)

    def _base(self) -> int:
        return int(getattr(self.inner, "baseline", 0))

    def rebase(self) -> None:
        self.inner.rebase()
        self.counts = self.inner.counts

    def in_use(self) -> int:
        return self.inner.in_use()

    def reset_peak(self) -> None:
        self._peak = max(self._peak, self.inner.peak() + self._base())
        self.inner.reset_peak()

    def peak(self) -> int:
        return self.inner.peak()

    def absolute(self) -> int:
        """The memory in use now, counted from the meter's own start (not the monitor's)."""
        return self.inner.in_use() + self._base()

    def start(self) -> None:
        """Forget every peak so far: the run's starts now."""
        self.inner.reset_peak()
        self._peak = 0

    def run_peak(self) -> int:
        return max(self._peak, self.inner.peak() + self._base())


# --------------------------------------------------------------------------------------------
# The parent: run the children, print ratios
# --------------------------------------------------------------------------------------------


def _child(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--size", args.size, "--device", args.device, *extra]
    env = {**os.environ, **MALLOC_ENV}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"failed": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument(
        "--routes",
        nargs="+",
        choices=(*EXPLICIT_ROUTES, *PEERS),
        default=list(EXPLICIT_ROUTES),
        help="dynlens's routes, and the peers curvlinops and pyhessian (where installed)",
    )
    parser.add_argument(
        "--samples-per-chunk",
        type=int,
        default=0,
        help="products micro-batch by micro-batch of this many samples (0: the whole batch)",
    )
    parser.add_argument(
        "--parts", nargs="+", choices=("routes", "monitors"), default=["routes", "monitors"]
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=("hessian", "all five"),
        default=["hessian", "all five"],
        help="the monitored runs of part 2 (each against a run without monitors)",
    )
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--fit-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--plain", action="store_true", help="the GPT-2 written here even with transformers"
    )
    parser.add_argument("--child", nargs=2, metavar=("PART", "WHAT"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        part, what = args.child
        if part == "route":
            out = measure_route(
                args.model, what, args.size, device, args.probes, args.samples_per_chunk
            )
        else:
            out = measure_fit(args.model, what, args.size, device, args.fit_steps)
        print(json.dumps(out))
        return

    threads = ["--threads", str(args.threads)] if args.threads else []
    if args.plain:
        os.environ["DYNLENS_SCALE_PLAIN"] = "1"  # the children inherit it
    print(
        f"torch {torch.__version__}, device {device}, size {args.size}, "
        f"{torch.get_num_threads()} threads"
    )
    if "routes" in args.parts:
        for model in args.models:
            print(f"\n{model}: {args.probes} probes per route, ratios to one training step")
            for route in args.routes:
                r = _child(
                    args,
                    "--child",
                    "route",
                    route,
                    "--model",
                    model,
                    "--probes",
                    str(args.probes),
                    "--samples-per-chunk",
                    str(args.samples_per_chunk),
                    *threads,
                )
                if "failed" in r:
                    print(f"  {route:26s} failed: {r['failed']}")
                    continue
                print(
                    f"  {r['route']:26s} time/product {r['product_s'] / r['step_s']:5.2f}x  "
                    f"peak {r['product_peak'] / r['step_peak']:5.2f}x ({_gib(r['product_peak'])})  "
                    f"error {r['error']:.1e}   [{r['impl']}, {r['parameters']:,} parameters, step "
                    f"{1e3 * r['step_s']:.0f} ms, step peak {_gib(r['step_peak'])}]"
                )
    if "monitors" in args.parts:
        for model in args.models:
            print(
                f"\n{model}: Lightning runs of {args.fit_steps} steps, ratios to the run without "
                "monitors"
            )
            base = None
            for config in ("none", *args.configs):
                r = _child(
                    args,
                    "--child",
                    "fit",
                    config,
                    "--model",
                    model,
                    "--fit-steps",
                    str(args.fit_steps),
                    *threads,
                )
                if "failed" in r:
                    print(f"  {config:9s} failed: {r['failed']}")
                    continue
                if base is None:
                    base = r
                    print(
                        f"  {config:9s} {r['fit_s']:.1f} s, peak {_gib(r['peak'])} over the "
                        "memory before fit"
                    )
                    continue
                print(
                    f"  {config:9s} time {r['fit_s'] / base['fit_s']:5.2f}x  peak "
                    f"{r['peak'] / base['peak']:5.2f}x ({_gib(r['peak'])}; whole process "
                    f"{r['process_peak'] / base['process_peak']:.2f}x)  HessianMonitor: route "
                    f"{r['route']}, micro-batches {r['chunks']}, events {r['events']}, "
                    f"{r['measurements']} measurement(s) of {r['measurement_steps']:.0f} training "
                    f"steps each ({r['products']} products, {r['product_steps']:.2f} steps per "
                    "product), overhead so far "
                    f"{r['overhead']:.2f}, next at step {r['next_step']}; disabled: "
                    f"{r['disabled'] or 'none'}"
                )


if __name__ == "__main__":
    main()
