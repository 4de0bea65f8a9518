"""``python -m dynlens``: the ``dynlens`` command line."""

from .cli import main

raise SystemExit(main())
