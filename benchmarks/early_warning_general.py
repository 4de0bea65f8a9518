"""EarlyWarningMonitor on a second suite that it was not tuned on: settings that differ in kind.

    python benchmarks/early_warning_general.py --half dev [--seeds 2] [--instabilities ...]
        [--settings NAME ...] [--json out.json]
    python benchmarks/early_warning_general.py --half dev --calibrate   # event steps only
    python benchmarks/early_warning_general.py --half dev --monitor 'window=16' --json dev.json
    python benchmarks/early_warning_general.py --rescore dev.json       # score saved runs again

The first suite (``benchmarks/early_warning.py``) has one small setting per instability, with
events at steps 1,800–4,600, and the monitor's defaults were chosen on it. This suite spreads
the same four instabilities over three timescales (events before step 500, at 500–5,000, after
5,000), three architectures (an MLP and a CNN with BatchNorm on scikit-learn's 8×8 digits, a
two-layer GPT-2 from a ``transformers`` config on generated token sequences, and a causal
attention block written here, with or without qk-layernorm), SGD with and without momentum and
Adam/AdamW, constant rates, linear warm-ups, geometric ramps (η(t) = η0·g^t) and cosines, float32
and ``bf16-mixed``. Each setting (:data:`SETTINGS`) has an unstable run and a stable control that
differs from it in one thing, and its calibration (seed 0: the unstable run's event step by the
monitor's own rule, no event in the control within its steps) is written beside it.

**The split** is by setting, fixed before any default of the monitor was chosen on this suite.
The **dev** half is for looking at while changing the monitor; the **record** half is run once,
for the record, after the changes (``--half record``), never for tuning (``--calibrate`` shows
only event steps, for placing the events in their buckets). The halves share no setting; where
events could be placed, each instability has two timescale buckets in each half:

=========  ============================================  ===========================================
bucket     dev                                           record
=========  ============================================  ===========================================
early      collapse: MLP, AdamW;                         attention: block, AdamW;
           divergence: CNN-BN, SGD+momentum, ramp;       spike: CNN-BN, full-batch SGD, ramp;
           attention: block, Adam, bf16                  divergence: MLP, full-batch SGD, warm-up
mid        spike: MLP, full-batch SGD;                   collapse: CNN-BN, Adam, bf16;
           attention: GPT-2, Adam                        attention: GPT-2, Adam, warm-up;
                                                         spike: GPT-2, Adam, ramp;
                                                         divergence: tanh MLP (MSE), SGD, ramp
late       collapse: CNN-BN, Adam, cosine;               divergence: GPT-2, AdamW, ramp;
           divergence: MLP, SGD, ramp;                   collapse: MLP, SGD+momentum, bf16
           spike: MLP, full-batch SGD, ramp
=========  ============================================  ===========================================

No setting found puts an attention blow-up after step 5,000 (the blow-up comes early in training
at a high rate, or not at all), nor a divergence between 500 and 5,000 in the dev half.
(:data:`SETTINGS` is the definition; this table is its summary.)

**Each run** trains with ``dynlens.EarlyWarningMonitor(instabilities=(event,), verbose=False)``
at its defaults (plus ``logits_module=None`` where the logits come from ``training_step``) and
records its warnings, ``happened``, every forecast the policy made of the event's trend (by
wrapping ``monitor.policy.forecast``: each point, expected step and range), and, from
:class:`Series`, every step's training loss, total gradient norm before clipping and learning
rate. An unstable run stops 100
steps after its event is detected; a control runs all its steps.

**Scores** per instability and bucket (the worst bucket is the figure):

* dynlens **recall**: the unstable runs whose event came that were warned before it with a lead
  (event step − warning step) of at least 20% of the time to the event (the event step), the
  event inside the warning's forecast range (for events read at measured steps, collapse and
  attention, up to ``every_n_steps`` past its upper end, as the event is only seen there); the
  **median lead** of those warnings in steps and as a share of the time to the event; **false
  alarms**: controls with any warning of the event, plus unstable runs with a warning whose event
  did not come within max(horizon, 2 × (expected − warned)) steps (for a crossing's open range,
  "from this step on": did not come at all; :func:`false_alarm`), as a share of the controls;
* the **baselines** (:mod:`_baselines`: Lightning's ``SpikeDetection``, OLMo-core's 6σ rule,
  ZClip's gradient-norm z-score), read from the same runs' series: recall (fired with a lead of
  at least 20% of the time to the event, as for dynlens; they have no range), the median lead
  over the runs where it fired at all (a reactive rule fires at or after the event, a lead ≤ 0,
  when nothing gives the event away before), false alarms (controls where it fired at all).

Runs use ``torch.set_flush_denormal(True)``: a float64 loss keeps gradients that float32 holds
only as subnormal numbers, which made the float64 controls some 50× slower per step.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field

import pytorch_lightning as pl
import torch
from _baselines import BASELINES
from _general_settings import SETTINGS, Setting
from early_warning import Run

import dynlens
from dynlens.callbacks.context import logging_step
from dynlens.early_warning import WarningPolicy

BUCKETS: dict[str, tuple[float, float]] = {
    "early": (0, 500),
    "mid": (500, 5000),
    "late": (5000, math.inf),
}
INSTABILITIES = ("collapse", "divergence", "attention", "spike")
#: An unstable run goes on this many steps after its event is detected (for the baselines that
#: fire just after it), then stops.
AFTER_EVENT = 100


# ------------------------------------------------------------------------------ runs


@dataclass
class GeneralRun(Run):
    """A run of this suite: :class:`early_warning.Run` and what the scores read."""

    bucket: str = ""
    half: str = ""
    precision: str = ""
    #: The learning-rate schedule (:class:`_general_runs.Schedule` as a dict) and base rate.
    schedule: dict = field(default_factory=dict)
    base_lr: float = 0.0
    #: Every forecast the policy returned for the event: [measured step, expected, lower, upper].
    ranges: list[list[float | None]] = field(default_factory=list)
    #: Every measurement of the stability limit: [step, η_c, η, expected crossing or None].
    limits: list[list[float | None]] = field(default_factory=list)
    #: Warnings of instabilities other than the one watched (should be none).
    other_warnings: list[dict] = field(default_factory=list)
    #: Per step: the training loss, the total gradient norm before clipping, the learning rate.
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)


class Series(pl.Callback):
    """Every step's training loss, total gradient norm before clipping (read in
    ``on_before_optimizer_step``, after unscaling, before clipping) and learning rate; stops an
    unstable run :data:`AFTER_EVENT` steps after the monitor saw its event."""

    def __init__(self, monitor: dynlens.EarlyWarningMonitor, event: str, stop: bool) -> None:
        self.monitor, self.event, self.stop = monitor, event, stop
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.seen_at: int | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.detach().float() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().float().reshape(()))
        if self.seen_at is None and self.monitor.happened[self.event] is not None:
            self.seen_at = trainer.global_step
        if self.stop and self.seen_at is not None:
            trainer.should_stop = trainer.global_step >= self.seen_at + AFTER_EVENT


def train(setting: Setting, seed: int, unstable: bool, **options) -> GeneralRun:
    """Train ``setting``'s unstable run or control with the monitor at its defaults, or with
    ``options`` (monitor arguments, for trying a change on the dev half)."""
    torch.manual_seed(seed)
    model, loader = setting.build(seed, unstable)
    event = setting.instability
    monitor = dynlens.EarlyWarningMonitor(
        instabilities=(event,), verbose=False, **setting.options, **options
    )
    series = Series(monitor, event, stop=unstable)
    precision = setting.precision_of(unstable)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=setting.max_steps,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, series],
    )
    points: list[list[float]] = []
    ranges: list[list[float | None]] = []
    forecast = monitor.policy.forecast

    def recorded(what, at, value, threshold, *args, **kwargs):
        made = forecast(what, at, value, threshold, *args, **kwargs)
        if what == event:
            step = logging_step(trainer)
            points.append([step, at, value, threshold])
            if made is not None:
                ranges.append([step, made.expected_step, made.lower, made.upper])
        return made

    limits: list[list[float | None]] = []
    forecast_limit = monitor.policy.forecast_limit

    def recorded_limit(step, limit, rates_ahead):
        made = forecast_limit(step, limit, rates_ahead)
        expected = None if made is None else made.expected_step
        limits.append([step, limit, rates_ahead[0], expected])
        return made

    monitor.policy.forecast = recorded
    monitor.policy.forecast_limit = recorded_limit
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    schedule = model.configure.schedule
    run = GeneralRun(
        event,
        unstable,
        setting.name,
        seed,
        setting.max_steps,
        monitor.happened[event],
        [dict(w) for w in monitor.warnings if w["event"] == event],
        seconds,
        points,
        bucket=setting.bucket,
        half=setting.half,
        precision=precision,
        schedule=asdict(schedule),
        base_lr=float(model.configure.lr),
        ranges=ranges,
        limits=limits,
        other_warnings=[dict(w) for w in monitor.warnings if w["event"] != event],
        losses=torch.stack(series.losses).tolist() if series.losses else [],
        grad_norms=torch.stack(series.norms).tolist() if series.norms else [],
        lrs=series.lrs,
    )
    return run


# ------------------------------------------------------------------------------ scores


def forecast_range(run: GeneralRun, warning: dict) -> tuple[float, float] | None:
    """The range of the forecast a warning was raised from: the recorded forecast at its step
    whose expected step it quotes, else the range in its message."""
    for step, expected, lower, upper in run.ranges:
        if (
            step == warning["step"]
            and expected is not None
            and math.ceil(expected) == warning["expected_step"]
            and lower is not None
            and upper is not None
        ):
            return lower, upper
    said = re.search(r"range (\d+)–(\d+|∞)", warning.get("message", ""))
    if said is None:
        return None
    return float(said[1]), math.inf if said[2] == "∞" else float(said[2])


def recalled(run: GeneralRun, warning: dict, slack: int) -> bool:
    """The warning came before the event with a lead of at least 20% of the time to the event,
    and the event is inside its forecast's range."""
    event = run.happened
    assert event is not None
    if not warning["step"] < event or event - warning["step"] < 0.2 * event:
        return False
    span = forecast_range(run, warning)
    if span is None or event < math.floor(span[0]):
        return False
    return math.isinf(span[1]) or event <= math.ceil(span[1]) + slack


def false_alarm(run: GeneralRun, policy: WarningPolicy) -> list[dict]:
    """Warnings whose event did not come within max(horizon, 2 × (expected − warned)) steps,
    the horizon the one the warning was raised under; or, for a warning whose range is open
    (the stability limit's crossing: "from this step on"), did not come in the run at all."""
    late = []
    for w in run.warnings:
        horizon = policy.horizon_at(run.event, w["step"])
        allowed = max(horizon, 2 * (w["expected_step"] - w["step"]))
        span = forecast_range(run, w)
        if span is not None and math.isinf(span[1]):
            allowed = math.inf
        if run.happened is None or not w["step"] <= run.happened <= w["step"] + allowed:
            late.append(w)
    return late


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def score(runs: list[GeneralRun], policy: WarningPolicy, slack: int) -> dict:
    unstable = [r for r in runs if r.unstable]
    controls = [r for r in runs if not r.unstable]
    came = [r for r in unstable if r.happened is not None]
    leads, shares = [], []
    for r in came:
        good = [w for w in r.warnings if recalled(r, w, slack)]
        if good:
            assert r.happened is not None
            leads.append(r.happened - good[0]["step"])
            shares.append((r.happened - good[0]["step"]) / max(r.happened, 1))
    alarms = sum(bool(r.warnings) for r in controls) + sum(
        bool(false_alarm(r, policy)) for r in unstable
    )
    scores: dict = {
        "unstable runs": len(unstable),
        "events that came": len(came),
        "controls": len(controls),
        "controls whose event came anyway": sum(r.happened is not None for r in controls),
        "dynlens": {
            "recall": len(leads) / max(len(came), 1),
            "warned before the event (any lead or range)": sum(
                any(w["step"] < (r.happened or 0) for w in r.warnings) for r in came
            ),
            "median lead (steps)": _median(leads),
            "median lead (share of the time to the event)": _median(shares),
            "false alarms (runs)": alarms,
            "false alarms (share of controls)": alarms / max(len(controls), 1),
        },
    }
    for name, (series, rule) in BASELINES.items():
        fired = [(r, rule(getattr(r, series))) for r in came]
        # recalled as dynlens is: fired with a lead of at least 20% of the time to the event
        ahead = [
            r
            for r, at in fired
            if at is not None and (r.happened or 0) - at >= 0.2 * (r.happened or 0) > 0
        ]
        before = [r for r, at in fired if at is not None and at < (r.happened or 0)]
        lead = [(r.happened or 0) - at for r, at in fired if at is not None]
        alarms = sum(rule(getattr(r, series)) is not None for r in controls)
        scores[name] = {
            "recall": len(ahead) / max(len(came), 1),
            "fired before the event (any lead)": len(before),
            "fired at all": sum(at is not None for _, at in fired),
            "median lead (steps)": _median(lead),
            "false alarms (runs)": alarms,
            "false alarms (share of controls)": alarms / max(len(controls), 1),
        }
    return scores


def scores_by_bucket(runs: list[GeneralRun], policy: WarningPolicy, slack: int) -> dict:
    """Per instability: the scores of each bucket and the worst bucket (lowest dynlens recall,
    then most false alarms)."""
    table: dict = {}
    for event in INSTABILITIES:
        buckets = {}
        for bucket in BUCKETS:
            chosen = [r for r in runs if r.event == event and r.bucket == bucket]
            if chosen:
                buckets[bucket] = score(chosen, policy, slack)
        if not buckets:
            continue

        def badness(b: str, buckets: dict = buckets) -> tuple[float, float]:
            d = buckets[b]["dynlens"]
            return (d["recall"], -d["false alarms (share of controls)"])

        table[event] = {"buckets": buckets, "worst bucket": min(buckets, key=badness)}
    return table


def _cell(recall: float, lead: float | None, alarms: float, share: float | None = None) -> str:
    said = "-" if lead is None else f"{lead:.0f}"
    if share is not None:
        said += f" ({share:.0%})"
    return f"{recall:4.0%} {said:>12} {alarms:4.0%}"


def print_table(table: dict) -> None:
    names = ["dynlens", *BASELINES]
    print("\nrecall · median lead in steps (share) · false alarms (share of controls)")
    header = f"{'instability':<11} {'bucket':<12} {'runs':>4} | " + " | ".join(
        f"{n:^23}" for n in names
    )
    print(header)
    print("-" * len(header))
    for event, entry in table.items():
        for bucket, s in entry["buckets"].items():
            tag = bucket + (" (worst)" if bucket == entry["worst bucket"] else "")
            d = s["dynlens"]
            cells = [
                _cell(
                    d["recall"],
                    d["median lead (steps)"],
                    d["false alarms (share of controls)"],
                    d["median lead (share of the time to the event)"],
                )
            ]
            cells += [
                _cell(
                    s[n]["recall"],
                    s[n]["median lead (steps)"],
                    s[n]["false alarms (share of controls)"],
                )
                for n in BASELINES
            ]
            runs = f"{s['events that came']}/{s['unstable runs']}"
            print(f"{event:<11} {tag:<12} {runs:>4} | " + " | ".join(f"{c:^23}" for c in cells))


# ------------------------------------------------------------------------------ main


def in_bucket(step: int | None, bucket: str) -> bool:
    lo, hi = BUCKETS[bucket]
    return step is not None and lo <= step < hi


def dynlens_version() -> dict:
    root = dynlens.__file__.rsplit("/dynlens/", 1)[0]
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"path": dynlens.__file__, "commit": commit}


#: The monitor's arguments that are the policy's (and so the scores' horizons).
POLICY_OPTIONS = ("horizon", "window", "consecutive", "z")


def policy_of(options: dict) -> WarningPolicy:
    """The policy the monitor with ``options`` decides by (for the scores' horizons)."""
    return WarningPolicy(**{k: v for k, v in options.items() if k in POLICY_OPTIONS})


def monitor_option(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half", choices=("dev", "record"))
    parser.add_argument("--rescore", default=None, help="score the runs of a --json file again")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--instabilities", nargs="+", choices=INSTABILITIES, default=None)
    parser.add_argument("--settings", nargs="+", default=None, help="only these settings")
    parser.add_argument("--json", default=None, help="write every run and the scores here")
    parser.add_argument(
        "--monitor",
        nargs="+",
        type=monitor_option,
        default=None,
        metavar="NAME=VALUE",
        help="monitor arguments beside the defaults, values as JSON (e.g. window='\"auto\"' "
        "dense_early=false): for trying a change on the dev half",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="print only each run's event step and whether it is in its bucket (no warnings, "
        "no scores): for placing the events, not for judging the monitor",
    )
    args = parser.parse_args()
    if args.rescore:
        rescore(args.rescore)
        return
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    chosen = [
        s
        for s in SETTINGS
        if s.half == args.half
        and (args.instabilities is None or s.instability in args.instabilities)
        and (args.settings is None or s.name in args.settings)
    ]
    options = dict(args.monitor or [])
    policy = policy_of(options)
    if args.half is None:
        parser.error("--half is required (dev or record)")
    slack = 10  # the monitor's every_n_steps at its defaults
    runs: list[GeneralRun] = []
    start = time.perf_counter()
    for setting in chosen:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for unstable in (True, False):
                run = train(setting, seed, unstable, **options)
                runs.append(run)
                kind = "unstable" if unstable else "control "
                where = (
                    ("in " if in_bucket(run.happened, setting.bucket) else "OUTSIDE ")
                    + setting.bucket
                    if unstable
                    else ("none: ok" if run.happened is None else "CAME IN THE CONTROL")
                )
                line = f"{setting.name:<28} {kind} seed {seed}: event {run.happened} ({where})"
                if not args.calibrate:
                    first = run.warnings[0] if run.warnings else None
                    line += ", " + (
                        f"warned {first['step']} (expected {first['expected_step']})"
                        if first
                        else "no warning"
                    )
                print(f"{line}, {len(run.losses)} steps, {run.seconds:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    print(f"\n{len(runs)} runs in {seconds / 60:.1f} min")
    if args.calibrate:
        return
    report = {
        "half": args.half,
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
        "dynlens": dynlens_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "monitor options": options,
        "horizons": policy.horizons,
        "settings": [s.describe() for s in chosen],
        "runs": [asdict(r) for r in runs],
    }
    if args.json:  # the runs first: a failure in scoring loses no run
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    report["scores"] = scores_by_bucket(runs, policy, slack)
    print_table(report["scores"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def rescore(path: str) -> None:
    """Score the runs a ``--json`` file holds again (after a change to the scores, not to the
    monitor: the warnings are the runs' own)."""
    with open(path) as f:
        report = json.load(f)
    runs = [GeneralRun(**r) for r in report["runs"]]
    policy = policy_of(report.get("monitor options", {}))
    print_table(scores_by_bucket(runs, policy, slack=10))


if __name__ == "__main__":
    main()
