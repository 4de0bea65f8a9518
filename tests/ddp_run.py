"""Two-process CPU DDP run with every monitor attached; launched by tests/test_ddp.py.

Lightning's ``ddp`` strategy re-executes this script for rank 1, so it must be a script of its
own (not a pytest module). Each rank writes the dynlens values it ends with, and rank 0's CSV
logger holds what was logged.

    python tests/ddp_run.py OUTDIR
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two processes share the machine's cores

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_conformance import FACTORIES, Model, data


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=pl.loggers.CSVLogger(str(out), name="", version=""),
        callbacks=[factory() for factory in FACTORIES.values()],
        check_val_every_n_epoch=1,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Model(), DataLoader(data(), batch_size=16), DataLoader(data(2, 32), batch_size=16))
    values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("dynlens/")}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(values, sort_keys=True))
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
    main(Path(sys.argv[1]))
