"""``python -m natkit`` = the ``natkit`` command."""

from natkit.cli import main

raise SystemExit(main())
