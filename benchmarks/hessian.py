"""HessianMonitor's costs, each against an anchor measured in the same run (ratios only).

(a) **Per-probe HVP ÷ one gradient** for the route HessianMonitor uses (``route="tuned"``: on
    CPU the faster of double backward and batched double backward, chosen by a timed trial in
    the first batch of probes; vmapped forward-over-reverse on CUDA), on the two problems of
    ``benchmarks/hessian_routes.py``: the grokking MLP and a small Transformer encoder. Both the
    kept route's cost (every later measurement) and a first call's, trial included, are shown.
(b) **Time to a trace within 5 % of the exact value**, dynlens (Hutchinson, the monitor's
    estimator, and Hutch++, each at its defaults and with ``route="tuned"``)
    versus PyHessian's ``hessian(model, criterion, data).trace()`` (Yao et
    al. 2020; Hutchinson with a running-mean stopping rule), on a tanh MLP small enough for an
    exact trace (n Hessian-vector products against the unit vectors). For each method the
    probe budget doubles until *every* one of 5 seeds lands within 5 %; the time is the median
    of one call at that budget, including each method's gradient graph. PyHessian's own default
    call (``maxIter=100, tol=1e-3``) is reported too. PyHessian is a benchmark-only dependency
    (``pip install pyhessian``); without it that column is skipped with a message.
(c) **Training wall time with HessianMonitor at its default budget (5 %) ÷ without**, on the
    edge-of-stability example (full-batch gradient descent, tanh MLP 20-200-200-10, 1,000
    points): Lightning runs alternate without/with in one process and the median ratio is taken.
    After the first measurement (step 0, before any training could pay for it) the monitor keeps
    its measurement time within 5 % of the training time, so the ratio falls towards at most
    1.05 as runs get longer; short runs still carry the first measurement.

(d) **Spread of Hutchinson vs Hutch++ at equal budget** (30 products, 6 seeds: std/mean of the
    estimates) on the edge-of-stability MLP at initialisation and after 400 steps of gradient
    descent, the grokking MLP and the small Transformer: why HessianMonitor defaults to
    Hutchinson.

(e) **The spectral density's cost** (``HessianMonitor(density=True)``: stochastic Lanczos
    quadrature, ``spectral_density`` with its default 50 Lanczos steps, on the route the monitor
    keeps) ÷ one gradient and ÷ the monitor's default trace (Hutchinson, 30 products), on the
    edge-of-stability MLP and the two problems of (a); per product against (a)'s HVP, which
    shows what the Lanczos bookkeeping (full reorthogonalisation) adds.

    python benchmarks/hessian.py            # full
    python benchmarks/hessian.py --quick    # smaller problems, shorter runs, fewer rounds
    python benchmarks/hessian.py --sections bd   # only some sections

Absolute times depend on the machine; record ratios with machine and date in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from hessian_routes import LossFn, _sync, _time, mlp_problem, transformer_problem

from dynlens.curvature import (
    Estimate,
    HessianOperator,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
)

SEEDS = 5
TOLERANCE = 0.05


# --------------------------------------------------------------------------------------------
# (a) per-probe cost of the monitor's route
# --------------------------------------------------------------------------------------------


def _anchors(
    loss_fn: LossFn, params: dict[str, Tensor], k: int
) -> tuple[Callable[[], None], Tensor, str]:
    """One gradient of the loss (the anchor), ``k`` Rademacher vectors, and the route a tuned
    operator keeps after its first batch (on the CPU a trial; what HessianMonitor passes on)."""
    device = next(iter(params.values())).device
    names, leaves = list(params), [p.detach().requires_grad_(True) for p in params.values()]

    def gradient() -> None:
        torch.autograd.grad(loss_fn(dict(zip(names, leaves, strict=True))), leaves)

    n = sum(p.numel() for p in params.values())
    g = torch.Generator(device=device).manual_seed(0)
    vectors = (2 * torch.randint(0, 2, (k, n), generator=g, device=device) - 1).float()
    trial = HessianOperator(loss_fn, params, route="tuned")
    trial @ vectors
    return gradient, vectors, trial.route


def hvp_cost(
    name: str, loss_fn: LossFn, params: dict[str, Tensor], probes: int, rounds: int
) -> None:
    gradient, vectors, route = _anchors(loss_fn, params, probes)
    device, n = vectors.device, vectors.shape[1]

    def first() -> None:  # a first measurement: the trial, then the route it keeps
        HessianOperator(loss_fn, params, route="tuned") @ vectors

    def products() -> None:  # later measurements: the route kept, as HessianMonitor passes it on
        HessianOperator(loss_fn, params, route=route) @ vectors  # type: ignore[arg-type]

    gradient(), products()  # warm-up
    grad_times, hvp_times, first_times = [], [], []
    for _ in range(rounds):
        grad_times.append(_time(gradient, device))
        hvp_times.append(_time(products, device))
        first_times.append(_time(first, device))
    grad = statistics.median(grad_times)
    ratio = statistics.median(hvp_times) / probes / grad
    with_trial = statistics.median(first_times) / probes / grad
    print(
        f"  {name:<12} n={n:>7,}  k={probes}  route {route}: per-probe HVP / gradient {ratio:5.2f}x"
        f"  (a first call with route='tuned', its trial included: {with_trial:5.2f}x)"
    )


# --------------------------------------------------------------------------------------------
# (b) time to a trace within 5 % of exact
# --------------------------------------------------------------------------------------------


def trace_problem(width: int, samples: int) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    )
    x = torch.randn(samples, 20)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (samples,)), 10).float()
    return model, x, y


def mse(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (out - y).square().sum(dim=1).mean()


def exact_trace(loss_fn: LossFn, params: dict[str, Tensor]) -> float:
    op = HessianOperator(loss_fn, params, route="double_backward")
    eye = torch.eye(op.numel)
    return float(sum((rows * (op @ rows)).sum() for rows in eye.split(256)))


def smallest_reliable_budget(
    run: Callable[[int, int], tuple[float, float]], exact: float, ladder: list[int]
) -> tuple[int | None, float]:
    """Smallest budget in ``ladder`` at which every seed's estimate is within 5 %, and the median
    time of one call there. ``run(m, seed)`` returns ``(estimate, seconds)``."""
    for m in ladder:
        results = [run(m, seed) for seed in range(SEEDS)]
        if all(abs(value - exact) <= TOLERANCE * abs(exact) for value, _ in results):
            return m, statistics.median(seconds for _, seconds in results)
    return None, float("nan")


def trace_race(width: int, samples: int, ladder: list[int]) -> None:
    from torch.func import functional_call

    model, x, y = trace_problem(width, samples)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return mse(functional_call(model, p, (x,)), y)

    start = time.perf_counter()
    exact = exact_trace(loss_fn, params)
    exact_time = time.perf_counter() - start
    n = sum(p.numel() for p in params.values())
    print(f"  tanh MLP n={n:,}, {samples} samples: exact tr(H) = {exact:.4f} ({n:,} HVPs)")

    def dynlens_run(
        estimator: Callable[..., Estimate], route: str = "auto"
    ) -> Callable[[int, int], tuple[float, float]]:
        def run(m: int, seed: int) -> tuple[float, float]:
            g = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            value = estimator(loss_fn, params, num_probes=m, generator=g, route=route).value
            return value, time.perf_counter() - start

        return run

    results = {
        "dynlens Hutchinson": smallest_reliable_budget(
            dynlens_run(hutchinson_trace), exact, ladder
        ),
        "dynlens Hutchinson, route='tuned'": smallest_reliable_budget(
            dynlens_run(hutchinson_trace, "tuned"), exact, ladder
        ),
        "dynlens Hutch++": smallest_reliable_budget(
            dynlens_run(hutchpp_trace), exact, [m for m in ladder if m >= 3]
        ),
        "dynlens Hutch++, route='tuned'": smallest_reliable_budget(
            dynlens_run(hutchpp_trace, "tuned"), exact, [m for m in ladder if m >= 3]
        ),
    }
    try:
        from pyhessian import hessian
    except ImportError:
        hessian = None
        print("  PyHessian: skipped (not installed; `pip install pyhessian` to compare)")

    def pyhessian_run(m: int, seed: int, tol: float = 0.0) -> tuple[float, float]:
        copy = trace_problem(width, samples)[0]  # PyHessian writes .grad (with a graph): a copy
        copy.load_state_dict(model.state_dict())
        torch.manual_seed(seed)  # PyHessian draws its probes from the global RNG
        start = time.perf_counter()
        value = statistics.fmean(hessian(copy, mse, data=(x, y), cuda=False).trace(m, tol))
        return value, time.perf_counter() - start

    if hessian is not None:
        results["PyHessian trace(maxIter=m)"] = smallest_reliable_budget(
            pyhessian_run, exact, ladder
        )
    for name, (m, seconds) in results.items():
        print(
            f"  {name:<37} within 5% for all {SEEDS} seeds from {m} probes; one call "
            f"{seconds / exact_time:.4f}x the exact trace's time"
        )
    if hessian is None:
        return
    _, t_dyn = results["dynlens Hutchinson"]
    _, t_py = results["PyHessian trace(maxIter=m)"]
    for name, (_, seconds) in results.items():
        if name.startswith("dynlens"):
            print(f"  => time to a 5% trace, {name} / PyHessian: {seconds / t_py:.2f}x")
    runs = [pyhessian_run(100, seed, tol=1e-3) for seed in range(SEEDS)]
    worst = max(abs(value - exact) / abs(exact) for value, _ in runs)
    median = statistics.median(seconds for _, seconds in runs)
    print(
        f"  PyHessian's default trace(maxIter=100, tol=1e-3): worst error {worst:.1%} over "
        f"{SEEDS} seeds, median time {median / t_dyn:.2f}x dynlens Hutchinson's 5% call"
    )


# --------------------------------------------------------------------------------------------
# (c) training overhead at the default budget
# --------------------------------------------------------------------------------------------


def training_overhead(steps: int, rounds: int) -> None:
    import pytorch_lightning as pl
    from edge_of_stability import FullBatch, TeacherRegression, teacher_data
    from torch.utils.data import DataLoader

    from dynlens.callbacks.hessian import HessianMonitor

    x, y = teacher_data()

    def run(monitored: bool) -> tuple[float, HessianMonitor | None]:
        pl.seed_everything(0, verbose=False)
        monitor = HessianMonitor(verbose=False) if monitored else None  # default budget 0.05
        trainer = pl.Trainer(
            max_steps=steps,
            logger=False,
            callbacks=[monitor] if monitor else [],
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            accelerator="cpu",
        )
        loader = DataLoader(FullBatch(x, y), batch_size=None)
        model = TeacherRegression()
        _sync(torch.device("cpu"))
        start = time.perf_counter()
        trainer.fit(model, loader)
        return time.perf_counter() - start, monitor

    ratios, noise = [], []
    for _ in range(rounds):
        # without, with, without: the two plain runs bracket the monitored one and their ratio
        # is the noise floor of this machine
        before, _ = run(False)
        watched, monitor = run(True)
        after, _ = run(False)
        assert monitor is not None
        ratios.append(watched / statistics.fmean([before, after]))
        noise.append(after / before)
        measured = [int(h["step"]) for h in monitor.history]
        print(
            f"  {steps} steps: with/without {ratios[-1]:.3f}x (without/without {noise[-1]:.3f}x); "
            f"measured at steps {measured}"
        )
    print(
        f"  => median training time with HessianMonitor(budget=0.05) / without: "
        f"{statistics.median(ratios):.3f}x (target <= 1.06x)"
    )


# --------------------------------------------------------------------------------------------
# (d) which trace estimator for network Hessians
# --------------------------------------------------------------------------------------------


def estimator_spread(quick: bool, probes: int = 30, seeds: int = 6) -> None:
    from edge_of_stability import mlp, teacher_data
    from torch.func import functional_call

    torch.manual_seed(0)
    x, y = teacher_data(n=300 if quick else 1000)
    model = mlp()

    def eos_loss(p: dict[str, Tensor]) -> Tensor:
        return mse(functional_call(model, p, (x,)), y)

    def current() -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in model.named_parameters()}

    problems = {"eos mlp, init": (eos_loss, current())}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4)
    for _ in range(400):
        optimizer.zero_grad()
        mse(model(x), y).backward()
        optimizer.step()
    problems["eos mlp, step 400"] = (eos_loss, current())
    problems["grokking mlp"] = mlp_problem(torch.device("cpu"), 500 if quick else 5107)
    problems["transformer"] = transformer_problem(torch.device("cpu"), 8 if quick else 32)
    for name, (loss_fn, params) in problems.items():
        cells = []
        for estimator in (hutchinson_trace, hutchpp_trace):
            values = [
                estimator(
                    loss_fn, params, num_probes=probes, generator=torch.Generator().manual_seed(s)
                ).value
                for s in range(seeds)
            ]
            spread = statistics.stdev(values) / abs(statistics.fmean(values))
            cells.append(f"{estimator.__name__.removesuffix('_trace')} {spread:7.1%}")
        print(f"  {name:<18} std/mean over {seeds} seeds at {probes} products: {'  '.join(cells)}")


# --------------------------------------------------------------------------------------------
# (e) the spectral density's cost
# --------------------------------------------------------------------------------------------


def density_cost(
    name: str, loss_fn: LossFn, params: dict[str, Tensor], num_iter: int, rounds: int
) -> None:
    gradient, probes, route = _anchors(loss_fn, params, 4)
    device, n = probes.device, probes.shape[1]
    products = [0]

    def density() -> None:
        sd = spectral_density(
            loss_fn,
            params,
            num_iter=num_iter,
            grid=2,
            route=route,  # type: ignore[arg-type]
            generator=torch.Generator().manual_seed(0),
        )
        products[0] = sd.num_products

    def trace() -> None:
        hutchinson_trace(
            loss_fn, params, num_probes=30, route=route, generator=torch.Generator().manual_seed(0)
        )

    def hvps() -> None:
        op = HessianOperator(loss_fn, params, route=route)  # type: ignore[arg-type]
        for row in probes:
            op @ row  # one vector at a time, as Lanczos applies them

    gradient(), density(), trace(), hvps()  # warm-up
    times: dict[str, list[float]] = {"gradient": [], "density": [], "trace": [], "hvp": []}
    for _ in range(rounds):
        times["gradient"].append(_time(gradient, device))
        times["density"].append(_time(density, device))
        times["trace"].append(_time(trace, device))
        times["hvp"].append(_time(hvps, device) / len(probes))
    t = {k: statistics.median(v) for k, v in times.items()}
    per_product = t["density"] / products[0] / t["hvp"]
    print(
        f"  {name:<12} n={n:>7,}  {products[0]} products: density / gradient "
        f"{t['density'] / t['gradient']:6.1f}x, / trace (30 probes) "
        f"{t['density'] / t['trace']:5.2f}x; per product / one HVP {per_product:4.2f}x "
        f"(route {route})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems, shorter runs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--sections", default="abcde", help="which of a, b, c, d, e to run")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    print(
        f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, "
        f"{'quick' if args.quick else 'full'}"
    )
    if "a" in args.sections:
        print("(a) per-probe Hessian-vector product / one gradient, HessianMonitor's route")
        probes, rounds = (8, 3) if args.quick else (16, 7)
        cpu = torch.device("cpu")
        hvp_cost("mlp", *mlp_problem(cpu, 500 if args.quick else 5107), probes, rounds)
        hvp_cost("transformer", *transformer_problem(cpu, 8 if args.quick else 32), probes, rounds)
    if "b" in args.sections:
        print("(b) time to a trace within 5% of exact: dynlens vs PyHessian")
        ladder = [1, 2, 3, 6, 12, 24, 48, 96, 192, 384]
        width, samples = (24, 200) if args.quick else (48, 1000)
        trace_race(width=width, samples=samples, ladder=ladder)
    if "c" in args.sections:
        print("(c) training wall time, HessianMonitor at the default budget vs none")
        training_overhead(steps=2000 if args.quick else 5000, rounds=2 if args.quick else 3)
    if "d" in args.sections:
        print("(d) trace estimators on network Hessians: Hutchinson vs Hutch++ at equal budget")
        estimator_spread(args.quick)
    if "e" in args.sections:
        print("(e) spectral density (50 Lanczos steps) / one gradient and / the default trace")
        from edge_of_stability import mlp, teacher_data
        from torch.func import functional_call

        torch.manual_seed(0)
        x, y = teacher_data(n=300 if args.quick else 1000)
        eos = mlp()
        eos_params = {k: v.detach().clone() for k, v in eos.named_parameters()}
        rounds, cpu = (2, torch.device("cpu")) if args.quick else (5, torch.device("cpu"))

        def eos_loss(p: dict[str, Tensor]) -> Tensor:
            return mse(functional_call(eos, p, (x,)), y)

        density_cost("eos mlp", eos_loss, eos_params, 50, rounds)
        density_cost("mlp", *mlp_problem(cpu, 500 if args.quick else 5107), 50, rounds)
        density_cost("transformer", *transformer_problem(cpu, 8 if args.quick else 32), 50, rounds)


if __name__ == "__main__":
    main()
