"""dynlens: training-dynamics instrumentation for PyTorch Lightning, live in TensorBoard."""

from importlib.metadata import PackageNotFoundError, version

from . import (
    alignment,
    attention,
    callbacks,
    collapse,
    continual,
    curvature,
    data,
    early_warning,
    events,
    forecast,
    grokking,
    logits,
)
from .callbacks import *  # noqa: F403  (the monitors: dynlens.callbacks.__all__)
from .nn import (
    CrossEntropyLoss,
    StableMax,
    log_stablemax,
    stablemax,
    stablemax_cross_entropy,
    z_loss,
)
from .optim import OrthoGrad, project_out_weights_

try:
    __version__ = version("dynlens")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "CrossEntropyLoss",
    "OrthoGrad",
    "StableMax",
    "__version__",
    "alignment",
    "attention",
    "collapse",
    "continual",
    "curvature",
    "data",
    "early_warning",
    "events",
    "forecast",
    "grokking",
    "log_stablemax",
    "logits",
    "project_out_weights_",
    "stablemax",
    "stablemax_cross_entropy",
    "z_loss",
]
__all__ += callbacks.__all__
