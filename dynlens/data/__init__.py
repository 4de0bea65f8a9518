"""Tiny generated or bundled data sets for examples, tests and benchmarks."""

from .modular import ModularArithmetic, modular_table

__all__ = ["ModularArithmetic", "modular_table"]
