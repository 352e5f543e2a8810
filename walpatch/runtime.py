"""Process-wide state: the active settings, the per-file WAL history, allow_downgrade().

Kept apart from the hooks so that the guard can read it without import cycles. The config is
swapped as one reference, so readers on the hot path need no lock.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Dict, Iterator, Optional

from .config import Config

if TYPE_CHECKING:  # policy pulls in classify and ondisk: not needed until the first request
    from .policy import History

#: The active settings; None when walpatch is not installed (guarded objects then pass through).
config: Optional[Config] = None

_history_lock = threading.Lock()
#: file -> the last WAL request's outcome, only where it matters for a later downgrade (a
#: failure). A success is the absence of an entry, so files that are fine cost nothing; the
#: failures are bounded, least recently used first out (issue 10 item 14).
_history: "OrderedDict[str, History]" = OrderedDict()
MAX_HISTORY = 4096

_allow_depth: "contextvars.ContextVar[int]" = contextvars.ContextVar(
    "walpatch_allow_downgrade", default=0
)


_keys: Dict[str, str] = {}
_KEYS_MAX = 1024  # a cache: cleared whole when full


def file_key(path: str) -> str:
    """One key per database file, whichever name it was opened under (realpath, cached:
    it costs tens of microseconds of lstat calls, on every journal-mode request)."""
    key = _keys.get(path)
    if key is None:
        if len(_keys) >= _KEYS_MAX:
            _keys.clear()
        key = _keys[path] = os.path.realpath(path)
    return key


def history_for(path: str) -> Optional["History"]:
    key = file_key(path)
    with _history_lock:
        return _history.get(key)


def record(path: str, entry: Optional["History"]) -> None:
    """Remember the outcome of a WAL request for ``path``; None (or a success) forgets."""
    key = file_key(path)
    with _history_lock:
        if entry is None or entry.outcome == "ok":
            _history.pop(key, None)
            return
        _history[key] = entry
        _history.move_to_end(key)
        while len(_history) > MAX_HISTORY:
            _history.popitem(last=False)


def clear_history() -> None:
    with _history_lock:
        _history.clear()


@contextlib.contextmanager
def allow_downgrade() -> Iterator[None]:
    """Let journal-mode downgrades through inside this block (this thread / task only).

    For maintenance jobs that leave WAL on purpose, for example before copying a database to
    a filesystem without shared memory. Nests; every downgrade let through is still logged.
    """
    token = _allow_depth.set(_allow_depth.get() + 1)
    try:
        yield
    finally:
        _allow_depth.reset(token)


def downgrade_allowed_in_context() -> bool:
    return _allow_depth.get() > 0
