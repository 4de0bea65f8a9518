import pytest
import torch

from dynlens import ConfigurationError, GrokkingMonitor
from tests.helpers import (
    PACKAGES,
    csv_metrics,
    lightning,
    one_batch_loader,
    scalars,
    scripted_module,
    tb_logger,
    texts,
    trainer,
)


def conformance_monitor(eval_set):
    """A small GrokkingMonitor for the monitor-contract suite
    (``tests/test_conformance.py``): its model has attention, BatchNorm, dropout and the logits
    from ``head``; ``eval_set`` is one of its evaluation sets."""
    return GrokkingMonitor(verbose=False)


def train_curve(step: int) -> float:  # first ≥ 0.99 at step 20
    return min(1.0, step / 20)


def val_curve(step: int) -> float:  # first ≥ 0.99 at step 60
    return 0.0 if step < 40 else min(1.0, (step - 40) / 20)


def fit(tmp_path, monitor, *, package="pytorch_lightning", max_steps=80, every=5, **kwargs):
    module = scripted_module(train_curve, val_curve, package=package)
    t = trainer(
        package,
        max_steps=max_steps,
        logger=tb_logger(tmp_path, package),
        callbacks=[monitor],
        check_val_every_n_epoch=every,
        **kwargs,
    )
    t.fit(module, one_batch_loader(), one_batch_loader())
    return t


def first_step_at_least(points, level):
    return next(step for step, value in points if value >= level)


@pytest.mark.parametrize("package", PACKAGES)
def test_logged_steps_match_the_logged_curves(tmp_path, package):
    monitor = GrokkingMonitor(verbose=False)
    t = fit(tmp_path, monitor, package=package)
    logged = scalars(tmp_path)
    train, val = logged["dynlens/grokking/train_acc"], logged["dynlens/grokking/val_acc"]

    # the monitor's curves sit on the run's own step axis, point for point
    user_train, user_val = dict(logged["train_acc"]), dict(logged["val_acc"])
    assert len(train) == len(val) == 16
    for (step, value), (step_v, value_v) in zip(train, val, strict=True):
        assert step == step_v
        assert value == pytest.approx(user_train[step]) and value_v == pytest.approx(user_val[step])

    memorized, generalized = first_step_at_least(train, 0.99), first_step_at_least(val, 0.99)
    assert memorized < generalized
    assert logged["dynlens/grokking/memorized_step"][-1][1] == memorized
    assert logged["dynlens/grokking/generalized_step"][-1][1] == generalized
    assert logged["dynlens/grokking/delay"][-1][1] == generalized - memorized
    # detected steps are logged from the step they are found on, not before
    assert logged["dynlens/grokking/memorized_step"][0][0] == memorized
    phases = dict(logged["dynlens/grokking/phase"])
    assert (phases[memorized - 5], phases[memorized], phases[generalized]) == (0, 1, 2)

    report = monitor.report
    assert (report.memorized_step, report.generalized_step) == (memorized, generalized)
    assert report.kind == "comprehension"  # delay far below 1000 steps
    assert t.callback_metrics["dynlens/grokking/generalized_step"] == generalized

    events = texts(tmp_path, "dynlens/grokking/events")
    assert [step for step, _ in events] == [memorized, generalized, train[-1][0]]
    assert "memorised" in events[0][1] and "generalised" in events[1][1]
    assert [e["reason"] for e in monitor.events] == ["memorized", "generalized", "summary"]


def test_grokking_delay_argument_and_console_line(tmp_path, capsys):
    monitor = GrokkingMonitor(grokking_delay=30)
    fit(tmp_path, monitor)
    assert monitor.report.kind == "grokking"
    out = capsys.readouterr().out
    assert "memorised" in out and "generalised" in out and "grokking" in out


def test_keys_are_detected_with_other_names(tmp_path):
    module = scripted_module(train_curve, val_curve, train_key="train/acc", val_key="val/acc")
    monitor = GrokkingMonitor(verbose=False)
    t = trainer(max_steps=30, logger=False, callbacks=[monitor], check_val_every_n_epoch=5)
    with pytest.warns(UserWarning, match="no logger"):
        t.fit(module, one_batch_loader(), one_batch_loader())
    assert monitor.steps == [4, 9, 14, 19, 24, 29]
    assert monitor.train_acc == pytest.approx([train_curve(s) for s in monitor.steps])


def test_explicit_keys(tmp_path):
    module = scripted_module(train_curve, val_curve, train_key="fit_score", val_key="heldout")
    monitor = GrokkingMonitor(train_acc_key="fit_score", val_acc_key="heldout", verbose=False)
    t = trainer(max_steps=10, logger=False, callbacks=[monitor], check_val_every_n_epoch=5)
    t.fit(module, one_batch_loader(), one_batch_loader())
    assert monitor.val_acc == pytest.approx([val_curve(s + 1) for s in monitor.steps])


def test_missing_keys_fail_loudly_listing_what_exists():
    module = scripted_module(train_curve, val_curve, train_key="loss_a", val_key="val_score")
    t = trainer(
        max_steps=10, logger=False, callbacks=[GrokkingMonitor()], check_val_every_n_epoch=5
    )
    with pytest.raises(ConfigurationError) as info:
        t.fit(module, one_batch_loader(), one_batch_loader())
    message = str(info.value)
    assert "training and validation accuracy" in message
    assert "['loss_a', 'val_score']" in message and "train_acc_key=" in message


def test_stop_after_generalization(tmp_path):
    monitor = GrokkingMonitor(stop_after_generalization=10, verbose=False)
    t = fit(tmp_path, monitor, max_steps=500)
    generalized = monitor.report.generalized_step
    assert generalized is not None
    assert monitor.steps[-1] == generalized + 10
    assert t.global_step < 100
    assert monitor.events[-2]["reason"] == "stopped"


def test_sanity_check_and_validate_only_runs_are_not_recorded(tmp_path):
    monitor = GrokkingMonitor(verbose=False)
    t = trainer(
        max_steps=5,
        logger=False,
        callbacks=[monitor],
        num_sanity_val_steps=1,
        check_val_every_n_epoch=5,
    )
    t.fit(scripted_module(train_curve, val_curve), one_batch_loader(), one_batch_loader())
    assert monitor.steps == [4]  # the sanity check at step 0 left no point
    t.validate(scripted_module(train_curve, val_curve), one_batch_loader(), verbose=False)
    assert monitor.steps == [4]


def test_resume_from_a_mid_run_checkpoint_restores_the_detector(tmp_path):
    pl = lightning()
    whole = GrokkingMonitor(verbose=False)
    fit(tmp_path / "whole", whole, max_steps=80)

    first = GrokkingMonitor(verbose=False)
    t = fit(tmp_path / "first", first, max_steps=35)
    assert first.report.memorized_step is not None and first.report.generalized_step is None
    ckpt = tmp_path / "mid.ckpt"
    t.save_checkpoint(ckpt)

    resumed = GrokkingMonitor(verbose=False)
    module = scripted_module(train_curve, val_curve)
    t2 = trainer(max_steps=80, logger=False, callbacks=[resumed], check_val_every_n_epoch=5)
    t2.fit(module, one_batch_loader(), one_batch_loader(), ckpt_path=ckpt)
    assert resumed.steps == whole.steps
    assert resumed.train_acc == whole.train_acc and resumed.val_acc == whole.val_acc
    assert resumed.report == whole.report
    # the memorisation event came from the first run and was not announced again
    assert [e["reason"] for e in resumed.events] == [
        "memorized",
        "summary",
        "generalized",
        "summary",
    ]
    assert pl is not None


def test_state_dict_round_trip():
    monitor = GrokkingMonitor()
    monitor.steps, monitor.train_acc, monitor.val_acc = [0, 10, 20], [0.5, 1.0, 1.0], [0, 0, 1.0]
    monitor.events = [{"step": 10, "reason": "memorized", "message": "m"}]
    other = GrokkingMonitor()
    other.load_state_dict(monitor.state_dict())
    assert other.report == monitor.report and other.events == monitor.events
    other.load_state_dict({})  # an older checkpoint without these entries
    assert other.steps == [] and other.report.kind == "confusion"


def test_state_key_identifies_the_configuration():
    assert GrokkingMonitor().state_key == GrokkingMonitor().state_key
    assert GrokkingMonitor().state_key != GrokkingMonitor(val_acc_key="val/acc").state_key
    assert GrokkingMonitor().state_key != GrokkingMonitor(threshold=0.9).state_key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"grokking_delay": -1}, "grokking_delay"),
        ({"stop_after_generalization": -3}, "stop_after_generalization"),
        ({"train_acc_key": ""}, "train_acc_key"),
        ({"prefix": ""}, "prefix"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        GrokkingMonitor(**kwargs)


def test_csv_logger_receives_the_same_points(tmp_path):
    pl = lightning()
    monitor = GrokkingMonitor(verbose=False)
    module = scripted_module(train_curve, val_curve)
    t = trainer(
        max_steps=20,
        logger=pl.loggers.CSVLogger(str(tmp_path)),
        callbacks=[monitor],
        check_val_every_n_epoch=5,
    )
    t.fit(module, one_batch_loader(), one_batch_loader())
    rows = [r for r in csv_metrics(tmp_path) if r.get("dynlens/grokking/train_acc")]
    assert [int(r["step"]) for r in rows] == monitor.steps
    assert [float(r["dynlens/grokking/train_acc"]) for r in rows] == pytest.approx(
        monitor.train_acc
    )
    assert torch.is_tensor(t.callback_metrics["dynlens/grokking/val_acc"])
