"""Lightning callbacks: scheduling, syncing and logging around the pure measurement layer."""

from .base import ConfigurationError, Monitor
from .grokking import GrokkingMonitor

__all__ = ["ConfigurationError", "GrokkingMonitor", "Monitor"]
