"""The report's families, found: every module of :mod:`dynlens.report.families`, in declared order.

:func:`discover` imports each module of a package (:func:`pkgutil.iter_modules`, so a new module
is found without being named anywhere) and collects the :class:`~dynlens.report.family.Family`
objects it defines — what the :func:`~dynlens.report.family.family` decorator makes of a
summariser — sorted by the ``order`` each declares. :data:`FAMILIES` is that registry for the
built-in families; the report's tables and the ``families`` of its JSON follow its order::

    grokking (10) · collapse (20) · hessian (30) · hessian_blocks (40) · hessian_spectrum (50)
    · logits (60) · continual (70) · warning (80)

The order is declared, not the accident of file names or import order: two families at the same
place, or two modules declaring one family name, are refused when the registry is built.
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
from types import ModuleType

from .family import Family

__all__ = ["FAMILIES", "PACKAGE", "discover"]

#: The package whose modules are the built-in families.
PACKAGE = "dynlens.report.families"


def discover(package: str | ModuleType = PACKAGE) -> dict[str, Family]:
    """``{name: Family}`` of every family defined in a module of ``package``, sorted by order.

    Each module directly inside the package is imported (in file-name order, which does not
    matter) and its :class:`~dynlens.report.family.Family` attributes collected; one imported
    from a sibling module is the same object and counts once.

    Raises:
        ValueError: two modules define a family of the same name, or two families declare the
            same ``order``.
    """
    root = importlib.import_module(package) if isinstance(package, str) else package
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(root.__path__, root.__name__ + "."), key=_name):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if not isinstance(value, Family):
                continue
            known = found.setdefault(value.name, value)
            if known is not value:
                raise ValueError(
                    f"two families are named {value.name!r} (one in {info.name}): "
                    "give each its own name"
                )
    ordered = sorted(found.values(), key=lambda f: f.order)
    for before, after in itertools.pairwise(ordered):
        if before.order == after.order:
            raise ValueError(
                f"families {before.name!r} and {after.name!r} both declare order={before.order}: "
                "give each its own place"
            )
    return {f.name: f for f in ordered}


def _name(info: pkgutil.ModuleInfo) -> str:
    return info.name


#: The built-in families, in table order: family name → :class:`~dynlens.report.family.Family`.
FAMILIES: dict[str, Family] = discover()
