"""Curvature at a real model size: each Hessian-vector-product route's time and peak memory
against a training step of the same model, and the monitors' cost at their defaults.

Two models, each against its own anchor (a training step: forward, backward, AdamW step), in the
same run:

* ``gpt2``: a GPT-2 causal LM built from a config (Hugging Face ``GPT2LMHeadModel`` when
  ``transformers`` is installed, else an equivalent pre-LayerNorm GPT-2 written here; each
  result line says which, and ``--plain`` asks for the one written here). ``--size cpu``
  (default): 4 layers, d = 256, 4 heads, sequence 256, batch 8, vocabulary 2,048 (3.75M
  parameters). ``--size gpt2-small``: GPT-2 small, 12 layers, d = 768, 12 heads, sequence
  1,024, batch 8, vocabulary 50,257 (124M parameters).
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
hide in another's.

Part 2, ``monitors``: a Lightning run of ``--fit-steps`` steps per configuration, each in its
own process: no monitor, ``HessianMonitor()`` at its defaults (``memory="auto"``,
``budget=0.05``) and all five monitors at their defaults with ``ContinualEvaluation(budget=
0.03)``. Peak memory over the memory held before ``fit`` and wall time, as ratios to the run
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
from dynlens.curvature import EXPLICIT_ROUTES, HessianOperator, MemoryMeter, memory_meter

SIZES = {
    "cpu": {
        "gpt2": dict(n_layer=4, n_embd=256, n_head=4, seq=256, batch=8, vocab=2048),
        "convnet": dict(width=64, blocks=4, batch=64),
    },
    "gpt2-small": {
        "gpt2": dict(n_layer=12, n_embd=768, n_head=12, seq=1024, batch=8, vocab=50257),
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


def gpt2(device: torch.device, size: dict) -> Workload:
    shape = (size["batch"], size["seq"])
    tokens = torch.randint(0, size["vocab"], shape, device=device)
    eval_set = TensorDataset(torch.randint(0, size["vocab"], shape))

    def forward_fn(module, batch, task):
        out = module.model(batch[0])
        logits = out.logits if hasattr(out, "logits") else out
        return logits[:, :-1].flatten(0, 1), batch[0][:, 1:].flatten()

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
        return Workload(model.to(device), loss, impl, eval_set, forward_fn)
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
    )


MODELS = {"gpt2": gpt2, "convnet": convnet}


# --------------------------------------------------------------------------------------------
# Part 1, in a child process: one route against a training step
# --------------------------------------------------------------------------------------------


def measure_route(
    model_name: str, route: str, size_name: str, device: torch.device, probes: int
) -> dict:
    torch.manual_seed(0)
    model, loss_of, impl, _, _ = MODELS[model_name](device, SIZES[size_name][model_name])
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

    n = sum(p.numel() for p in params.values())
    g = torch.Generator(device=device).manual_seed(1)
    batch = (torch.randint(0, 2, (probes, n), generator=g, device=device) * 2 - 1).float()
    HessianOperator(loss_fn, params, route=route) @ batch[:1]  # warm-up: kernels, vmap rules
    gc.collect()
    synchronize(device)
    before = meter.in_use()
    meter.reset_peak()
    start = time.perf_counter()
    out = HessianOperator(loss_fn, params, route=route) @ batch
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = meter.peak() - before
    exact = out
    if route != "double_backward":
        exact = HessianOperator(loss_fn, params, route="double_backward") @ batch
    errors = ((out - exact).norm(dim=1) / exact.norm(dim=1)).tolist()
    return {
        "model": model_name,
        "impl": impl,
        "parameters": n,
        "route": route,
        "probes": probes,
        "step_s": statistics.median(step_times),
        "step_peak": max(step_peaks),
        "product_s": elapsed / probes,
        "product_peak": peak,
        "error": max(errors),
    }


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
    model, loss_of, impl = work.model, work.loss_of, work.impl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return loss_of(self.model)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    meter = RunPeak(memory_meter(device))
    hessian = HessianMonitor(memory_meter=meter, verbose=False)
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
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(steps, 1)))
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
        before = meter.in_use()
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
            messages=[e["message"] for e in hessian.events],
            disabled=[type(m).__name__ for m in monitors if m.disabled_reason is not None],
        )
    return result


class RunPeak(MemoryMeter):
    """The device's meter, keeping the peak over the whole run across the resets that
    HessianMonitor's metering makes (each reset would otherwise hide the peak before it)."""

    def __init__(self, inner: MemoryMeter) -> None:
        self.inner, self.available, self._peak = inner, inner.available, 0

    def in_use(self) -> int:
        return self.inner.in_use()

    def reset_peak(self) -> None:
        self._peak = max(self._peak, self.inner.peak())
        self.inner.reset_peak()

    def peak(self) -> int:
        return self.inner.peak()

    def start(self) -> None:
        """Forget every peak so far: the run's starts now."""
        self.inner.reset_peak()
        self._peak = 0

    def run_peak(self) -> int:
        return max(self._peak, self.inner.peak())


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
        "--routes", nargs="+", choices=EXPLICIT_ROUTES, default=list(EXPLICIT_ROUTES)
    )
    parser.add_argument(
        "--parts", nargs="+", choices=("routes", "monitors"), default=["routes", "monitors"]
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
            out = measure_route(args.model, what, args.size, device, args.probes)
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
                    *threads,
                )
                if "failed" in r:
                    print(f"  {route:26s} failed: {r['failed']}")
                    continue
                print(
                    f"  {route:26s} time/product {r['product_s'] / r['step_s']:5.2f}x  "
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
            for config in ("none", "hessian", "all five"):
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
                    f"{r['route']}, events {r['events']}, {r['measurements']} measurement(s) of "
                    f"{r['measurement_steps']:.0f} training steps each, overhead so far "
                    f"{r['overhead']:.2f}, next at step {r['next_step']}; disabled: "
                    f"{r['disabled'] or 'none'}"
                )


if __name__ == "__main__":
    main()
