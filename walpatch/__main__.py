"""``python -m walpatch ...`` is the same as the ``walpatch`` command."""
from .cli import main

raise SystemExit(main())
