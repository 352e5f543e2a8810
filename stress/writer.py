"""A writer process of the stress run: the long-lived "gateway" or a short-lived "CLI" run.

    fiu-run -x -f '' python -m stress.writer CONFIG_JSON

Both roles run the legacy application's setup on every connect (the pattern of
``tests/legacy_app.py``: ask for WAL; on "disk i/o error" or "locking protocol" fall back to
``PRAGMA journal_mode=DELETE``), then write rows in transactions. With ``walpatch`` on, the
process calls ``walpatch.install()`` first, as a user's sitecustomize would.

* gateway: connect, write a transaction every ``pause`` seconds; on any error roll back, close
  and reconnect (a supervisor restart); recycle the connection every ``recycle`` transactions;
  stop at ``deadline``, when the stop file exists, or after ``max_txns`` transactions.
* cli: connect, ``txns`` transactions, close, exit (0 ok, 1 an SQLite error, 3 refused).

Faults: seeded random EIO on ``points`` with probability ``rate`` per call, enabled for the
whole life of the process after its imports (``randfault``), so they hit the WAL setup
("setup" phase) and the writes ("write" phase) alike. Some transactions SIGKILL their own
process after their INSERTs and before COMMIT (probability ``kill_rate``, seeded).

Ground truth: after ``commit()`` returns, the row keys are appended to the ledger file (one
line per row, one ``write()``, then ``fsync``), through a descriptor opened before any fault
was enabled and never the database's. Counters go to the stats file as JSON lines
(cumulative; the last line per pid wins). This process never opens the database file except
through SQLite, and no row data is logged.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import sys
import time
import urllib.parse  # noqa: F401  (walpatch's guard imports it lazily for URIs: not mid-fault)
from typing import Any, Dict, List, Optional

from .common import TABLE, append_json, db_uri, open_append
from .randfault import FaultSet

EXIT_OK, EXIT_SQL_ERROR, EXIT_REFUSED, EXIT_SETUP = 0, 1, 3, 4


def error_name(exc: BaseException) -> str:
    """A short, data-free label: SQLite's error name (3.11+), else the message."""
    name = getattr(exc, "sqlite_errorname", None)
    if type(exc).__name__ == "WalDowngradeRefused":
        return "WalDowngradeRefused"
    if name:
        return str(name)
    return f"{type(exc).__name__}: {str(exc)[:60]}"


class Writer:
    def __init__(self, cfg: Dict[str, Any], faults: FaultSet, walpatch: Any) -> None:
        self.cfg = cfg
        self.faults = faults
        self.walpatch = walpatch
        self.refused_type = walpatch.WalDowngradeRefused if walpatch else None
        self.name = cfg["name"]
        self.rng = random.Random(f"{cfg['seed_key']}/app")
        self.target = db_uri(cfg["db"], cfg["vfs"]) if cfg.get("vfs") else cfg["db"]
        self.ledger_fd = open_append(cfg["ledger"])
        self.stats_fd = open_append(cfg["stats"])
        self.seq = 0
        self.last_report = 0.0
        self.c: Dict[str, Any] = dict(
            connects=0, connect_errors=0, wal_ok=0, wal_not_applied=0, wal_errors=0,
            fallbacks=0, fallback_accepted=0, fallback_refused=0, fallback_errors=0,
            txns_ok=0, txns_failed=0, rows_committed=0, self_killed=0, errors={})

    # --- bookkeeping (never faulted, never the database) ---------------------------------

    def _count_error(self, exc: BaseException) -> None:
        errors = self.c["errors"]
        key = error_name(exc)
        errors[key] = errors.get(key, 0) + 1

    def report(self, final: bool = False) -> None:
        self.faults.pause(True)
        try:
            append_json(self.stats_fd, {
                "name": self.name, "pid": os.getpid(), "role": self.cfg["role"],
                "final": final, "time": time.time(), "counters": self.c,
                "faults": self.faults.summary(),
                "walpatch": self.walpatch.stats() if self.walpatch else None})
        finally:
            self.faults.pause(False)
        self.last_report = time.monotonic()

    def _ledger(self, keys: List[str]) -> None:
        self.faults.pause(True)
        try:
            os.write(self.ledger_fd, "".join(k + "\n" for k in keys).encode())
            os.fsync(self.ledger_fd)
        finally:
            self.faults.pause(False)

    # --- the legacy application -----------------------------------------------------------

    def legacy_connect(self) -> sqlite3.Connection:
        """Connect and run the legacy WAL setup (tests/legacy_app.py, App.open_database)."""
        self.faults.set_phase("setup")
        try:
            conn = sqlite3.connect(self.target, timeout=self.cfg["busy_timeout"],
                                   uri=bool(self.cfg.get("vfs")))
        except sqlite3.Error as exc:
            self.c["connect_errors"] += 1
            self._count_error(exc)
            raise
        self.c["connects"] += 1
        try:
            self._legacy_wal_setup(conn)
        except BaseException:
            conn.close()
            raise
        finally:
            self.faults.set_phase("write")
        return conn

    def _legacy_wal_setup(self, conn: sqlite3.Connection) -> None:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self.c["wal_ok" if mode == "wal" else "wal_not_applied"] += 1
        except sqlite3.OperationalError as e:
            self.c["wal_errors"] += 1
            self._count_error(e)
            msg = str(e).lower()
            if "disk i/o error" in msg or "locking protocol" in msg:
                # "could not enable WAL, falling back to DELETE": the silent downgrade
                self.c["fallbacks"] += 1
                try:
                    got = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
                except sqlite3.Error as e2:
                    refused = self.refused_type is not None and isinstance(
                        e2, self.refused_type)
                    self.c["fallback_refused" if refused else "fallback_errors"] += 1
                    self._count_error(e2)
                    raise
                if got == "delete":
                    self.c["fallback_accepted"] += 1
            # any other OperationalError: the legacy app logs it and continues

    def transaction(self, conn: sqlite3.Connection) -> None:
        n = self.rng.randint(1, self.cfg["rows_max"])
        keys = [f"{self.name}.{self.seq + i}" for i in range(n)]
        self.seq += n
        size = self.cfg["payload"]
        kill = self.rng.random() < self.cfg["kill_rate"]
        try:
            for k in keys:
                payload = self.rng.getrandbits(8 * size).to_bytes(size, "little")
                conn.execute(f"INSERT INTO {TABLE}(k, writer, payload) VALUES (?, ?, ?)",
                             (k, self.name, payload))
            if kill:  # SIGKILL in the middle of the transaction (INSERTs done, no COMMIT)
                self.c["self_killed"] += 1
                self.report()
                os.kill(os.getpid(), signal.SIGKILL)
            conn.commit()
        except sqlite3.Error as exc:
            self.c["txns_failed"] += 1
            self._count_error(exc)
            try:
                conn.rollback()
            except sqlite3.Error:
                pass
            raise
        self._ledger(keys)
        self.c["txns_ok"] += 1
        self.c["rows_committed"] += n

    # --- roles ------------------------------------------------------------------------------

    def _stopped(self) -> bool:
        if self.cfg.get("max_txns") and self.c["txns_ok"] + self.c["txns_failed"] >= \
                self.cfg["max_txns"]:
            return True
        return time.time() >= self.cfg["deadline"] or os.path.exists(self.cfg["stop"])

    def run_gateway(self) -> int:
        conn: Optional[sqlite3.Connection] = None
        in_conn = 0
        while not self._stopped():
            if conn is None:
                try:
                    conn = self.legacy_connect()
                    in_conn = 0
                except sqlite3.Error:
                    time.sleep(self.cfg["restart_pause"])  # the supervisor restarts it
                    continue
            try:
                self.transaction(conn)
                in_conn += 1
            except sqlite3.Error:
                _close(conn)
                conn = None
            if conn is not None and in_conn >= self.cfg["recycle"]:
                _close(conn)
                conn = None
            if time.monotonic() - self.last_report > 0.5:
                self.report()
            time.sleep(self.cfg["pause"])
        if conn is not None:
            _close(conn)
        return EXIT_OK

    def run_cli(self) -> int:
        try:
            conn = self.legacy_connect()
        except sqlite3.Error as exc:
            refused = self.refused_type is not None and isinstance(exc, self.refused_type)
            return EXIT_REFUSED if refused else EXIT_SQL_ERROR
        self.report()
        try:
            for _ in range(self.cfg["txns"]):
                self.transaction(conn)
                self.report()
        except sqlite3.Error:
            return EXIT_SQL_ERROR
        finally:
            _close(conn)
        return EXIT_OK


def _close(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    cfg = json.loads((argv if argv is not None else sys.argv[1:])[0])
    walpatch = None
    if cfg["walpatch"]:
        import walpatch as _walpatch

        if not _walpatch.install():
            print("stress.writer: walpatch.install() returned False", file=sys.stderr)
            return EXIT_SETUP
        # Load now what the guard loads at its first use: no import may meet an open() fault.
        from walpatch import classify, connection, errors, guard, ondisk, policy  # noqa: F401

        _ = _walpatch.WalDowngradeRefused
        walpatch = _walpatch
    faults = FaultSet(cfg["points"], cfg["rate"], cfg["seed_key"])
    if faults.faults:
        from walpatch import faults as wf

        if not wf.under_fiu_run():
            print("stress.writer: faults need `fiu-run -x`", file=sys.stderr)
            return EXIT_SETUP
    writer = Writer(cfg, faults, walpatch)
    faults.enable()
    code = EXIT_SQL_ERROR
    try:
        code = writer.run_gateway() if cfg["role"] == "gateway" else writer.run_cli()
    finally:
        faults.disable()
        writer.c["exit"] = code
        writer.report(final=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
