"""Per-probe cost of a Hessian-vector product ÷ one gradient, for each route of dynlens.curvature.

Two problems, measured in the same run against their own anchor (one gradient,
``torch.autograd.grad`` of the loss, default attention kernels, as a training step pays it):

* ``mlp``: the grokking MLP of Prieto et al. (2025), bias-free ReLU [226 → 200 → 200 → 113], on
  5,107 random one-hot pairs (the 40% training split of modular addition mod 113);
* ``transformer``: a small Transformer encoder (2 layers, d_model 64, 4 heads, sequence 16,
  batch 32) with a token embedding and a linear head.

For each route, a ``HessianOperator`` is built and applied to k probes; the time includes the
gradient graph the double-backward route builds once and shares, so the figure is the amortised
cost per probe at k probes. Rounds interleave anchor and routes, and the median over rounds is
reported, so drift on a busy machine hits every column alike. Ratios only: absolute times depend
on the machine. Record figures (with machine and date) in benchmarks/RESULTS.md.

    python benchmarks/hessian_routes.py            # full run
    python benchmarks/hessian_routes.py --quick    # seconds; a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dynlens.curvature import EXPLICIT_ROUTES, HessianOperator

LossFn = Callable[[dict[str, Tensor]], Tensor]


def mlp_problem(device: torch.device, samples: int) -> tuple[LossFn, dict[str, Tensor]]:
    p = 113
    model = nn.Sequential(
        nn.Linear(2 * p, 200, bias=False),
        nn.ReLU(),
        nn.Linear(200, 200, bias=False),
        nn.ReLU(),
        nn.Linear(200, p, bias=False),
    ).to(device)
    a, b = torch.randint(0, p, (2, samples), device=device)
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], dim=1).float()
    y = (a + b) % p
    return _loss_fn(model, x, y), {k: v.detach() for k, v in model.named_parameters()}


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 113, d_model: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def transformer_problem(device: torch.device, batch: int) -> tuple[LossFn, dict[str, Tensor]]:
    model = TinyTransformer().to(device)
    x = torch.randint(0, 113, (batch, 16), device=device)
    y = torch.randint(0, 113, (batch,), device=device)
    # The embedding weight's Hessian block is sparse but still part of θ, as in training.
    return _loss_fn(model, x, y), {k: v.detach() for k, v in model.named_parameters()}


def _loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> LossFn:
    return lambda params: F.cross_entropy(functional_call(model, params, (x,)), y)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(
    name: str, loss_fn: LossFn, params: dict[str, Tensor], probes: int, rounds: int
) -> dict[str, float]:
    device = next(iter(params.values())).device
    leaves = [p.detach().requires_grad_(True) for p in params.values()]
    names = list(params)

    def gradient() -> None:
        torch.autograd.grad(loss_fn(dict(zip(names, leaves, strict=True))), leaves)

    n = sum(p.numel() for p in params.values())
    g = torch.Generator(device=device).manual_seed(0)
    vectors = (2 * torch.randint(0, 2, (probes, n), generator=g, device=device) - 1).float()

    def products(route: str) -> Callable[[], object]:
        return lambda: HessianOperator(loss_fn, params, route=route) @ vectors

    jobs = {"gradient": gradient, **{route: products(route) for route in EXPLICIT_ROUTES}}
    for job in jobs.values():  # warm-up: allocator, lazy imports, forward-AD decompositions
        job()
    times: dict[str, list[float]] = {key: [] for key in jobs}
    for _ in range(rounds):
        for key, job in jobs.items():
            times[key].append(_time(job, device))
    anchor = statistics.median(times["gradient"])
    ratios = {route: statistics.median(times[route]) / probes / anchor for route in EXPLICIT_ROUTES}
    cells = "  ".join(f"{route} {ratio:5.2f}x" for route, ratio in ratios.items())
    print(f"{name:<12} n={n:>7,}  k={probes}  per-probe HVP / gradient:  {cells}", flush=True)
    return ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds")
    parser.add_argument("--probes", type=int, default=None, help="probes per operator (k)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (median taken)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    probes = args.probes or (2 if args.quick else 16)
    rounds = args.rounds or (2 if args.quick else 7)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"{'quick (smoke test, sizes shrunk)' if args.quick else 'full'}; median of {rounds} rounds"
    )
    measure("mlp", *mlp_problem(device, 500 if args.quick else 5107), probes, rounds)
    measure("transformer", *transformer_problem(device, 8 if args.quick else 32), probes, rounds)


if __name__ == "__main__":
    main()
