"""Lightning callbacks: scheduling, syncing and logging around the pure measurement layer."""

from .base import Monitor
from .collapse import SoftmaxCollapseMonitor
from .continual import ContinualEvaluation
from .early_warning import EarlyWarningMonitor
from .grokking import GrokkingMonitor
from .hessian import HessianMonitor
from .logits import LogitGrowthMonitor
from .optimizer import OptimizerMonitor
from .perpgrad import PerpGrad
from .validate import ConfigurationError

__all__ = [
    "ConfigurationError",
    "ContinualEvaluation",
    "EarlyWarningMonitor",
    "GrokkingMonitor",
    "HessianMonitor",
    "LogitGrowthMonitor",
    "Monitor",
    "OptimizerMonitor",
    "PerpGrad",
    "SoftmaxCollapseMonitor",
]
