"""Every decision is one event: a log record on the ``walpatch`` logger, a counter in
``stats()``, and optionally a JSON line in an event file.

Warnings are deduplicated per (event, file): the first is logged at WARNING, repeats at DEBUG
(and still counted), so a flapping filesystem cannot flood an application's logs. Events
carry paths, schemas, modes, codes and counts; never SQL parameters or row data.
Nothing here writes to stdout.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from typing import Any, Dict, Optional, Set, Tuple

logger = logging.getLogger("walpatch")

_lock = threading.Lock()
_counters: Dict[str, int] = {}
_warned: Set[Tuple[str, str]] = set()
#: Bound on the deduplication set (one entry per event and file): a process that touches
#: tens of thousands of files must not grow without bound. Past it the set starts afresh, so
#: a file may be warned about once more: a bounded cost, in the safe direction.
_WARNED_MAX = 4096
_sink_fd: Optional[int] = None
_sink_path: Optional[str] = None
_sink_write_warned = False  # one warning per process when writes to the event file fail

# Counter names, documented in README ("stats()").
COUNTERS = (
    "connections",
    "wal_requests",
    "wal_ok",
    "wal_retries",
    "wal_recovered",
    "wal_failed",
    "wal_unsupported",
    "wal_silently_refused",
    "downgrade_requests",
    "downgrades_passed",
    "downgrades_allowed",
    "downgrades_refused",
    "observed_would_refuse",
    "observed_would_retry",
    "disk_checks",
    "disk_check_failures",
    "downgrades_kept",
    "wal_avoided",
    "observed_would_avoid",
    "wal_reset_bug_warnings",
    "events_dropped",
    "lock_guard_parked",
    "lock_guard_reused",
    "lock_guard_detected",
    "lock_guard_writes",
    "lock_guard_unprotected",
    "lock_guard_errors",
)


def count(name: str, n: int = 1) -> None:
    with _lock:
        _counters[name] = _counters.get(name, 0) + n


def snapshot() -> Dict[str, int]:
    with _lock:
        out = {name: 0 for name in COUNTERS}
        out.update(_counters)
        return out


def reset() -> None:
    """Forget counters and deduplication (tests, and a fresh install())."""
    with _lock:
        _counters.clear()
        _warned.clear()


def open_sink(path: Optional[str]) -> Optional[str]:
    """Start appending events as JSON lines to ``path``; returns an error text or None.

    The file is created owner-only (0600) and a symlink at ``path`` is refused (O_NOFOLLOW),
    so a shared directory cannot be used to redirect the events into another file. Only a
    regular file is accepted, opened non-blocking: a FIFO, a terminal or a device could stall
    the application in ``import sqlite3`` or in ``execute`` (issue 10, item 6).
    """
    global _sink_fd, _sink_path, _sink_write_warned
    with _lock:
        if path == _sink_path:
            return None
        if _sink_fd is not None:
            os.close(_sink_fd)  # our own log file, never a database
            _sink_fd, _sink_path = None, None
        if path is None:
            return None
        refused = (f"walpatch: WALPATCH_EVENT_FILE {path!r} is not a regular file "
                   "(a FIFO, device or directory could block the application); "
                   "events go to the log only")
        try:  # before open(): opening a FIFO or a device may have side effects of its own
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return refused
        except FileNotFoundError:
            pass
        except OSError as exc:
            return _cannot_open(path, exc)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            return _cannot_open(path, exc)
        try:  # the path may have been swapped between lstat() and open()
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        if not regular:
            os.close(fd)  # a FIFO or device we just opened; never a database
            return refused
        _sink_fd, _sink_path = fd, path
        _sink_write_warned = False
        return None


def _cannot_open(path: str, exc: OSError) -> str:
    return (
        f"walpatch: cannot open WALPATCH_EVENT_FILE {path!r}: {exc.strerror or exc} "
        "(a symlink is refused; the directory must exist); events go to the log only"
    )


def _write_line(fd: int, data: bytes) -> None:
    """Write one event line without ever waiting; count it as dropped when it cannot be
    written whole at once (the line is then lost, the application goes on)."""
    global _sink_write_warned
    try:
        written = os.write(fd, data)
        if written == len(data):
            return
        problem = f"short write ({written} of {len(data)} bytes)"
    except BlockingIOError:
        problem = "the file would block"
    except OSError as exc:
        problem = str(exc.strerror or exc).lower()
    with _lock:
        _counters["events_dropped"] = _counters.get("events_dropped", 0) + 1
        if _sink_write_warned:
            return
        _sink_write_warned = True
    # Straight to the logger (not emit()): a failing sink must not feed on itself.
    logger.warning(
        "walpatch: cannot write to WALPATCH_EVENT_FILE %r: %s; events that cannot be written "
        "are dropped and counted in stats()['events_dropped'] (warned once)",
        _sink_path, problem)


def emit(
    event: str,
    level: int,
    message: str,
    *,
    dedupe_key: Optional[str] = None,
    **fields: Any,
) -> None:
    """Log ``message`` with ``fields`` attached (record.walpatch) and write the JSON line."""
    record: Dict[str, Any] = {"event": event, "pid": os.getpid(), "time": time.time()}
    record.update({k: v for k, v in fields.items() if v is not None})
    log_level = level
    if dedupe_key is not None and level >= logging.WARNING:
        key = (event, dedupe_key)
        with _lock:
            repeated = key in _warned
            if not repeated and len(_warned) >= _WARNED_MAX:
                _warned.clear()
            _warned.add(key)
        if repeated:
            log_level = logging.DEBUG
            record["repeat"] = True
    if logger.isEnabledFor(log_level):
        logger.log(log_level, "%s", message, extra={"walpatch": record})
    fd = _sink_fd
    if fd is not None:
        import json  # only with an event file: json costs a millisecond at import

        line = json.dumps(dict(record, message=message), default=str, sort_keys=True) + "\n"
        _write_line(fd, line.encode("utf-8", "replace"))
