"""EarlyWarningMonitor against seeded unstable runs and stable controls, per event.

    python benchmarks/early_warning.py [--suite collapse divergence attention] [--seeds 4]
    python benchmarks/early_warning.py --overhead 10 --paired    # the cost at the defaults
    python benchmarks/early_warning.py --overhead 4 --paired --overhead-model gpt2
    python benchmarks/early_warning.py --overhead 2 --paired --accelerator gpu

Each suite trains small models on the CPU with the monitor at its defaults (``events`` the
suite's one event) and reads, per run, the warnings and the step the event happened at (the
monitor's own event rule, the issue's definitions):

* **collapse** — an MLP memorising 256 of scikit-learn's 8×8 digits with AdamW and no weight
  decay (learning rates 2e-2 and 3e-2), in float32, for 6,000 steps: the logits grow until more
  than half of the samples are in Softmax Collapse. Controls: the same runs with the loss in
  float64, and with StableMax.
* **divergence** — an MLP on all the digits with 30% of the labels shuffled (so the loss stays
  away from 0), batches of 256, SGD with a linear learning-rate warm-up over 1,500 steps to 50 or
  100, which overshoots: the loss climbs until it passes 10× its lowest value. Controls: the same
  warm-up to 0.2 (stable throughout) and to 5 (at the edge of stability from about step 500, the
  update ratio near 1, without diverging).
* **attention** — one self-attention layer on a generated look-up task (the answer is the token
  at the position the first token names), Adam warmed up linearly over 1,500 steps to 0.3 or
  0.5, without qk-layernorm. Controls: the same runs with LayerNorm on queries and keys.

Per event it reports recall (unstable runs warned before their event), the median lead (event
step − first warning step) in steps and as a share of the event's step, false alarms (a control
with any warning, or a warning in an unstable run whose event did not come within
max(horizon, 2 × (expected − warned)) steps), and the runs whose event did not come or came in a
control. Targets (issue 17): recall ≥ 90%, median lead ≥ 100 steps and ≥ 20% of the time to the
event, false alarms ≤ 10% of controls; and (``--overhead``) ≤ 1.03× a training step at the
defaults on the example Transformer (examples/transformer_instability.py, with qk-layernorm),
with ``--paired`` (the method of record) from one run per round that switches the monitor on
and off in alternate blocks of 100 steps, else from whole runs alternated with runs without it.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _harness import StepTimer, Toggled
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynlens
from dynlens.callbacks.context import logging_step
from dynlens.early_warning import WarningPolicy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "transformer_instability.py"
BLOCK = 100  # the paired blocks: curvature_every_n_steps at the defaults


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


class MLP(pl.LightningModule):
    def __init__(self, optimizer: Callable, lr: float, warmup: int = 0, loss=None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.optimizer, self.lr, self.warmup = optimizer, lr, warmup
        self.loss_fn = loss if loss is not None else dynlens.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        return {"loss": self.loss_fn(logits, y), "logits": logits.detach()}

    def configure_optimizers(self):
        return with_warmup(self.optimizer(self.parameters(), lr=self.lr), self.warmup)


class Lookup(pl.LightningModule):
    """One self-attention layer (F.scaled_dot_product_attention), optionally with qk-layernorm."""

    def __init__(self, lr: float, warmup: int, qk_norm: bool, d: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(16, d), nn.Parameter(torch.randn(8, d) * 0.1)
        self.qkv, self.out, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 16)
        norm = (lambda: nn.LayerNorm(d // heads)) if qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.heads, self.lr, self.warmup = heads, lr, warmup

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.emb(x) + self.pos
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        h = h + self.out(a.transpose(1, 2).flatten(-2))
        return F.cross_entropy(self.head(h[:, 0]), y)

    def configure_optimizers(self):
        return with_warmup(torch.optim.Adam(self.parameters(), lr=self.lr), self.warmup)


def with_warmup(optimizer: torch.optim.Optimizer, warmup: int):
    if not warmup:
        return optimizer
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@dataclass
class Run:
    event: str
    unstable: bool
    setting: str
    seed: int
    steps: int
    happened: int | None
    warnings: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    #: Every point the event's forecast was asked for: [measured step, signal step, value,
    #: threshold] (what :func:`replay` decides again from).
    points: list[list[float]] = field(default_factory=list)
    #: The learning-rate warm-up's steps (0: none): the rate rises up to global step warmup − 1.
    warmup: int = 0


def collapse_run(seed: int, variant: int, unstable: bool) -> tuple[pl.LightningModule, DataLoader]:
    x, y = digits()
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:256]
    lr = (2e-2, 3e-2)[variant % 2]
    if unstable:
        loss, name = dynlens.CrossEntropyLoss(), "float32"
    elif variant < 2:
        loss, name = dynlens.CrossEntropyLoss(dtype=torch.float64), "float64"
    else:
        loss, name = dynlens.CrossEntropyLoss(activation="stablemax"), "StableMax"
    model = MLP(functools.partial(torch.optim.AdamW, weight_decay=0.0), lr, loss=loss)
    model.setting = f"{name}, lr {lr:g}"
    return model, DataLoader(TensorDataset(x[index], y[index]), batch_size=256)


def divergence_run(seed: int, variant: int, unstable: bool):
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    noisy = torch.rand(len(y), generator=g) < 0.3
    y = torch.where(noisy, torch.randint(0, 10, y.shape, generator=g), y)
    lr = (50.0, 100.0)[variant % 2] if unstable else (0.2, 5.0)[variant % 2]
    model = MLP(torch.optim.SGD, lr, warmup=1500)
    model.setting = f"SGD warm-up to {lr:g} over 1500 steps"
    # whole batches only: a last batch of 5 samples would set a lowest loss no batch of 256 sees
    loader = DataLoader(
        TensorDataset(x, y), batch_size=256, shuffle=True, drop_last=True, generator=g
    )
    return model, loader


def attention_run(seed: int, variant: int, unstable: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 16, (2048, 8), generator=g)
    y = x.gather(1, x[:, :1] % 8).squeeze(1)
    lr = (0.3, 0.5)[variant % 2]
    model = Lookup(lr, warmup=1500, qk_norm=not unstable)
    model.setting = f"Adam warm-up to {lr:g}, " + (
        "no qk-layernorm" if unstable else "qk-layernorm"
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, generator=g)
    return model, loader


SUITES = {
    "collapse": (collapse_run, 6000, {"logits_module": None}),
    "divergence": (divergence_run, 2000, {}),
    "attention": (attention_run, 2000, {}),
}


def quiet_trainer(steps: int, callbacks: list, accelerator: str = "cpu") -> pl.Trainer:
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def train(event: str, seed: int, variant: int, unstable: bool, **settings) -> Run:
    make, steps, options = SUITES[event]
    torch.manual_seed(seed)
    model, loader = make(seed, variant, unstable)
    monitor = dynlens.EarlyWarningMonitor(
        instabilities=(event,), verbose=False, **options, **settings
    )
    trainer = quiet_trainer(steps, [monitor])
    points: list[list[float]] = []
    forecast = monitor.policy.forecast

    def recorded(what, at, value, threshold, rise_ends_before=None):
        points.append([logging_step(trainer), at, value, threshold])
        return forecast(what, at, value, threshold, rise_ends_before)

    monitor.policy.forecast = recorded
    start = time.perf_counter()
    trainer.fit(model, loader)
    run = Run(
        event,
        unstable,
        model.setting,
        seed,
        steps,
        monitor.happened[event],
        [dict(w) for w in monitor.warnings],
        time.perf_counter() - start,
        points,
        model.warmup,
    )
    # the replay decides from the trend alone: the warnings of the stability limit's crossing
    # (read from the update ratio, which the points do not hold) are not replayed
    trend = [w for w in run.warnings if w.get("signal") != "stability_limit"]
    decided = [(w["step"], w["expected_step"]) for w in replay(run, **settings)]
    if not any(w.get("signal") == "stability_limit" for w in run.warnings) and decided != [
        (w["step"], w["expected_step"]) for w in trend
    ]:
        raise AssertionError(f"replay differs from the run: {decided} against {run.warnings}")
    return run


def replay(run: Run, **settings) -> list[dict]:
    """The warnings the monitor with ``settings`` would have raised on ``run``'s points: its own
    policy (forecast and warn/clear rule, :class:`dynlens.early_warning.WarningPolicy`), without
    a trainer (the event stops forecasts from its step)."""
    policy = WarningPolicy((run.event,), **settings)
    peak = run.warmup - 1  # the warm-up's LambdaLR raises the rate up to this global step
    warnings_ = []
    for step, at, value, threshold in run.points:
        if run.happened is not None and step >= run.happened:
            break

        # as the monitor's LRAhead reads the scheduler: the global step is the measured one + 1
        def rise_ends_before(until, now=step + 1):
            return peak if run.warmup and now < peak < until else None

        forecast = policy.forecast(run.event, at, value, threshold, rise_ends_before)
        if policy.decide(run.event, forecast):
            warnings_.append(
                {"step": int(step), "expected_step": math.ceil(forecast.expected_step)}
            )
    return warnings_


def false_alarm(run: Run, horizon: int) -> list[dict]:
    """Warnings whose event did not come within max(horizon, 2 × (expected − warned)) steps."""
    late = []
    for w in run.warnings:
        allowed = max(horizon, 2 * (w["expected_step"] - w["step"]))
        if run.happened is None or not w["step"] <= run.happened <= w["step"] + allowed:
            late.append(w)
    return late


def score(runs: list[Run], horizon: int) -> dict:
    unstable = [r for r in runs if r.unstable]
    controls = [r for r in runs if not r.unstable]
    happened = [r for r in unstable if r.happened is not None]
    leads, shares, recalled = [], [], 0
    for r in happened:
        before = [w for w in r.warnings if w["step"] < r.happened]
        if before:
            recalled += 1
            leads.append(r.happened - before[0]["step"])
            shares.append((r.happened - before[0]["step"]) / max(r.happened, 1))
    alarms = sum(bool(r.warnings) for r in controls) + sum(
        bool(false_alarm(r, horizon)) for r in unstable
    )
    return {
        "unstable runs": len(unstable),
        "events that came": len(happened),
        "recall": recalled / max(len(happened), 1),
        "median lead (steps)": statistics.median(leads) if leads else None,
        "median lead (share of the time to the event)": statistics.median(shares)
        if shares
        else None,
        "controls": len(controls),
        "controls whose event came anyway": sum(r.happened is not None for r in controls),
        "false alarms (runs)": alarms,
        "false alarms (share of controls)": alarms / max(len(controls), 1),
    }


def transformer():
    """The example Transformer (examples/transformer_instability.py) with qk-layernorm (a stable
    run: no event ends a forecast, so the monitor does all its work throughout) and its loader."""
    spec = importlib.util.spec_from_file_location("transformer_instability", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return (lambda: example.TransformerLM(qk_layernorm=True)), example.loader()


class GPT2Shaped(pl.LightningModule):
    """A Hugging Face ``GPT2LMHeadModel`` from a config (4 layers, width 128, 4 heads, sequence
    128, vocabulary 2,048; SDPA attention) on random tokens, AdamW under a linear warm-up over
    2,000 steps and a cosine to step 100,000 (so that the monitor reads the schedule ahead as far
    as it ever does): a GPT-2-shaped step that a 2-core CPU runs in about a tenth of a second."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=128, vocab_size=2048)
        config._attn_implementation = "sdpa"
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def warmup_cosine(t: int, warmup: int = 2000, total: int = 100_000) -> float:
    if t < warmup:
        return (t + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warmup) / (total - warmup))))


def gpt2_shaped():
    tokens = torch.randint(0, 2048, (64, 128), generator=torch.Generator().manual_seed(0))
    return GPT2Shaped, DataLoader(TensorDataset(tokens), batch_size=8, shuffle=True)


def overhead(
    rounds: int, steps: int, paired: bool, accelerator: str = "cpu", model: str = "transformer"
) -> dict:
    """The monitor at its defaults (every instability) on the example Transformer (or the
    GPT-2-shaped model), against no monitor.

    ``paired``: in each run the monitor is switched on and off in alternate blocks of 100 steps
    (``_harness.Toggled``; 100 = ``curvature_every_n_steps``, so every "on" block holds the
    defaults' ten measured steps and one update ratio) and the run's ratio is the median "on"
    block's step time over the median "off" block's (``_harness.StepTimer``). Otherwise: whole
    ``fit`` wall times, with and without the monitor alternating within each round and swapping
    which goes first. The median over rounds of each round's ratio, with the quartiles."""
    model_of, loader = transformer() if model == "transformer" else gpt2_shaped()
    logits_module = "head" if model == "transformer" else "auto"
    ratios = []
    for r in range(rounds):
        times = {}
        for with_monitor in (True,) if paired else (r % 2 == 0, r % 2 == 1):
            torch.manual_seed(0)
            monitor = dynlens.EarlyWarningMonitor(logits_module=logits_module, verbose=False)
            timer = StepTimer(block=BLOCK)
            callbacks = [timer, Toggled(monitor, block=BLOCK)] if paired else [timer]
            if with_monitor and not paired:
                callbacks.append(monitor)
            trainer = quiet_trainer(steps, callbacks, accelerator)
            start = time.perf_counter()
            trainer.fit(model_of(), loader)
            times[with_monitor] = time.perf_counter() - start
            if paired:
                ratios.append(timer.paired(BLOCK))
        if not paired:
            ratios.append(times[True] / times[False])
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {
        "model": model,
        "method": f"paired blocks of {BLOCK} steps" if paired else "alternated whole runs",
        "rounds": rounds,
        "steps": steps,
        "ratio": statistics.median(ratios),
        "quartiles": [quartiles[0], quartiles[2]],
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="+", choices=list(SUITES), default=list(SUITES))
    parser.add_argument("--seeds", type=int, default=4, help="seeds per setting (2 settings)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="unstable runs take seeds from this one on, controls from half of it (and 100 more)",
    )
    parser.add_argument("--json", default=None, help="write every run and the scores here")
    parser.add_argument(
        "--overhead",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead of the suites: the cost at the defaults, in this many rounds",
    )
    parser.add_argument("--overhead-steps", type=int, default=3000)
    parser.add_argument(
        "--overhead-model",
        choices=("transformer", "gpt2"),
        default="transformer",
        help="the example Transformer, or a GPT-2-shaped Hugging Face model",
    )
    parser.add_argument(
        "--accelerator", choices=("cpu", "gpu"), default="cpu", help="with --overhead"
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="with --overhead: the monitor on and off in alternate blocks of one run (the method "
        "of record) instead of alternating whole runs",
    )
    parser.add_argument(
        "--horizon",
        type=int,
        default=None,
        help="the monitor's, for every event (default: the monitor's, 'auto')",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    if args.overhead:
        cost = overhead(
            args.overhead, args.overhead_steps, args.paired, args.accelerator, args.overhead_model
        )
        cost["accelerator"] = args.accelerator
        print(json.dumps(cost, indent=1))
        return
    settings = {} if args.horizon is None else {"horizon": args.horizon}
    horizons = WarningPolicy(**settings).horizons
    report: dict = {"horizons": horizons, "suites": {}}
    for event in args.suite:
        first = args.first_seed
        runs = [  # controls of the third and fourth variant take other seeds
            train(event, seed + 100 * (variant // 2), variant, unstable, **settings)
            for unstable in (True, False)
            for variant in range(2 if unstable else 4)
            for seed in (
                range(first, first + args.seeds)
                if unstable
                else range(first // 2, first // 2 + args.seeds // 2)
            )
        ]
        scores = score(runs, horizons[event])
        report["suites"][event] = {"scores": scores, "runs": [asdict(r) for r in runs]}
        print(f"\n## {event}")
        for r in runs:
            first = r.warnings[0] if r.warnings else None
            said = f"warned {first['step']} (expected {first['expected_step']})" if first else "-"
            print(
                f"  {'unstable' if r.unstable else 'control '} {r.setting:<40} seed {r.seed}: "
                f"event {r.happened}, {said}, {len(r.warnings)} warning(s), {r.seconds:.0f} s"
            )
        for name, value in scores.items():
            print(f"  {name}: {value if not isinstance(value, float) else round(value, 3)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
