"""Lightning callbacks: scheduling, syncing and logging around the pure measurement layer."""

from .base import ConfigurationError, Monitor
from .collapse import SoftmaxCollapseMonitor
from .grokking import GrokkingMonitor
from .perpgrad import PerpGrad

__all__ = ["ConfigurationError", "GrokkingMonitor", "Monitor", "PerpGrad", "SoftmaxCollapseMonitor"]
