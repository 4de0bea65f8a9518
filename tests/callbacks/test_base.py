import re
import warnings

import pytest
import torch

from dynlens import ConfigurationError, GrokkingMonitor, Monitor
from dynlens.callbacks.base import fail_soft
from dynlens.callbacks.layout import layout, tag_regex
from dynlens.events import Reason
from tests.helpers import (
    PACKAGES,
    csv_metrics,
    custom_scalars_layout,
    lightning,
    one_batch_loader,
    scalars,
    scripted_module,
    tb_logger,
    texts,
    trainer,
)


class CounterReason(Reason):
    FOUR = "four"


class Counter(Monitor):
    """Logs the optimizer step count as ``value`` and a derived ``value_stderr``."""

    name = "counter"
    reasons = CounterReason

    def __init__(self, fail_at=None, **kwargs):
        super().__init__(**kwargs)
        self.fail_at = fail_at
        self.calls = []

    def panel(self):
        return {"value": self.multiline("value"), "band": self.margin("value", "low", "high")}

    @fail_soft
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.is_due(trainer):
            return
        self.calls.append(trainer.global_step)
        if self.fail_at is not None and trainer.global_step >= self.fail_at:
            raise FloatingPointError("simulated failure")
        value = torch.tensor(float(trainer.global_step))
        self.log_metrics(
            trainer,
            {"value": value, "value_stderr": value / 10, "low": value - 1, "high": value + 1},
        )
        if trainer.global_step == 4:
            self.log_event(trainer, trainer.global_step - 1, "four", "reached four steps")


def rising(step):
    return min(1.0, step / 4)


def fit(callbacks, logger, max_steps=9, package="pytorch_lightning", ckpt_path=None, **kwargs):
    t = trainer(package, max_steps=max_steps, logger=logger, callbacks=callbacks, **kwargs)
    module = scripted_module(rising, rising, package=package)
    t.fit(module, one_batch_loader(), one_batch_loader(), ckpt_path=ckpt_path)
    return t


@pytest.mark.parametrize("package", PACKAGES)
def test_cadence_and_step_axis_match_lightning_logging(tmp_path, package):
    monitor = Counter(every_n_steps=3)
    fit([monitor], tb_logger(tmp_path, package), package=package, check_val_every_n_epoch=100)
    logged = scalars(tmp_path)
    # measured at steps 0, 3, 6 on Lightning's logging axis: the same step as the module's own
    # train_acc logged in that batch's training_step
    assert [s for s, _ in logged["dynlens/counter/value"]] == [0, 3, 6]
    assert [v for _, v in logged["dynlens/counter/value"]] == [1.0, 4.0, 7.0]  # global_step then
    assert {s for s, _ in logged["train_acc"]} >= {0, 3, 6}
    assert monitor.calls == [1, 4, 7]


def test_every_logger_and_callback_metrics_receive_the_values(tmp_path):
    pl = lightning()
    csv = pl.loggers.CSVLogger(str(tmp_path / "csv"), name="", version="")
    t = fit([Counter(every_n_steps=2)], [tb_logger(tmp_path / "tb"), csv], max_steps=5)
    rows = [r for r in csv_metrics(tmp_path / "csv") if r.get("dynlens/counter/value")]
    assert [(int(r["step"]), float(r["dynlens/counter/value"])) for r in rows] == [
        (0, 1.0),
        (2, 3.0),
        (4, 5.0),
    ]
    assert scalars(tmp_path / "tb")["dynlens/counter/value"] == [(0, 1.0), (2, 3.0), (4, 5.0)]
    assert t.callback_metrics["dynlens/counter/value"].item() == 5.0


def test_early_stopping_can_monitor_a_dynlens_metric(tmp_path):
    pl = lightning()
    stopper = pl.callbacks.EarlyStopping(
        monitor="dynlens/counter/value",
        mode="max",
        stopping_threshold=2.5,  # stops once value > 2.5, i.e. at step 3
        check_on_train_epoch_end=True,
    )
    t = fit([Counter(), stopper], False, max_steps=50, check_val_every_n_epoch=100)
    assert t.global_step == 3


def test_prefix_is_configurable(tmp_path):
    fit([Counter(prefix="lab/")], tb_logger(tmp_path), max_steps=1)
    assert "lab/counter/value" in scalars(tmp_path)


def test_one_merged_layout_per_run_whose_regexes_match_exactly_the_logged_tags(tmp_path):
    grok = GrokkingMonitor(verbose=False)
    fit([Counter(), grok], tb_logger(tmp_path), max_steps=10, check_val_every_n_epoch=2)
    assert grok.report.generalized_step is not None  # so every grokking tag was logged
    read = custom_scalars_layout(tmp_path)
    logged = set(scalars(tmp_path))
    categories = {c.title: c for c in read.category}
    assert set(categories) == {"dynlens/counter", "dynlens/grokking"}

    covered = set()
    for category in read.category:
        for chart in category.chart:
            if chart.HasField("multiline"):
                for regex in chart.multiline.tag:
                    hits = {t for t in logged if re.match(regex, t)}
                    assert len(hits) == 1, (regex, hits)  # `value` must not match `value_stderr`
                    covered |= hits
            else:
                for series in chart.margin.series:
                    assert {series.value, series.lower, series.upper} <= logged
                    covered |= {series.value, series.lower, series.upper}
    ours = {t for t in logged if t.startswith("dynlens/")}
    assert ours - covered == {"dynlens/counter/value_stderr"}  # logged but given no chart
    assert "dynlens/grokking/memorized_step" in covered


def test_layout_is_what_the_monitors_describe():
    merged = layout([Counter(), GrokkingMonitor()])
    assert merged["dynlens/counter"]["value"] == ["Multiline", ["^dynlens/counter/value$"]]
    assert merged["dynlens/counter"]["band"] == [
        "Margin",
        ["dynlens/counter/value", "dynlens/counter/low", "dynlens/counter/high"],
    ]
    assert re.match(tag_regex("a/b.c"), "a/b.c") and not re.match(tag_regex("a/b.c"), "a/bxc")


def test_events_are_text_in_tensorboard_and_kept_in_state(tmp_path, capsys):
    monitor = Counter()
    fit([monitor], tb_logger(tmp_path), max_steps=5)
    assert texts(tmp_path, "dynlens/counter/events") == [(3, "`four` · step 3: reached four steps")]
    assert monitor.state_dict()["events"] == [
        {"step": 3, "reason": "four", "message": "reached four steps"}
    ]
    assert "counter · step 3: reached four steps" in capsys.readouterr().out


def test_quiet_monitor_prints_nothing(tmp_path, capsys):
    fit([Counter(verbose=False)], tb_logger(tmp_path), max_steps=5)
    assert "reached four steps" not in capsys.readouterr().out


def test_no_logger_warns_once_for_all_monitors():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        fit([Counter(), Counter(prefix="other")], False, max_steps=2)
    ours = [w for w in caught if "has no logger" in str(w.message)]
    assert len(ours) == 1


def test_a_failing_monitor_warns_once_and_training_goes_on():
    monitor = Counter(fail_at=3)
    with pytest.warns(RuntimeWarning, match="Counter disabled itself.*FloatingPointError") as rec:
        t = fit([monitor], False, max_steps=8)
    assert t.global_step == 8
    assert monitor.calls == [1, 2, 3]  # no calls after it disabled itself
    assert len([w for w in rec if "disabled itself" in str(w.message)]) == 1
    assert monitor.disabled_reason.startswith("FloatingPointError in `on_train_batch_end`")


def test_configuration_errors_are_not_swallowed():
    class Broken(Counter):
        @fail_soft
        def on_train_start(self, trainer, pl_module):
            raise ConfigurationError("pass `logits_module='head'`")

    with pytest.raises(ConfigurationError, match="logits_module"):
        fit([Broken()], False, max_steps=2)


def test_sanity_check_is_never_measured():
    monitor = Counter()
    fit([monitor], False, max_steps=2, num_sanity_val_steps=2)
    assert monitor.calls == [1, 2]


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_every_n_steps_is_validated_with_the_fix_in_the_message(value):
    with pytest.raises(ConfigurationError, match="Expected `every_n_steps` to be a positive int"):
        Counter(every_n_steps=value)


def test_same_configuration_twice_is_refused_by_lightning():
    with pytest.raises(RuntimeError, match="state_key"):
        fit([GrokkingMonitor(), GrokkingMonitor()], False, max_steps=1)
    # different configurations coexist
    fit([GrokkingMonitor(), GrokkingMonitor(threshold=0.9)], False, max_steps=1)


def test_state_key_is_built_once_per_set_up_from_the_configuration():
    def builds(max_steps, monitor=None):
        monitor = monitor or GrokkingMonitor()
        calls, fields = [], monitor.state_key_fields
        monitor.state_key_fields = lambda: calls.append(1) or fields()
        fit([monitor], False, max_steps=max_steps)
        return len(calls), monitor

    # Lightning names every hook call after the key; it is built before and at set-up only,
    # however many steps follow
    short, _ = builds(1)
    long, monitor = builds(6)
    assert short == long
    assert monitor.state_key == GrokkingMonitor().state_key
    # a new set-up builds it again from the configuration as it is then
    monitor.threshold = 0.9
    builds(1, monitor)
    assert monitor.state_key == GrokkingMonitor(threshold=0.9).state_key


def test_monitor_state_survives_a_checkpoint(tmp_path):
    first = Counter()
    t = fit([first], False, max_steps=5)
    t.save_checkpoint(tmp_path / "c.ckpt")
    checkpoint = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert checkpoint["callbacks"][first.state_key]["events"] == first.events
    restored = Counter()
    fit([restored], False, max_steps=6, ckpt_path=tmp_path / "c.ckpt")
    assert restored.events == first.events and restored.calls == [6]
