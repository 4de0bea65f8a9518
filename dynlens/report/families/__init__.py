"""The built-in report families, one module per monitor family.

Each module defines its summarisers with the :func:`~dynlens.report.family.family` decorator,
which declares each family's place in the report (``order=``). Nothing here names them:
:mod:`dynlens.report.registry` imports every module of this package and sorts what it finds by
that order. A new family is one new module (see :mod:`dynlens.report.family` for how to write it).
"""
