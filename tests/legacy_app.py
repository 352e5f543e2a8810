"""A legacy application with the classic silent-downgrade pattern (design.md, top).

    python tests/legacy_app.py DB [--walpatch] [--fault POINT] [--errno EIO]
                                  [--times N|persistent] [--after K] [--read-first]

It opens DB, asks for WAL, and when that fails with "disk I/O error" (or "locking protocol")
logs a line and falls back to ``PRAGMA journal_mode=DELETE``; then it creates a table, inserts
rows, and prints one JSON line describing what happened (the result of the WAL request, what
the handler caught, the fallback, the final mode, the rows, walpatch's stats, the fault).

``--fault`` injects a real syscall failure through libfiu's control API (``faultinject``),
switched on immediately before ``conn.execute("PRAGMA journal_mode=WAL")`` and off as soon as
that call returns or raises: everything walpatch does inside the call (its retries, its
on-disk check) runs under the fault; the application's fallback does not. Must run under
``fiu-run -x`` when ``--fault`` is given (``faultinject.run_script`` does that).

Exit codes: 0 the application finished; 3 the application raised (the JSON line says what);
4 the harness could not set the fault up; 2 bad arguments.

This process is the *protected* one: it never opens the database file except through SQLite.
"""
from __future__ import annotations

import argparse
import json  # noqa: F401  (imported before any fault window: nothing is imported during one)
import logging
import os
import sqlite3
import sys
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultinject  # noqa: E402

log = logging.getLogger("legacy_app")

ROWS = ("alpha", "beta", "gamma")


def describe_error(exc: Optional[BaseException]) -> Optional[Dict[str, Any]]:
    """Type, message and the attributes walpatch adds, as plain JSON values."""
    if exc is None:
        return None
    out: Dict[str, Any] = {
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc),
        "errorname": getattr(exc, "sqlite_errorname", None),
        "errorcode": getattr(exc, "sqlite_errorcode", None),
        "walpatch_attempts": getattr(exc, "walpatch_attempts", None),
        "notes": list(getattr(exc, "__notes__", []) or []),
    }
    return out


class App:
    """The legacy code, plus a report of what it saw. Only ``open_database`` is "the app"."""

    def __init__(self, path: str, fault: Optional[faultinject.Fault], read_first: bool) -> None:
        self.path = path
        self.fault = fault
        self.read_first = read_first
        self.report: Dict[str, Any] = {
            "wal_returned": None, "caught": None, "fallback_ran": False,
            "fallback_returned": None, "final_mode": None, "rows": None, "crashed": None,
        }
        self.caught: Optional[BaseException] = None

    @contextmanager
    def fault_window(self) -> Iterator[None]:
        if self.fault is None:
            yield
            return
        with self.fault:
            yield

    def open_database(self) -> None:
        report = self.report
        conn = sqlite3.connect(self.path)
        if self.read_first:  # the connection has read the file before the WAL request
            conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
        # ---- the classic legacy pattern ------------------------------------------------
        try:
            with self.fault_window():
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            report["wal_returned"] = mode
        except sqlite3.OperationalError as e:
            self.caught = e
            report["caught"] = describe_error(e)
            msg = str(e).lower()
            if "disk i/o error" in msg or "locking protocol" in msg:
                log.warning("could not enable WAL (%s), falling back to DELETE", e)
                report["fallback_ran"] = True
                report["fallback_returned"] = \
                    conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
            else:
                log.warning("could not enable WAL (%s), continuing", e)
        # --------------------------------------------------------------------------------
        conn.execute("CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT INTO items(name) VALUES (?)", [(r,) for r in ROWS])
        conn.commit()
        report["final_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
        report["rows"] = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        conn.close()


def parse_times(text: str) -> Optional[int]:
    word = text.strip().lower()
    if word in ("persistent", "always", "all"):
        return None
    if word == "once":
        return 1
    value = int(word)
    if value < 1:
        raise argparse.ArgumentTypeError("times must be >= 1, 'once' or 'persistent'")
    return value


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db", help="database path")
    parser.add_argument("--walpatch", action="store_true",
                        help="import walpatch; walpatch.install() (after sqlite3 is imported)")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a walpatch.install() keyword setting (repeatable)")
    parser.add_argument("--fault", metavar="POINT",
                        help="libfiu point (pwrite, pread, fdatasync, open, ... or full name)")
    parser.add_argument("--errno", default="EIO", help="errno name or number (default EIO)")
    parser.add_argument("--times", type=parse_times, default=1,
                        help="fail this many calls: N, once, or persistent (default 1)")
    parser.add_argument("--after", type=int, default=0,
                        help="let this many calls of the point succeed first (default 0)")
    parser.add_argument("--read-first", action="store_true",
                        help="read the database on the connection before asking for WAL")
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(name)s %(levelname)s %(message)s")

    walpatch = None
    if args.walpatch:
        import walpatch as _walpatch

        settings = dict(s.split("=", 1) for s in args.setting)
        if not _walpatch.install(**settings):
            print("walpatch.install() returned False", file=sys.stderr)
            return 4
        walpatch = _walpatch

    fault = None
    if args.fault:
        if not faultinject.under_fiu_run():
            print("--fault needs `fiu-run -x` (faultinject.run_script)", file=sys.stderr)
            return 4
        faultinject.libfiu()  # load and init now, not inside the fault window
        fault = faultinject.Fault(args.fault, args.errno, args.times, args.after)

    app = App(args.db, fault, args.read_first)
    exit_code = 0
    try:
        app.open_database()
    except Exception as exc:  # the legacy app had no handler for this: it would crash
        exit_code = 3
        crashed = describe_error(exc) or {}
        cause = exc.__cause__
        crashed["cause"] = describe_error(cause)
        crashed["cause_is_caught_error"] = cause is not None and cause is app.caught
        crashed["context_is_caught_error"] = \
            exc.__context__ is not None and exc.__context__ is app.caught
        if hasattr(exc, "original_error"):
            crashed["original_error_is_caught_error"] = \
                exc.original_error is app.caught  # type: ignore[attr-defined]
            crashed["reason"] = getattr(exc, "reason", None)
            crashed["database"] = getattr(exc, "database", None)
        if walpatch is not None:
            crashed["is_refusal"] = isinstance(exc, walpatch.WalDowngradeRefused)
        app.report["crashed"] = crashed
        log.error("the application failed: %s: %s", type(exc).__name__, exc)

    result = dict(app.report)
    result.update(
        python=".".join(map(str, sys.version_info[:3])),
        sqlite=sqlite3.sqlite_version,
        walpatch_active=bool(walpatch is not None and walpatch.is_installed()),
        stats=walpatch.stats() if walpatch is not None else None,
        fault=fault.summary() if fault is not None else None,
    )
    faultinject.emit(result)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
