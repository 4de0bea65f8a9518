"""Argument checks every monitor shares: loud at set-up, with a message that names the fix.

Each check returns the value it accepted (normalised where that helps, e.g. a float), so a
constructor reads ``self.tol = check_positive_number("tol", tol)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Any


class ConfigurationError(ValueError):
    """A monitor was set up wrongly; the message says how to fix it. Never swallowed."""


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value: object) -> int:
    """Validate a count argument, e.g. ``every_n_steps``, with a message that names the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"Expected `{name}` to be a positive int, got {value!r}.")
    return value


def check_non_negative_int(name: str, value: object) -> int:
    """Validate an index, seed or delay argument (0 allowed), with a message that names the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"Expected `{name}` to be a non-negative int, got {value!r}.")
    return value


def check_positive_number(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """Validate a positive real (a tolerance, a threshold); ``None`` too with ``allow_none``."""
    if value is None and allow_none:
        return None
    if not _is_real(value) or not value > 0:  # type: ignore[operator]
        also = " or None" if allow_none else ""
        raise ConfigurationError(f"Expected `{name}` to be a positive number{also}, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_fraction(
    name: str,
    value: object,
    *,
    include_low: bool = False,
    include_high: bool = True,
    hint: str = "",
) -> float:
    """Validate a fraction in (0, 1], or [0, 1), (0, 1), [0, 1] as the bounds say.

    ``hint`` adds what the number means, e.g. ``"a fraction: 0.1 is ten points"``.
    """
    real = _is_real(value)
    above = real and (value >= 0.0 if include_low else value > 0.0)  # type: ignore[operator]
    below = real and (value <= 1.0 if include_high else value < 1.0)  # type: ignore[operator]
    if not (above and below):
        interval = f"{'[' if include_low else '('}0, 1{']' if include_high else ')'}"
        detail = f" ({hint})" if hint else ""
        raise ConfigurationError(f"Expected `{name}` in {interval}{detail}, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_choice(name: str, value: object, choices: Collection[Any], *, hint: str = "") -> Any:
    """Validate that ``value`` is one of ``choices``; ``hint`` says what each one does."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        listed = ", ".join(repr(c) for c in choices)
        detail = f" ({hint})" if hint else ""
        raise ConfigurationError(f"Expected `{name}` to be one of {listed}{detail}, got {value!r}.")
    return value


def check_bool(name: str, value: object) -> bool:
    """Validate a flag (a real bool, not a truthy value)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"Expected `{name}` to be True or False, got {value!r}.")
    return value


def check_callable(
    name: str, value: object, *, signature: str = "", allow_none: bool = True
) -> Any:
    """Validate a function argument (``None`` allowed by default); ``signature`` shows its shape,
    e.g. ``"(pl_module, batch) -> loss"``."""
    if value is None and allow_none:
        return None
    if not callable(value):
        shape = f" {signature}" if signature else ""
        raise ConfigurationError(f"Expected `{name}` to be a callable{shape}, got {value!r}.")
    return value
