"""Which implementation of the execute hot path is in use: the C extension or pure Python.

``walpatch._speedups`` (walpatch/_speedups.c) is optional: an install without a compiler has
only the pure-Python overrides in connection.py, which behave the same. The one known
difference: a warning that sqlite3's C code raises inside ``execute`` (3.12+: named
placeholders with a sequence, the default date/datetime adapters) names the caller's line with
the C path, walpatch/connection.py with pure Python (docs/transparency.md).

``WALPATCH_DISABLE_EXTENSIONS=1`` (like wrapt's ``WRAPT_DISABLE_EXTENSIONS``) forces pure
Python; it is read once, when this module is first imported (at the first connect).
Importing this module does not import sqlite3.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Optional, Tuple

DISABLE_ENV = "WALPATCH_DISABLE_EXTENSIONS"


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _load() -> Tuple[Optional[ModuleType], str]:
    if _disabled():
        return None, f"{DISABLE_ENV} is set"
    try:
        from . import _speedups  # type: ignore[attr-defined]
    except ImportError as exc:  # not built (no compiler at install), or another ABI
        return None, f"C extension not available ({exc})"
    return _speedups, getattr(_speedups, "__file__", "") or "built in"


module, detail = _load()
#: "c" when the compiled hot path is in use, else "python"
KIND = "c" if module is not None else "python"
