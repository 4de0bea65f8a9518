"""Every monitor of the conformance suite resumes from a mid-run checkpoint to the values and
events of an uninterrupted run.

One real Trainer run of ``STEPS`` steps is the reference. A second run, configured for the same
``STEPS``, writes a checkpoint at step ``SPLIT`` and then crashes; a third, new Trainer with a
fresh monitor from the same factory resumes from that checkpoint. Every ``dynlens/`` scalar its
CSV logger wrote after ``SPLIT`` and every event of the resumed monitor must be those of the
reference run, so a field a monitor forgets to keep in its state shows as a differing value.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from tests.helpers import csv_metrics
from tests.test_conformance import FACTORIES, Model, data, quiet_trainer

STEPS = 10
# Every factory measures every step (`every_n_steps=1`, or ContinualEvaluation's default of 1,
# GrokkingMonitor at each validation), so each logs on both sides of the split. Full-batch data
# makes every step an epoch: the checkpoint falls on an epoch boundary, where Lightning's resume
# is exact (no mid-epoch dataloader position to restore). The checkpoint is written after
# SPLIT optimizer steps, at that batch's end (`every_n_train_steps`): on resume Lightning runs
# the epoch's validation, then the batch logged at step SPLIT (steps count from 0). A checkpoint
# written at `on_validation_end` instead (`every_n_epochs`) resumes with Lightning's logging step
# one ahead of the uninterrupted run's, its own `self.log` values as much as the monitors'.
SPLIT = 5

# Wall-clock ratios (measurement time ÷ training time) differ from run to run. HessianMonitor's
# factory measures on a fixed `every_n_steps` cadence, so its clock decides no step and no other
# value; only this ratio is left out. (Its default route="tuned" would time the HVP routes on
# CPU, but only from 5 probes on: the factory's 2 probes never run that timed trial.)
TIMING = {"dynlens/hessian/overhead"}


class Interrupted(Exception):
    pass


class Crash(pl.Callback):
    """Ends the run abruptly at the start of step ``at``, as a killed job would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            raise Interrupted


def fit(monitor, log_dir, *, callbacks=(), ckpt_path=None):
    """A run configured for ``STEPS`` steps (the interrupted one too): the conformance suite's
    model and data, deterministically."""
    pl.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    model = Model()
    # Lightning does not restore the global RNG on resume: no dropout here
    model.drop.p = 0.0
    model.block.dropout.p = 0.0
    model.block.attention_dropout = 0.0
    trainer = quiet_trainer(
        max_steps=STEPS,
        logger=pl.loggers.CSVLogger(str(log_dir), name="", version=""),
        callbacks=[*([] if monitor is None else [monitor]), *callbacks],
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        deterministic=True,
    )
    full_batch = DataLoader(data(), batch_size=64)
    trainer.fit(model, full_batch, DataLoader(data(2, 32), batch_size=32), ckpt_path=ckpt_path)
    return trainer, model


def logged(log_dir) -> dict[str, dict[int, float]]:
    """Every ``dynlens/`` value in the run's metrics.csv: ``{key: {step: value}}``."""
    found: dict[str, dict[int, float]] = {}
    for row in csv_metrics(log_dir):
        for key, value in row.items():
            if key.startswith("dynlens/") and value != "":
                at = found.setdefault(key, {})
                step = int(row["step"])
                assert at.get(step, float(value)) == float(value), f"{key} twice at {step}"
                at[step] = float(value)
    return found


def resumed_run(factory, tmp_path):
    """Crash a run after its step-``SPLIT`` checkpoint, then resume it with a fresh monitor."""
    checkpoints = tmp_path / "checkpoints"
    save = pl.callbacks.ModelCheckpoint(
        dirpath=checkpoints, every_n_train_steps=SPLIT, save_top_k=-1
    )
    with pytest.raises(Interrupted):
        fit(factory(), tmp_path / "interrupted", callbacks=[save, Crash(SPLIT)])
    (checkpoint,) = checkpoints.glob(f"*step={SPLIT}.ckpt")
    monitor = factory()
    trainer, model = fit(monitor, tmp_path / "resumed", ckpt_path=checkpoint)
    return monitor, trainer, model


def weights(model) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def test_training_itself_resumes_bit_identically(tmp_path):
    # the premise of the monitors' test: without any monitor, the resumed weights are exact
    _, whole = fit(None, tmp_path / "whole")
    _, _, resumed = resumed_run(lambda: None, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(weights(whole), weights(resumed), strict=True))


@pytest.mark.parametrize("monitor", list(FACTORIES), ids=lambda m: m.__name__)
def test_resume_logs_what_the_uninterrupted_run_logs(monitor, tmp_path):
    factory = FACTORIES[monitor]
    whole = factory()
    whole_trainer, whole_model = fit(whole, tmp_path / "whole")
    resumed, trainer, model = resumed_run(factory, tmp_path)
    assert trainer.global_step == whole_trainer.global_step == STEPS
    assert whole.disabled_reason is None and resumed.disabled_reason is None
    # no observer effect, and an exact resume: the same weights at the end
    assert all(torch.equal(a, b) for a, b in zip(weights(whole_model), weights(model), strict=True))

    expected = logged(tmp_path / "whole")
    got = logged(tmp_path / "resumed")
    assert set(got) == set(expected), "keys logged only by one of the two runs"
    keys = sorted(set(expected) - TIMING)
    assert any(s < SPLIT for k in keys for s in expected[k]), "nothing logged before the split"
    for key in keys:
        later = {s: v for s, v in expected[key].items() if s >= SPLIT}
        assert later, f"{key} logged nothing from step {SPLIT} on"
        # exact: the same computation on the same weights, in the same order; whatever the
        # resumed run logged (the re-run validation of step SPLIT - 1 too) is the reference's
        assert {s: v for s, v in got[key].items() if s >= SPLIT} == later, key
        assert got[key] == {s: expected[key][s] for s in got[key]}, key
    # events are in state: the resumed monitor has the whole run's, those before SPLIT too
    assert [(e["step"], e["reason"]) for e in resumed.events] == [
        (e["step"], e["reason"]) for e in whole.events
    ]
