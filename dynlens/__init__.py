"""dynlens: training-dynamics instrumentation for PyTorch Lightning, live in TensorBoard."""

from importlib.metadata import PackageNotFoundError, version

from . import grokking
from .callbacks import ConfigurationError, GrokkingMonitor, Monitor

try:
    __version__ = version("dynlens")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["ConfigurationError", "GrokkingMonitor", "Monitor", "__version__", "grokking"]
