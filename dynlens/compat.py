"""One set of base classes that both Lightning distributions accept.

``pytorch_lightning`` and ``lightning.pytorch`` are separate class hierarchies: a Trainer from one
package does not recognise a ``Callback`` or ``LightningDataModule`` subclassed from the other.
dynlens classes derive from the base of *every* installed package at once, so the same object
works with ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``; at least one of the two
must be installed.

One limit: Lightning decides whether a DataModule hook is "overridden" by comparing its code with
*its own* base class, so an inherited default from the other package looks overridden. dynlens
DataModules therefore define ``train_dataloader`` and ``val_dataloader`` themselves; callbacks
always define ``state_dict`` (Lightning treats a callback with one as stateful).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING


def _installed(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


PACKAGES: tuple[ModuleType, ...] = tuple(
    m for m in (_installed("pytorch_lightning"), _installed("lightning.pytorch")) if m is not None
)
if not PACKAGES:
    raise ImportError(
        "dynlens needs PyTorch Lightning: `pip install pytorch-lightning` "
        "(or `pip install lightning`)."
    )

if TYPE_CHECKING:  # the type checker sees one package's classes, whose hooks it checks
    from pytorch_lightning import Callback, LightningDataModule
else:
    Callback = type("Callback", tuple(p.Callback for p in PACKAGES), {"__module__": __name__})
    LightningDataModule = type(
        "LightningDataModule",
        tuple(p.LightningDataModule for p in PACKAGES),
        {"__module__": __name__},
    )


def is_tensorboard_logger(logger: object) -> bool:
    """True for a TensorBoard logger of either package (or any logger writing a SummaryWriter)."""
    return any(isinstance(logger, p.loggers.TensorBoardLogger) for p in PACKAGES)
