"""Shared test helpers: tiny Lightning modules and readers of what was logged."""

from __future__ import annotations

import csv
import glob
import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.data import DataLoader, TensorDataset

PACKAGES = ("pytorch_lightning", "lightning.pytorch")


def lightning(package: str = "pytorch_lightning"):
    return importlib.import_module(package)


def one_batch_loader(n: int = 4) -> DataLoader:
    """One batch per epoch, so epochs and optimizer steps coincide."""
    return DataLoader(TensorDataset(torch.randn(n, 2), torch.randn(n, 1)), batch_size=n)


def scripted_module(
    train_curve: Callable[[int], float],
    val_curve: Callable[[int], float],
    package: str = "pytorch_lightning",
    train_key: str = "train_acc",
    val_key: str = "val_acc",
):
    """A LightningModule that logs accuracies given as functions of ``global_step``."""
    pl = lightning(package)

    class Scripted(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.log(train_key, float(train_curve(self.global_step)), batch_size=len(x))
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def validation_step(self, batch, batch_idx):
            self.log(val_key, float(val_curve(self.global_step)), batch_size=len(batch[0]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Scripted()


def trainer(package: str = "pytorch_lightning", **kwargs):
    pl = lightning(package)
    defaults = dict(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def tb_logger(path: Path, package: str = "pytorch_lightning"):
    return lightning(package).loggers.TensorBoardLogger(str(path), name="", version="")


def event_accumulator(logdir: str | Path) -> EventAccumulator:
    files = glob.glob(str(Path(logdir) / "**" / "events.out.tfevents.*"), recursive=True)
    assert files, f"no event file under {logdir}"
    ea = EventAccumulator(str(Path(files[0]).parent), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar point in the run's event file: ``{tag: [(step, value), ...]}``."""
    ea = event_accumulator(logdir)
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def custom_scalars_layout(logdir: str | Path) -> layout_pb2.Layout:
    ea = event_accumulator(logdir)
    events = ea.Tensors("custom_scalars__config__")
    assert len(events) == 1, "expected exactly one layout per run"
    return layout_pb2.Layout.FromString(events[0].tensor_proto.string_val[0])


def texts(logdir: str | Path, tag: str) -> list[tuple[int, str]]:
    ea = event_accumulator(logdir)
    return [
        (e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(f"{tag}/text_summary")
    ]


def csv_metrics(logdir: str | Path) -> list[dict[str, str]]:
    (path,) = glob.glob(str(Path(logdir) / "**" / "metrics.csv"), recursive=True)
    with open(path) as f:
        return list(csv.DictReader(f))
