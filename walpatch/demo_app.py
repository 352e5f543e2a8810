"""A legacy application with the classic silent-downgrade pattern, bundled for ``walpatch demo``.

    python -m walpatch.demo_app DB [--fault POINT] [--errno EIO] [--persistent]

Its startup code (``open_database``) asks for WAL and, when that fails with "disk I/O error",
logs a warning and falls back to ``PRAGMA journal_mode=DELETE``; then it writes a row and
reads its journal mode back. It knows nothing of walpatch: ``walpatch demo`` runs it once
as is and once with ``walpatch.install()`` called before it starts.

``--fault`` is the demo harness, not the application: it switches on a real libfiu fault
(``walpatch.faults``) immediately before ``conn.execute("PRAGMA journal_mode=WAL")`` and off
as soon as that call returns or raises, so everything walpatch does inside the call (its
retries, its on-disk check) runs under the fault and the application's fallback does not.
It needs ``fiu-run -x`` (``walpatch.faults.command_prefix()``).

Output: the application's log lines on stderr (``legacy-app: LEVEL: message``), and one JSON
line on stdout: ``wal_error`` (what the WAL request raised), ``fallback`` (whether the
fallback ran), ``final_mode``, ``rows``, ``error`` (what made the application fail), ``log``
(its own log lines), ``fault`` (the fault's counters), ``walpatch`` (active, stats).

Exit codes: 0 the application started and wrote its row; 1 it failed (the JSON line says
why); 2 bad arguments; 4 the fault could not be set up (not under ``fiu-run -x``).
This process never opens the database file except through SQLite.
"""
from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from typing import Any, Dict, List, Optional

log = logging.getLogger("legacy-app")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def _describe(exc: Optional[BaseException]) -> Optional[Dict[str, Any]]:
    if exc is None:
        return None
    return {"type": type(exc).__name__, "message": str(exc),
            "errorname": getattr(exc, "sqlite_errorname", None)}


def open_database(path: str, report: Dict[str, Any], fault: Any = None) -> sqlite3.Connection:
    """The legacy code (the only part that is "the application")."""
    conn = sqlite3.connect(path)
    try:
        if fault is not None:
            with fault:
                conn.execute("PRAGMA journal_mode=WAL")
        else:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as e:
        report["wal_error"] = _describe(e)
        if "disk i/o error" in str(e).lower():
            log.warning("could not enable WAL (%s), falling back to DELETE", e)
            report["fallback"] = True
            conn.execute("PRAGMA journal_mode=DELETE")
        else:
            raise
    return conn


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m walpatch.demo_app",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("db", help="database file")
    parser.add_argument("--fault", metavar="POINT",
                        help="libfiu point to fail around the WAL request (pwrite, mmap, ...)")
    parser.add_argument("--errno", default="EIO", help="errno of the fault (default EIO)")
    parser.add_argument("--persistent", action="store_true",
                        help="fail every call of the point while the WAL request runs "
                             "(default: the first call only)")
    args = parser.parse_args(argv)

    collect = _Collect()
    log.addHandler(collect)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    log.addHandler(stream)
    log.setLevel(logging.INFO)
    log.propagate = False

    fault = None
    if args.fault:
        from . import faults

        try:
            faults.libfiu()  # load and initialise now, not inside the fault window
            fault = faults.Fault(args.fault, args.errno, once=not args.persistent)
            if not faults.under_fiu_run():
                raise RuntimeError("--fault needs `fiu-run -x` (libfiu's POSIX preload)")
        except (OSError, RuntimeError, ValueError) as exc:
            print(f"demo_app: cannot set up the fault: {exc}", file=sys.stderr)
            return 4

    report: Dict[str, Any] = {"wal_error": None, "fallback": False, "final_mode": None,
                              "rows": None, "error": None}
    code = 0
    try:
        conn = open_database(args.db, report, fault)
        conn.execute("CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO items(name) VALUES ('written by the app')")
        conn.commit()
        report["final_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
        report["rows"] = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        conn.close()
        log.info("started; journal_mode=%s", report["final_mode"])
    except sqlite3.Error as exc:  # the legacy app's last-resort handler
        report["error"] = _describe(exc)
        log.error("cannot open the database: %s: %s", type(exc).__name__, exc)
        code = 1

    walpatch = sys.modules.get("walpatch")
    active = bool(walpatch is not None and walpatch.is_installed())
    report.update(
        log=collect.lines,
        fault=fault.summary() if fault is not None else None,
        walpatch={"active": active,
                  "stats": walpatch.stats() if active and walpatch is not None else None},
    )
    sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
