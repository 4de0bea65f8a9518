"""Monitor-contract checks over every exported monitor at once (DESIGN.md, "monitor contract").

Each monitor joins by itself: its test module in ``tests/callbacks/`` defines
``conformance_monitor(eval_set)``, which returns a small instance for this suite's model, and
``FACTORIES`` collects them. Every exported ``Monitor`` subclass must have one, or
``test_every_monitor_is_covered`` fails.
"""

from __future__ import annotations

import importlib
import inspect
import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynlens
import dynlens.callbacks
import dynlens.events
from tests.helpers import trainer as make_trainer

STEPS = 12


def quiet_trainer(**kwargs) -> pl.Trainer:
    """The suite's Trainer: validation after every epoch, nothing printed or checkpointed."""
    return make_trainer(check_val_every_n_epoch=1, **kwargs)


def data(seed: int = 0, n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


class Block(nn.Module):
    """Self-attention through F.scaled_dot_product_attention, with dropout."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.dropout = nn.Dropout(0.2)
        self.attention_dropout = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attention_dropout if self.training else 0.0
        )
        return x + self.dropout(out.transpose(1, 2).flatten(-2))


class Model(pl.LightningModule):
    """Attention, BatchNorm and Dropout: every kind of state a monitor could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.norm(self.block(x).mean(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("train_acc", (logits.argmax(-1) == y).float().mean())
        return F.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _factories() -> dict[type, object]:
    """``{monitor class: factory}``, from each callback test module's ``conformance_monitor``."""
    found = {}
    for path in sorted((Path(__file__).parent / "callbacks").glob("test_*.py")):
        make = getattr(
            importlib.import_module(f"tests.callbacks.{path.stem}"), "conformance_monitor", None
        )
        if make is not None:
            factory = lambda make=make: make(data(1, 32))  # noqa: E731
            found[type(factory())] = factory
    return found


FACTORIES = _factories()


HOOKS = ("setup", "teardown", "state_dict", "load_state_dict", "disable")


@pytest.mark.parametrize("monitor", list(FACTORIES), ids=lambda m: m.__name__)
def test_every_hook_a_monitor_overrides_says_so_and_the_base_hooks_run(monitor, monkeypatch):
    overridden = {
        (cls.__name__, name): fn
        for cls in monitor.__mro__
        if issubclass(cls, dynlens.Monitor) and cls is not dynlens.Monitor
        for name, fn in vars(cls).items()
        if (name.startswith("on_") or name in HOOKS) and callable(fn)
    }
    assert overridden
    unmarked = [hook for hook, fn in overridden.items() if not getattr(fn, "__override__", False)]
    assert unmarked == [], "hooks without @override"
    # the base's hooks (the schedule's clock, the layout, the pooled flush) run once per fit
    calls: list[str] = []
    for name in ("setup", "on_train_start", "on_train_end", "teardown"):
        base = getattr(dynlens.Monitor, name)

        def spy(self, *args, _base=base, _name=name, **kwargs):
            calls.append(_name)
            return _base(self, *args, **kwargs)

        monkeypatch.setattr(dynlens.Monitor, name, spy)
    fit_with(Model(), [FACTORIES[monitor]()])
    assert sorted(calls) == sorted(["setup", "on_train_start", "on_train_end", "teardown"])


def train(callbacks: list) -> tuple[list[torch.Tensor], dict, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Model()
    trainer = quiet_trainer(max_steps=STEPS, logger=False, callbacks=callbacks)
    loader = DataLoader(
        data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    trainer.fit(model, loader, DataLoader(data(2, 32), batch_size=32))
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    return params, trainer.optimizers[0].state_dict(), buffers


def same_optimizer_state(a: dict, b: dict) -> bool:
    return all(
        torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]
        for sa, sb in zip(a["state"].values(), b["state"].values(), strict=True)
        for k in sa
    )


@pytest.fixture(scope="module")
def reference():
    return train([])


def exported_monitors() -> list[type]:
    return [
        obj
        for name in dynlens.callbacks.__all__
        if inspect.isclass(obj := getattr(dynlens.callbacks, name))
        and issubclass(obj, dynlens.Monitor)
        and obj is not dynlens.Monitor
    ]


def defined_monitors() -> set[type]:
    """Every monitor defined in ``dynlens/callbacks``: the Monitor subclasses with reasons of
    their own (the classes between the base and a monitor have none)."""
    for path in Path(dynlens.callbacks.__file__).parent.glob("*.py"):
        importlib.import_module(f"dynlens.callbacks.{path.stem}")
    found, todo = set(), [dynlens.Monitor]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("dynlens.") and sub.reasons is not dynlens.events.Reason:
                found.add(sub)
    return found


def test_every_monitor_is_exported_covered_and_names_its_reasons():
    assert set(exported_monitors()) == defined_monitors() == set(FACTORIES)
    for monitor in FACTORIES:  # its reasons are the report's, under its name
        assert monitor.reasons.monitor == monitor.name
        assert dynlens.events.REASONS[monitor.name] is monitor.reasons


@pytest.mark.parametrize("monitor", [*FACTORIES, "all"], ids=lambda m: getattr(m, "__name__", m))
def test_no_observer_effect(monitor, reference):
    callbacks = [f() for f in FACTORIES.values()] if monitor == "all" else [FACTORIES[monitor]()]
    params, optimizer, buffers = train(callbacks)
    ref_params, ref_optimizer, ref_buffers = reference
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, ref_buffers, strict=True))
    assert same_optimizer_state(optimizer, ref_optimizer)


def test_perpgrad_is_the_exception_and_changes_training(reference):
    params, _, _ = train([dynlens.PerpGrad()])
    assert not all(torch.equal(a, b) for a, b in zip(params, reference[0], strict=True))


class Recorder(pl.Callback):
    """Keeps every dynlens value each monitor logged, by step (no logger needed)."""

    def __init__(self) -> None:
        self.points: dict[str, dict[int, float]] = {}

    def on_train_batch_end(self, trainer, *args) -> None:
        self._take(trainer)

    def on_validation_end(self, trainer, *args) -> None:
        self._take(trainer)

    def _take(self, trainer) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for key, value in trainer.callback_metrics.items():
            if key.startswith("dynlens/"):
                self.points.setdefault(key, {})[step] = float(value)


def fit_resumable(max_steps: int, ckpt_path=None, checkpoint_dir=None):
    torch.manual_seed(0)
    model = Model()
    model.drop.p = 0.0  # Lightning does not restore the global RNG on resume: no dropout here
    model.block.dropout.p = 0.0
    model.block.attention_dropout = 0.0
    monitors = [f() for f in FACTORIES.values()]
    recorder = Recorder()
    extra = []
    if checkpoint_dir is not None:  # a mid-run checkpoint, as a long job would write
        extra.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=checkpoint_dir, every_n_train_steps=STEPS // 2, save_top_k=-1
            )
        )
    trainer = quiet_trainer(
        max_steps=max_steps,
        logger=False,
        callbacks=[*monitors, recorder, *extra],
        enable_checkpointing=checkpoint_dir is not None,
    )
    full_batch = DataLoader(data(), batch_size=64)
    trainer.fit(model, full_batch, DataLoader(data(2, 32), batch_size=32), ckpt_path=ckpt_path)
    return monitors, recorder


def test_resume_continues_exactly_like_the_uninterrupted_run(tmp_path):
    whole, whole_points = fit_resumable(STEPS, checkpoint_dir=tmp_path)
    (half,) = tmp_path.glob(f"*step={STEPS // 2}.ckpt")
    resumed, resumed_points = fit_resumable(STEPS, ckpt_path=half)
    timing = {"dynlens/hessian/overhead"}  # wall-clock ratios differ from run to run
    for key, points in whole_points.points.items():
        if key in timing:
            continue
        later = {s: v for s, v in points.items() if s >= STEPS // 2}
        got = {s: v for s, v in resumed_points.points.get(key, {}).items() if s >= STEPS // 2}
        assert got == pytest.approx(later, rel=1e-6, abs=1e-9), key
    for a, b in zip(whole, resumed, strict=True):
        assert [e["reason"] for e in a.events] == [e["reason"] for e in b.events], type(a)


class NaNAtStep(Model):
    """The loss turns NaN at step 3, and the parameters with it; training must go on."""

    STEP = 3

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.STEP else loss


def fit_with(model: pl.LightningModule, callbacks: list, **kwargs) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = quiet_trainer(**{"max_steps": 8, "logger": False, "callbacks": callbacks, **kwargs})
    trainer.fit(model, DataLoader(data(), batch_size=32), DataLoader(data(2, 32), batch_size=32))
    return trainer


def logged_by_step(logger: MemoryLogger, monitor) -> dict[str, dict[int, float]]:
    """``{quantity: {step: value}}`` of what ``monitor`` sent to ``logger``."""
    head = f"dynlens/{monitor.name}/"
    found: dict[str, dict[int, float]] = {}
    for step, metrics in logger.calls:
        for key, value in metrics.items():
            if key.startswith(head):
                found.setdefault(key.removeprefix(head), {})[step] = value
    return found


def _after_the_nan(points: dict[int, float]) -> list[float]:
    return [v for s, v in points.items() if s > NaNAtStep.STEP]


#: What each monitor does when the loss turns NaN (and the parameters with it) at step 3: it
#: switches itself off with one warning, records the event, or logs what the NaN did to what it
#: measures. None of them may go on logging numbers that look like a healthy run's.
ON_NAN = {
    dynlens.HessianMonitor: lambda m, logged: (
        m.disabled_reason is not None and "nan at step 3" in m.disabled_reason
    ),
    dynlens.EarlyWarningMonitor: lambda m, logged: (
        (NaNAtStep.STEP, "divergence") in [(e["step"], e["reason"]) for e in m.events]
    ),
    dynlens.OptimizerMonitor: lambda m, logged: all(
        math.isnan(v) for v in _after_the_nan(logged["grad_norm"])
    ),
    dynlens.GrokkingMonitor: lambda m, logged: all(
        math.isnan(v) for v in _after_the_nan(logged["weight_norm"])
    ),
    dynlens.SoftmaxCollapseMonitor: lambda m, logged: all(
        math.isnan(v) for v in _after_the_nan(logged["headroom_min"])
    ),
    dynlens.LogitGrowthMonitor: lambda m, logged: (
        all(math.isnan(v) for v in _after_the_nan(logged["rms"]))
        and all(math.isnan(v) for v in _after_the_nan(logged["attn_max"]))
    ),
    # a model whose outputs are NaN predicts no class: accuracy 0, not the share of class 0
    dynlens.ContinualEvaluation: lambda m, logged: all(
        v == 0.0 for v in _after_the_nan(logged["acc_task_0"])
    ),
}


@pytest.mark.parametrize("monitor", list(FACTORIES), ids=lambda m: m.__name__)
def test_a_nan_loss_mid_run_is_said_once_and_training_goes_on(monitor):
    assert set(ON_NAN) == set(FACTORIES)
    instance, logger = FACTORIES[monitor](), MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit_with(NaNAtStep(), [instance], logger=logger)
    assert trainer.global_step == 8  # the run finished
    disabled = [w for w in caught if "disabled itself" in str(w.message)]
    assert len(disabled) <= 1  # at most one warning, then quiet
    assert (instance.disabled_reason is None) == (not disabled)
    logged = logged_by_step(logger, instance)
    if instance.disabled_reason is None:  # it measured on past the NaN
        assert any(_after_the_nan(points) for points in logged.values())
    assert ON_NAN[monitor](instance, logged)


def first_logged(monitor_factory, **kwargs) -> dict[str, tuple[int, float]]:
    """Train the suite's model with a fresh monitor; each quantity's first logged (step, value)."""
    instance, logger = monitor_factory(), MemoryLogger()
    trainer = fit_with(Model(), [instance], logger=logger, **kwargs)
    assert trainer.global_step == 8 and instance.disabled_reason is None
    logged = logged_by_step(logger, instance)
    return {key: min(points.items()) for key, points in logged.items()}


#: Quantities that are the precision's, not the model's: under bf16-mixed the logits are
#: bfloat16, and Softmax Collapse is measured against bfloat16's threshold.
THRESHOLD_KEYS = {"threshold", "headroom_median", "headroom_min", "collapse/threshold"}


@pytest.mark.parametrize("monitor", list(FACTORIES), ids=lambda m: m.__name__)
def test_bf16_mixed_precision_measures_what_float32_does_at_the_same_weights(monitor):
    # At step 0 both runs hold the same weights: what a monitor measures there under autocast
    # must be the float32 value up to bfloat16's rounding (8 significant bits); curvature is
    # measured outside autocast, in float32, so it must be the same to float32's. A monitor that
    # first logs after a validation (step 1) is compared there, one bf16 step later.
    full = first_logged(FACTORIES[monitor])
    half = first_logged(FACTORIES[monitor], precision="bf16-mixed")
    assert set(half) == set(full), "bf16-mixed logged other quantities than float32"
    tolerance = 1e-6 if monitor is dynlens.HessianMonitor else 2e-2
    first = min(step for step, _ in full.values())
    compared = 0
    for key, (step, value) in full.items():
        if step != first or half[key][0] != first or key in THRESHOLD_KEYS:
            continue  # later the weights differ; thresholds are the precision's
        assert half[key][1] == pytest.approx(value, rel=tolerance, abs=1e-6), key
        compared += 1
    assert compared >= 3
    bf16 = dynlens.collapse.collapse_threshold(torch.bfloat16)
    f32 = dynlens.collapse.collapse_threshold(torch.float32)
    for key in THRESHOLD_KEYS & set(full):
        if key.endswith("threshold"):  # measured in the logits' own dtype, and reported
            assert (full[key][1], half[key][1]) == pytest.approx((f32, bf16)), key
        else:  # headroom = threshold − logit gap: the gap is the model's
            gap_full, gap_half = f32 - full[key][1], bf16 - half[key][1]
            assert gap_half == pytest.approx(gap_full, rel=2e-2), key


class WithTest(Model):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())


@pytest.mark.parametrize("monitor", list(FACTORIES), ids=lambda m: m.__name__)
def test_fast_dev_run_validate_and_test_only(monitor):
    instance = FACTORIES[monitor]()
    torch.manual_seed(0)
    loader = DataLoader(data(), batch_size=32)
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    trainer = pl.Trainer(accelerator="cpu", fast_dev_run=True, callbacks=[instance], **quiet)
    trainer.fit(WithTest(), loader, DataLoader(data(2, 32), batch_size=32))
    assert trainer.global_step == 1 and instance.disabled_reason is None
    # evaluation-only runs measure nothing and do not fail
    for run in ("validate", "test"):
        fresh = FACTORIES[monitor]()
        evaluator = pl.Trainer(accelerator="cpu", callbacks=[fresh], **quiet)
        getattr(evaluator, run)(WithTest(), loader, verbose=False)
        assert fresh.disabled_reason is None
        assert not [k for k in evaluator.callback_metrics if k.startswith("dynlens/")], run


# ------------------------------------------------------ accumulation, optimizers, reuse, twice
class MemoryLogger(pl.loggers.Logger):
    """Every ``log_metrics`` call, in memory: which key was logged at which step, how often."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def steps(self) -> dict[str, list[int]]:
        """The steps at which each dynlens key was logged, in order (duplicates kept)."""
        found: dict[str, list[int]] = {}
        for step, metrics in self.calls:
            for key in metrics:
                if key.startswith("dynlens/"):
                    found.setdefault(key, []).append(step)
        return found


def assert_logged_once_per_step(logger: MemoryLogger, allowed: set[int]) -> None:
    steps = logger.steps()
    assert steps, "nothing logged"
    for key, at in steps.items():
        assert len(at) == len(set(at)), f"{key} logged twice at one step: {at}"
        assert set(at) <= allowed, f"{key} logged at {sorted(set(at) - allowed)}"


@pytest.mark.parametrize("monitor", list(FACTORIES), ids=lambda m: m.__name__)
def test_gradient_accumulation_measures_optimizer_steps(monitor):
    # 8 micro-batches of 8 per epoch, 2 per optimizer step: one epoch of 4 optimizer steps
    instance, logger = FACTORIES[monitor](), MemoryLogger()
    torch.manual_seed(0)
    trainer = quiet_trainer(
        max_steps=4, logger=logger, callbacks=[instance], accumulate_grad_batches=2
    )
    trainer.fit(Model(), DataLoader(data(), batch_size=8), DataLoader(data(2, 32), batch_size=32))
    assert trainer.global_step == 4 and instance.disabled_reason is None
    # logged per optimizer step (Lightning's logging step counts those), never per micro-batch
    assert_logged_once_per_step(logger, allowed={0, 1, 2, 3, 4})


class TwoOptimizers(Model):
    """Manual optimisation with two optimizers (the way Lightning 2 runs several of them)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        body, head = self.optimizers()
        x, y = batch
        logits = self(x)
        self.log("train_acc", (logits.argmax(-1) == y).float().mean())
        loss = F.cross_entropy(logits, y)
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        body.step()
        head.step()
        return {"loss": loss.detach(), "logits": logits.detach()}

    def configure_optimizers(self):
        head = list(self.head.parameters())
        body = [p for name, p in self.named_parameters() if not name.startswith("head.")]
        return torch.optim.Adam(body, lr=0.01), torch.optim.SGD(head, lr=0.1)


def manual_loss(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


@pytest.mark.parametrize("monitor", list(FACTORIES), ids=lambda m: m.__name__)
def test_manual_optimization_with_two_optimizers(monitor):
    if monitor is dynlens.HessianMonitor:
        # it replays training_step, which steps the optimizers itself: refused with the fix
        with pytest.raises(dynlens.ConfigurationError, match=r"manual optimization.*loss_fn="):
            fit_with(TwoOptimizers(), [FACTORIES[monitor]()])
        instance = dynlens.HessianMonitor(
            every_n_steps=1, num_probes=2, max_iter=3, loss_fn=manual_loss, verbose=False
        )
    else:
        instance = FACTORIES[monitor]()
    logger = MemoryLogger()
    trainer = fit_with(TwoOptimizers(), [instance], logger=logger)
    # each batch steps both optimizers: global_step counts optimizer steps, the logging step
    # (and the monitors' cadence) counts batches
    batches = trainer.fit_loop.epoch_loop._batches_that_stepped
    assert trainer.global_step == 8 and batches == 4
    assert instance.disabled_reason is None
    assert_logged_once_per_step(logger, allowed=set(range(batches + 1)))


@pytest.mark.parametrize("monitor", list(FACTORIES), ids=lambda m: m.__name__)
def test_a_trainer_reused_across_fit_calls(monitor):
    if monitor is dynlens.ContinualEvaluation:  # each fit trains the next task of eval_sets
        instance = dynlens.ContinualEvaluation(
            {0: data(1, 32), 1: data(3, 32)}, subset_size=16, verbose=False
        )
    else:
        instance = FACTORIES[monitor]()
    logger = MemoryLogger()
    torch.manual_seed(0)
    model = Model()
    trainer = quiet_trainer(max_steps=4, logger=logger, callbacks=[instance])
    train_loader = DataLoader(data(), batch_size=32)
    val_loader = DataLoader(data(2, 32), batch_size=32)
    trainer.fit(model, train_loader, val_loader)
    first = {key: list(at) for key, at in logger.steps().items()}
    trainer.fit_loop.epoch_loop.max_steps = 8  # the same Trainer, training on
    trainer.fit(model, train_loader, val_loader)
    assert trainer.global_step == 8 and instance.disabled_reason is None
    assert_logged_once_per_step(logger, allowed=set(range(9)))
    later = logger.steps()
    assert any(max(at) > max(first.get(key, [-1])) for key, at in later.items()), (
        "nothing logged by the second fit"
    )
    reasons = [event["reason"] for event in instance.events]
    assert len(reasons) == len({(e["step"], e["reason"]) for e in instance.events}), reasons


@pytest.mark.parametrize("monitor", list(FACTORIES), ids=lambda m: m.__name__)
def test_a_monitor_added_twice(monitor):
    # the same configuration twice would write every key twice: Lightning refuses it by state_key
    with pytest.raises(RuntimeError, match="state_key"):
        fit_with(Model(), [FACTORIES[monitor](), FACTORIES[monitor]()], max_steps=1)
    # two configurations that differ (here the prefix) run side by side, each under its own keys
    twin = FACTORIES[monitor]()
    twin.prefix = "twin"
    trainer = fit_with(Model(), [FACTORIES[monitor](), twin], max_steps=2)
    keys = set(trainer.callback_metrics)
    family = f"/{twin.name}/"
    assert any(k.startswith("dynlens" + family) for k in keys)
    assert any(k.startswith("twin" + family) for k in keys)


class BrokenLogger(MemoryLogger):
    """A logger backend that rejects the monitors' writes (as some reject unusual key names)."""

    def log_metrics(self, metrics, step=None) -> None:
        if any(key.startswith("dynlens/") for key in metrics):
            raise ValueError("invalid metric name")
        super().log_metrics(metrics, step)


@pytest.mark.parametrize("monitor", list(FACTORIES), ids=lambda m: m.__name__)
def test_a_failing_logger_does_not_stop_the_monitor(monitor):
    # Logging happens on rank 0 only: a monitor disabled by it there would leave the other ranks
    # of a DDP job waiting in its next collective. It warns once and keeps measuring.
    instance = FACTORIES[monitor]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit_with(Model(), [instance], logger=BrokenLogger(), max_steps=4)
    assert instance.disabled_reason is None
    assert any(k.startswith(f"dynlens/{instance.name}/") for k in trainer.callback_metrics)
    failed = [w for w in caught if "BrokenLogger.log_metrics failed" in str(w.message)]
    assert len(failed) == 1 and "ValueError: invalid metric name" in str(failed[0].message)


def test_monitors_do_not_capture_each_others_forward_passes():
    # HessianMonitor replays training_step and ContinualEvaluation runs evaluations, both inside
    # training hooks. Listed so that the replays fall inside the capturing monitors' windows
    # (after their batch start) and the evaluations too (before their batch end), those forward
    # passes must still not count as training logits or attention layers.
    def capturing():
        return [
            FACTORIES[dynlens.SoftmaxCollapseMonitor](),
            FACTORIES[dynlens.LogitGrowthMonitor](),
        ]

    alone = Recorder()
    torch.manual_seed(0)
    fit_with(Model(), [*capturing(), alone], max_steps=4)
    together = Recorder()
    others = [FACTORIES[dynlens.ContinualEvaluation](), FACTORIES[dynlens.HessianMonitor]()]
    torch.manual_seed(0)
    fit_with(Model(), [others[0], *capturing(), others[1], together], max_steps=4)
    for key, points in alone.points.items():
        assert together.points[key] == pytest.approx(points, rel=1e-6), key
    layers = {k for k in together.points if k.startswith("dynlens/logits/attn_max/")}
    assert layers == {"dynlens/logits/attn_max/block"}


# ------------------------------------------------------------------------------- sharding
class FSDPStrategy(pl.strategies.SingleDeviceStrategy):
    """Stands in for Lightning's FSDPStrategy (which needs a GPU): the monitors take their
    sharded-parameter paths, with one rank holding the only shard."""


def sharding() -> dict:
    # the strategy brings its CPU accelerator, so a machine with a GPU runs this on the CPU too
    cpu = pl.accelerators.CPUAccelerator()
    return {"strategy": FSDPStrategy(torch.device("cpu"), accelerator=cpu), "accelerator": "auto"}


@pytest.mark.parametrize(
    "monitor",
    [m for m in FACTORIES if m is not dynlens.HessianMonitor],
    ids=lambda m: m.__name__,
)
def test_cheap_monitors_under_a_parameter_sharding_strategy(monitor):
    def make():
        if monitor is dynlens.SoftmaxCollapseMonitor:  # per-layer cosines need whole tensors
            return dynlens.SoftmaxCollapseMonitor(
                every_n_steps=1, logits_module="head", verbose=False
            )
        return FACTORIES[monitor]()

    plain, sharded = Recorder(), Recorder()
    torch.manual_seed(0)
    fit_with(Model(), [make(), plain], max_steps=4)
    torch.manual_seed(0)
    instance = make()
    fit_with(Model(), [instance, sharded], max_steps=4, **sharding())
    assert instance.disabled_reason is None and sharded.points
    for key, points in plain.points.items():  # the shards' sums of one shard: the same values
        if key.endswith("/update_ratio"):  # replays whole parameters: not under sharding
            assert key not in sharded.points and instance.fired("no_update_ratio")
            continue
        assert sharded.points[key] == pytest.approx(points, rel=1e-6), key


def test_sharded_parameters_refuse_what_needs_whole_tensors():
    with pytest.raises(dynlens.ConfigurationError, match=r"per_layer=True.*FSDPStrategy shards"):
        fit_with(Model(), [FACTORIES[dynlens.SoftmaxCollapseMonitor]()], **sharding())
    with pytest.raises(dynlens.ConfigurationError, match=r"FSDPStrategy shards them"):
        fit_with(Model(), [FACTORIES[dynlens.HessianMonitor]()], **sharding())


@pytest.mark.parametrize("subset_size", [None, 7])
def test_sharded_evaluation_gives_every_rank_as_many_samples(subset_size):
    # under FSDP each forward pass is a collective: every rank must run as many batches
    evaluation = dynlens.ContinualEvaluation(
        {0: data(1, 33)}, subset_size=subset_size, subset="fixed"
    )
    evaluation.metrics.start_task(0)
    shards = [evaluation._subset_indices(0, 2, rank, sharded=True) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == (33 if subset_size is None else 7) // 2
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    # replicated parameters (DDP): every sample counts, strides may differ by one
    whole = [evaluation._subset_indices(0, 2, rank) for rank in (0, 1)]
    assert sum(len(s) for s in whole) == (33 if subset_size is None else 7)
