"""Tiny generated or bundled data sets for examples, tests and benchmarks."""

from .digits import SplitDigits
from .modular import ModularArithmetic, modular_table

__all__ = ["ModularArithmetic", "SplitDigits", "modular_table"]
