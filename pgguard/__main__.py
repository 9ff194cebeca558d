"""``python -m pgguard`` is the ``pgguard`` command."""

from .cli import main

raise SystemExit(main())
