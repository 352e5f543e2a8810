"""Error -> category, by SQLite's extended result code (3.11+) with a message fallback.

The categories decide what walpatch does with a failed journal-mode request (design.md §3):
only "WAL unsupported here" may ever justify the application's own fallback to a rollback
journal; everything else is either retried (contention, transient I/O) or passed through.
Pure: no I/O, so it is shared by the guard and by ``walpatch probe``.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

CONTENTION = "contention"
TRANSIENT_IO = "transient-io"
WAL_UNSUPPORTED = "wal-unsupported"
STATE = "state"
CORRUPT = "corrupt"  # transient only right after an I/O error (see classify())
UNKNOWN = "unknown"

RETRYABLE = frozenset({CONTENTION, TRANSIENT_IO})

# Extended codes (sqlite3.h). Primary code = extended & 0xFF.
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR = 5, 6, 8, 10
SQLITE_CORRUPT, SQLITE_CANTOPEN, SQLITE_FULL, SQLITE_PROTOCOL = 11, 14, 13, 15
SQLITE_AUTH, SQLITE_NOTADB = 23, 26
SQLITE_IOERR_LOCK = 3850
SQLITE_IOERR_SHMOPEN = 4618
SQLITE_IOERR_SHMSIZE = 4874
SQLITE_IOERR_SHMLOCK = 5130
SQLITE_IOERR_SHMMAP = 5386
SQLITE_IOERR_CORRUPTFS = 8458

# Only the shared-memory errors a filesystem without shared mmap gives (virtiofs, 9p, Docker
# bind mounts, FUSE with direct_io). SHMSIZE and SHMLOCK are what a transient EIO or ENOSPC on
# the -shm file gives too (seen with libfiu): they stay transient I/O, retried, fail closed.
_UNSUPPORTED_EXTENDED = frozenset({SQLITE_IOERR_SHMOPEN, SQLITE_IOERR_SHMMAP})
_STATE_EXTENDED = frozenset({SQLITE_IOERR_LOCK})
_PRIMARY = {
    SQLITE_BUSY: CONTENTION,
    SQLITE_LOCKED: CONTENTION,
    SQLITE_IOERR: TRANSIENT_IO,
    SQLITE_FULL: TRANSIENT_IO,
    SQLITE_PROTOCOL: WAL_UNSUPPORTED,
    SQLITE_AUTH: WAL_UNSUPPORTED,
    SQLITE_READONLY: STATE,
    SQLITE_CANTOPEN: STATE,
    SQLITE_NOTADB: STATE,
    SQLITE_CORRUPT: CORRUPT,
}

# Message fragments (lower case), checked in order; the first match wins. SQLite's own
# messages for each primary code (sqlite3ErrStr) and the texts seen in the field.
_MESSAGES: Tuple[Tuple[str, str], ...] = (
    ("from within a transaction", STATE),  # cannot change into/out of wal mode ...
    ("locking protocol", WAL_UNSUPPORTED),
    ("not authorized", WAL_UNSUPPORTED),
    ("authorization denied", WAL_UNSUPPORTED),
    ("database is locked", CONTENTION),
    ("database table is locked", CONTENTION),
    ("database schema is locked", CONTENTION),
    ("disk i/o error", TRANSIENT_IO),
    ("database or disk is full", TRANSIENT_IO),
    ("database disk image is malformed", CORRUPT),
    ("readonly database", STATE),
    ("read-only", STATE),
    ("unable to open database file", STATE),
    ("file is not a database", STATE),
)


def error_code(exc: BaseException) -> Tuple[Optional[int], Optional[str]]:
    """The extended result code and its name, where CPython exposes them (3.11+)."""
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None)
    return (code if isinstance(code, int) else None), (name if isinstance(name, str) else None)


def classify(
    exc: BaseException,
    extra_unsupported_markers: Iterable[str] = (),
    after_io_error: bool = False,
) -> str:
    """The category of ``exc``.

    ``after_io_error``: an I/O error was seen on this file moments ago. A transient EIO on
    *read* surfaces as "database disk image is malformed", so CORRUPT then counts as
    transient I/O; on its own it is passed through (fail closed, never a downgrade signal).
    """
    message = str(exc).lower()
    for marker in extra_unsupported_markers:
        if marker and marker in message:
            return WAL_UNSUPPORTED
    code, _ = error_code(exc)
    category: Optional[str] = None
    if code is not None:
        if code in _UNSUPPORTED_EXTENDED:
            category = WAL_UNSUPPORTED
        elif code in _STATE_EXTENDED:
            category = STATE
        elif code == SQLITE_IOERR_CORRUPTFS:
            category = TRANSIENT_IO
        else:
            category = _PRIMARY.get(code & 0xFF)
        # "cannot change out of wal mode from within a transaction" comes with SQLITE_ERROR.
        if category is None and "from within a transaction" in message:
            category = STATE
    if category is None:
        for fragment, cat in _MESSAGES:
            if fragment in message:
                category = cat
                break
    if category is None:
        return UNKNOWN
    if category == CORRUPT:
        return TRANSIENT_IO if after_io_error else CORRUPT
    return category


def is_retryable(category: str) -> bool:
    return category in RETRYABLE
