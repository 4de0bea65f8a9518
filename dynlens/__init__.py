"""dynlens: training-dynamics instrumentation for PyTorch Lightning, live in TensorBoard."""

from importlib.metadata import PackageNotFoundError, version

from . import collapse, continual, curvature, data, forecast, grokking, logits
from .callbacks import (
    ConfigurationError,
    ContinualEvaluation,
    EarlyWarningMonitor,
    GrokkingMonitor,
    HessianMonitor,
    LogitGrowthMonitor,
    Monitor,
    PerpGrad,
    SoftmaxCollapseMonitor,
)
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
    "ConfigurationError",
    "ContinualEvaluation",
    "CrossEntropyLoss",
    "EarlyWarningMonitor",
    "GrokkingMonitor",
    "HessianMonitor",
    "LogitGrowthMonitor",
    "Monitor",
    "OrthoGrad",
    "PerpGrad",
    "SoftmaxCollapseMonitor",
    "StableMax",
    "__version__",
    "collapse",
    "continual",
    "curvature",
    "data",
    "forecast",
    "grokking",
    "log_stablemax",
    "logits",
    "project_out_weights_",
    "stablemax",
    "stablemax_cross_entropy",
    "z_loss",
]
