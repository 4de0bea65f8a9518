"""The built-in report families, one module per monitor family.

Each module holds one summariser and registers it in :data:`dynlens.report.summary.FAMILIES`
with the :func:`~dynlens.report.summary.family` decorator when it is imported. The imports below
are therefore the report's table order, and the order of ``families`` in its JSON: a new family
goes in at its place (see :mod:`dynlens.report.summary` for how to write one).
"""

# isort: off
from . import grokking as grokking
from . import collapse as collapse
from . import hessian as hessian
from . import logits as logits
from . import continual as continual
from . import warning as warning

# isort: on
