"""Two-process CPU DDP runs with every monitor attached; launched by tests/test_ddp.py.

Lightning's ``ddp`` strategy re-executes this script for rank 1, so it must be a script of its
own (not a pytest module). Each rank writes the dynlens values it ends with, and rank 0's CSV
logger holds what was logged.

    python tests/ddp_run.py OUTDIR [contract|values]

``contract`` (the default) runs the conformance model (Dropout, BatchNorm, a budgeted
HessianMonitor with per-block traces and the spectral density, and ContinualEvaluation) and
records each rank's schedules and last pooled spectrum. ``values`` runs a
deterministic model (no Dropout, no BatchNorm: its forward on a shard equals the single-process
forward on the same samples) for comparison with a single process on the same global batches,
logging every second step (so pooled statistics are reduced too), and records each rank's own
trace estimate so the logged trace can be checked to be their mean.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two processes share the machine's cores

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynlens
from dynlens.callbacks.replay import probe_generator
from dynlens.curvature import hutchinson_trace
from tests.test_conformance import FACTORIES, Model, data

GLOBAL_BATCH = 32


def deterministic_model() -> Model:
    """The conformance model without its per-rank or random parts (BatchNorm, Dropout)."""
    torch.manual_seed(0)
    model = Model()
    model.norm = torch.nn.Identity()
    model.drop.p = model.block.dropout.p = model.block.attention_dropout = 0.0
    return model


class LocalTrace(pl.Callback):
    """Each rank's own Hutchinson estimate at each step, with the probes HessianMonitor draws."""

    def __init__(self, monitor: dynlens.HessianMonitor) -> None:
        self.monitor = monitor
        self.by_step: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = batch
        params = {n: p.detach() for n, p in pl_module.named_parameters() if p.requires_grad}

        def loss_fn(p):
            return F.cross_entropy(functional_call(pl_module, p, (x,)), y)

        step = trainer.global_step
        generator = probe_generator(self.monitor.seed, trainer.global_rank, step)
        estimate = hutchinson_trace(
            loss_fn, params, num_probes=self.monitor.num_probes, generator=generator
        )
        self.by_step[step] = estimate.value


def fit(out: Path, mode: str, devices: int) -> tuple[pl.Trainer, dict]:
    monitors = {monitor: factory() for monitor, factory in FACTORIES.items()}
    callbacks: list = list(monitors.values())
    extra: dict = {}
    if mode == "contract":
        torch.manual_seed(0)
        model = Model()
        # the budget schedule, decided on rank 0 and broadcast, must match on every rank
        budgeted = dynlens.HessianMonitor(
            budget=0.3,
            num_probes=2,
            max_iter=3,
            blocks="module",
            density=True,
            density_iter=4,
            density_top_k=2,
            prefix="budget",
        )
        callbacks.append(budgeted)
        extra["budget_steps"] = lambda: [int(h["step"]) for h in budgeted.history]
        extra["spectrum"] = lambda: budgeted.last_spectrum
        evaluated: list[int] = []  # global_step of every budgeted evaluation (one batch each)

        def forward(module, batch, task):
            evaluated.append(module.global_step)
            return module(batch[0]), batch[1]

        callbacks.append(
            dynlens.ContinualEvaluation(
                {0: data(1, 32)},
                subset_size=16,
                budget=0.3,
                forward_fn=forward,
                prefix="budget",
                verbose=False,
            )
        )
        extra["continual_budget_steps"] = lambda: evaluated
        max_steps, log_every = 4, 1
    else:
        model = deterministic_model()
        local = LocalTrace(monitors[dynlens.HessianMonitor])
        callbacks.insert(0, local)
        extra["local_trace"] = lambda: local.by_step
        # two steps per logging interval: the pooled collapse and logit statistics reduce
        # across ranks at the logged steps only
        max_steps, log_every = 4, 2
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=pl.loggers.CSVLogger(str(out), name="", version=""),
        callbacks=callbacks,
        check_val_every_n_epoch=1,
        log_every_n_steps=log_every,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    per_device = GLOBAL_BATCH // devices
    trainer.fit(
        model,
        DataLoader(data(), batch_size=per_device),
        DataLoader(data(2, 32), batch_size=per_device),
    )
    return trainer, {name: get() for name, get in extra.items()}


def main(out: Path, mode: str = "contract", devices: int = 2) -> None:
    torch.set_num_threads(1)
    trainer, extra = fit(out, mode, devices)
    values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("dynlens/")}
    record = {"values": values, **extra}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, sort_keys=True))
    if devices == 1:
        return
    # Both ranks have written their values; then tear the gloo process group down and leave
    # without the interpreter's exit-time destruction, in which gloo's threads sometimes abort
    # the process ("terminate called without an active exception") after all the work is done.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
