"""``python -m opticam``: the ``opticam`` command."""

from opticam.cli import main

raise SystemExit(main())
