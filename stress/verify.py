"""End-of-run verification, in a clean process (no walpatch, no libfiu), after every writer
has exited.

    python -m stress.verify DB LEDGER [VFS]
    python -m stress.verify --create DB MODE [VFS]     (the run's database, before the run)

Prints one JSON object: the header bytes 18/19 and sidecar files as the run left them,
``PRAGMA integrity_check`` from a read-write connection (which first rolls back a hot journal
or recovers a WAL left by a killed writer, as the next application would), the rows in the
table, the ledger rows missing from the table (``lost``: committed, reported to the writer as
committed, and gone), and the header after that connection closed.

A read-only connection (``tests/faultinject.inspect_database``) is not used on purpose: it
cannot roll back a hot journal left by a SIGKILLed writer, so it would read uncommitted pages.
This process holds no connection while it reads the header with ``open()``.

With ``VFS`` (the writers' VFS), ``integrity_via_vfs`` is the check through that VFS first,
as the writers saw the file; everything else uses the default unix VFS. This matters for
``unix-dotfile``: its "reserved lock" test only asks whether the ``.lock`` directory exists,
and a connection creates that directory for its own SHARED lock, so it never finds a journal
hot and never rolls one back (SQLite os_unix.c, dotlockCheckReservedLock). A write that failed
with EIO leaves a hot journal behind; through unix-dotfile the file then reads as
"malformed" until a connection of the default VFS rolls the journal back.
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
from typing import Any, Dict, List, Optional

from .common import TABLE, db_uri


def header(path: str) -> Optional[List[int]]:
    try:
        with open(path, "rb") as f:  # no connection of this process is open here
            data = f.read(100)
    except FileNotFoundError:
        return None
    if len(data) < 100 or data[:16] != b"SQLite format 3\x00":
        return None
    return [data[18], data[19]]


def sidecars(path: str) -> Dict[str, int]:
    out = {}
    for s in ("-wal", "-shm", "-journal"):
        try:
            out[s] = os.stat(path + s).st_size
        except OSError:
            pass
    return out


def ledger_keys(path: str) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _integrity_via(db: str, vfs: str) -> str:
    """integrity_check as the writers saw the file, through their VFS (before any recovery)."""
    try:
        conn = sqlite3.connect(db_uri(db, vfs), uri=True, timeout=30)
    except sqlite3.Error as exc:
        return f"error: {type(exc).__name__}: {exc}"
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
        return "ok" if rows == [("ok",)] else str(rows[0][0])
    except sqlite3.Error as exc:
        return f"error: {type(exc).__name__}: {exc}"
    finally:
        conn.close()


def verify(db: str, ledger: str, vfs: Optional[str] = None) -> Dict[str, Any]:
    out: Dict[str, Any] = {"header_left": header(db), "sidecars_left": sidecars(db)}
    keys = ledger_keys(ledger)
    out["ledger_rows"] = len(set(keys))
    out["ledger_lines"] = len(keys)
    if vfs:
        out["integrity_via_vfs"] = _integrity_via(db, vfs)
    # The default unix VFS: it rolls back a hot journal (unix-dotfile never does, see above).
    conn = sqlite3.connect(db, timeout=30)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
        out["integrity"] = "ok" if rows == [("ok",)] else "; ".join(
            str(r[0]) for r in rows[:5]) + (f" (+{len(rows) - 5} more)" if len(rows) > 5 else "")
        out["journal_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
    except sqlite3.Error as exc:
        out["integrity"] = f"error: {type(exc).__name__}: {exc}"
    try:
        present = {r[0] for r in conn.execute(f"SELECT k FROM {TABLE}")}
        out["table_rows"] = len(present)
        lost = sorted(set(keys) - present)
        out["lost"] = len(lost)
        out["lost_sample"] = lost[:10]  # row keys (writer name + sequence), no data
    except sqlite3.Error as exc:
        out["table_rows"] = None
        out["lost"] = None
        out["rows_error"] = f"{type(exc).__name__}: {exc}"
    conn.close()
    out["header"] = header(db)
    out["sidecars"] = sidecars(db)
    return out


def create(db: str, mode: str, vfs: Optional[str] = None) -> Dict[str, Any]:
    """Make the run's database: the table, in journal mode ``mode`` (as its siblings left it)."""
    from .common import SCHEMA

    conn = sqlite3.connect(db_uri(db, vfs) if vfs else db, uri=bool(vfs))
    got = conn.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
    conn.execute(SCHEMA)
    conn.commit()
    conn.close()
    return {"journal_mode": got, "header": header(db)}


def main(argv: Optional[List[str]] = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args and args[0] == "--create":
        print(json.dumps(create(args[1], args[2], args[3] if len(args) > 3 else None)))
        return 0
    print(json.dumps(verify(args[0], args[1], args[2] if len(args) > 2 else None),
                     sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
