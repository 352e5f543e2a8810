"""Lock safety under load (design.md section 5): the guard's on-disk checks must never release
a lock that this process holds.

    python -m stress.locks run DB LEDGER MODE DURATION THREADS SEED [--naive] [--no-walpatch]
    python -m stress.locks watch DB MODE          (started by ``run``; not by hand)

``run`` is the protected process: walpatch installed, several "holder" threads that take turns
holding ``BEGIN IMMEDIATE`` (each on its own connection, with an INSERT done) and many
"checker" threads, each opening, using and closing its own connections and sending
journal-mode requests that make the guard read the file's header (``PRAGMA journal_mode=DELETE``
/ ``TRUNCATE`` and, on a WAL file, ``PRAGMA journal_mode=WAL``), plus plain reads.

While a holder holds its lock it waits until the guard has done at least two more header
checks in this process (``walpatch.stats()['disk_checks']``), then asks the watcher process
to probe. The watcher, another process, checks with ``fcntl(F_GETLK)`` that the POSIX locks
SQLite holds for this process are still there (the SHARED range of the database file; the
RESERVED byte in rollback mode; the WAL write lock byte of ``-shm`` in WAL mode) and tries
``BEGIN IMMEDIATE`` with timeout 0, which must fail. Every probe that finds a lock missing, or
gets the write lock, is a violation.

``--naive`` adds the control: a thread that reads the header the naive way (``open()``,
``read(100)``, ``close()``), which drops every POSIX lock of the process; the holders then
wait for those reads instead. The watcher must see violations, which shows it can. The
reader starts once every holder's connection is open: a read begun before the first guarded
``connect()`` gets a plain descriptor (the lock guard is not armed yet, and the file is not
live), and its close releases a holder's lock taken meanwhile, with the guard on too (README
"Limits": descriptors opened before the connection). ``naive_unprotected`` counts the reads
whose file object owned its descriptor (``closefd``): all of them without the guard, none
with ``lock_guard=protect``.

Prints one JSON object. Never logs row data.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from .common import ROOT, TABLE, child_env, open_append, python

# SQLite's lock bytes (os_unix.c / sqliteInt.h)
PENDING_BYTE = 0x40000000
RESERVED_BYTE = PENDING_BYTE + 1
SHARED_FIRST = PENDING_BYTE + 2
SHARED_SIZE = 510
WAL_WRITE_LOCK_BYTE = 120  # -shm: WALINDEX_LOCK_OFFSET + slot 0

_FLOCK = "hhqqi4x"  # struct flock on Linux x86_64 / aarch64


def lock_holder(fd: int, start: int, length: int) -> Optional[int]:
    """pid of another process holding a lock that conflicts with a write lock on the range,
    or None (F_GETLK: asks the kernel, takes nothing)."""
    req = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    res = fcntl.fcntl(fd, fcntl.F_GETLK, req)
    l_type, _, _, _, pid = struct.unpack(_FLOCK, res)
    return None if l_type == fcntl.F_UNLCK else pid


# --- the watcher process --------------------------------------------------------------------

def watch(db: str, mode: str) -> int:
    fd = os.open(db, os.O_RDONLY)  # kept open; this process holds no lock worth keeping
    shm_fd: Optional[int] = None  # opened at the first probe, when the -shm surely exists
    conn = sqlite3.connect(db, timeout=0, isolation_level=None)
    for line in sys.stdin:
        if not line.strip():
            continue
        owner = int(line.split()[1])
        out: Dict[str, Any] = {"shared": lock_holder(fd, SHARED_FIRST, SHARED_SIZE) == owner}
        if mode == "wal":
            if shm_fd is None:
                shm_fd = os.open(db + "-shm", os.O_RDONLY)
            out["wal_write"] = lock_holder(shm_fd, WAL_WRITE_LOCK_BYTE, 1) == owner
        else:
            out["reserved"] = lock_holder(fd, RESERVED_BYTE, 1) == owner
        try:
            conn.execute("BEGIN IMMEDIATE")
            out["got_write_lock"] = True
            conn.execute("ROLLBACK")  # wrote nothing
        except sqlite3.OperationalError as exc:
            out["got_write_lock"] = False
            out["sql_error"] = str(exc)
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    conn.close()
    return 0


# --- the protected process ------------------------------------------------------------------

class LockRun:
    def __init__(self, db: str, ledger: str, mode: str, duration: float, threads: int,
                 seed: int, naive: bool, walpatch_on: bool) -> None:
        self.db, self.mode, self.duration = db, mode, duration
        self.ledger_fd = open_append(ledger)  # not a database file
        self.threads, self.seed, self.naive = threads, seed, naive
        self.stop = threading.Event()
        self.holders_connected = 0
        self.holders_ready = threading.Event()  # the naive reader starts after it
        self.probe_lock = threading.Lock()
        self.count_lock = threading.Lock()
        self.c: Dict[str, int] = dict(
            probes=0, violations=0, sql_violations=0, fcntl_violations=0, holds=0,
            checks_during_holds=0, holds_without_check=0, refusals=0, wal_requests=0,
            downgrade_requests=0, connections=0, reads=0, naive_reads=0, naive_unprotected=0,
            commits=0, unexpected_errors=0)
        self.unexpected: Dict[str, int] = {}
        self.walpatch: Any = None
        if walpatch_on:
            import walpatch

            walpatch.install()
            self.walpatch = walpatch
        self.watcher = subprocess.Popen(
            [python(), "-m", "stress.locks", "watch", db, mode], env=child_env(), cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)

    def add(self, key: str, n: int = 1) -> None:
        with self.count_lock:
            self.c[key] += n

    def unexpected_error(self, exc: BaseException) -> None:
        key = f"{type(exc).__name__}: {str(exc)[:80]}"
        with self.count_lock:
            self.c["unexpected_errors"] += 1
            self.unexpected[key] = self.unexpected.get(key, 0) + 1

    def checks(self) -> int:
        if self.naive:
            return self.c["naive_reads"]
        return self.walpatch.stats()["disk_checks"] if self.walpatch else 0

    # --- threads ----------------------------------------------------------------------------

    def holder(self, index: int, holders: int) -> None:
        conn = sqlite3.connect(self.db, timeout=30, isolation_level=None)
        with self.count_lock:
            self.holders_connected += 1
            if self.holders_connected == holders:
                self.holders_ready.set()
        n = 0
        while not self.stop.is_set():
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                self.unexpected_error(exc)
                continue
            key = f"h{index}.{n}"
            conn.execute(f"INSERT INTO {TABLE}(k, writer, payload) VALUES (?, 'holder', x'00')",
                         (key,))
            n += 1
            self.add("holds")
            start = self.checks()
            limit = time.monotonic() + 1.0
            while self.checks() < start + 2 and time.monotonic() < limit:
                time.sleep(0.0005)
            done = self.checks() - start
            self.add("checks_during_holds", done)
            if done == 0:
                self.add("holds_without_check")
            self.probe()
            conn.execute("COMMIT")
            os.write(self.ledger_fd, (key + "\n").encode())
            self.add("commits")
        conn.close()

    def probe(self) -> None:
        with self.probe_lock:
            assert self.watcher.stdin is not None and self.watcher.stdout is not None
            self.watcher.stdin.write(f"PROBE {os.getpid()}\n")
            self.watcher.stdin.flush()
            result = json.loads(self.watcher.stdout.readline())
        lost = [k for k in ("shared", "reserved", "wal_write") if result.get(k) is False]
        self.add("probes")
        if lost or result["got_write_lock"]:
            self.add("violations")
        if lost:
            self.add("fcntl_violations")
        if result["got_write_lock"]:
            self.add("sql_violations")

    def checker(self, index: int) -> None:
        rng = random.Random(f"{self.seed}/checker/{index}")
        conns: List[sqlite3.Connection] = []
        actions: List[Callable[[sqlite3.Connection, random.Random], None]] = [
            self._downgrade, self._read]
        if self.mode == "wal":
            actions.append(self._wal)
        while not self.stop.is_set():
            if not conns or (len(conns) < 3 and rng.random() < 0.2):
                conns.append(sqlite3.connect(self.db, timeout=30))
                self.add("connections")
            conn = rng.choice(conns)
            try:
                rng.choice(actions)(conn, rng)
            except sqlite3.Error as exc:
                self.unexpected_error(exc)
            if rng.random() < 0.1:  # SQLite defers the close of a file another connection
                conns.remove(conn)  # of this process uses: closing is safe (design.md 5)
                conn.close()
        for conn in conns:
            conn.close()

    def _downgrade(self, conn: sqlite3.Connection, rng: random.Random) -> None:
        self.add("downgrade_requests")
        word = "DELETE" if self.mode == "wal" else rng.choice(("DELETE", "TRUNCATE"))
        try:
            conn.execute(f"PRAGMA journal_mode={word}").fetchall()
        except sqlite3.OperationalError as exc:
            if self.walpatch is not None and isinstance(exc, self.walpatch.WalDowngradeRefused):
                self.add("refusals")
                return
            raise
        if self.mode != "wal":
            conn.execute("PRAGMA journal_mode=DELETE").fetchall()

    def _wal(self, conn: sqlite3.Connection, rng: random.Random) -> None:
        self.add("wal_requests")
        got = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if got != "wal":
            raise sqlite3.OperationalError(f"journal_mode=WAL returned {got!r}")

    def _read(self, conn: sqlite3.Connection, rng: random.Random) -> None:
        conn.execute(f"SELECT count(*) FROM {TABLE}").fetchall()
        self.add("reads")

    def naive_reader(self) -> None:
        # Not before the holders' connections: see the module docstring.
        while not self.holders_ready.wait(0.05):
            if self.stop.is_set():
                return
        while not self.stop.is_set():
            with open(self.db, "rb") as f:  # the hazard of design.md section 5, on purpose
                f.read(100)
                owned = f.raw.closefd  # False: served from the lock guard's parked descriptor
            self.add("naive_reads")
            if owned:
                self.add("naive_unprotected")
            time.sleep(0.001)

    # --- run --------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        holders = max(2, self.threads // 4)
        workers = [threading.Thread(target=self.holder, args=(i, holders), daemon=True)
                   for i in range(holders)]
        workers += [threading.Thread(target=self.checker, args=(i,), daemon=True)
                    for i in range(max(1, self.threads - holders))]
        if self.naive:
            workers.append(threading.Thread(target=self.naive_reader, daemon=True))
        started = time.monotonic()
        for w in workers:
            w.start()
        time.sleep(self.duration)
        self.stop.set()
        for w in workers:
            w.join(timeout=60)
        assert self.watcher.stdin is not None
        self.watcher.stdin.close()
        self.watcher.wait(timeout=30)
        out: Dict[str, Any] = dict(self.c)
        out.update(
            mode=self.mode, threads=len(workers), holders=holders, naive=self.naive,
            walpatch=self.walpatch is not None, seconds=round(time.monotonic() - started, 1),
            unexpected=self.unexpected, hung_threads=sum(w.is_alive() for w in workers),
            guard_disk_checks=self.walpatch.stats()["disk_checks"] if self.walpatch else 0,
            guard_refusals=self.walpatch.stats()["downgrades_refused"] if self.walpatch else 0)
        return out


def main(argv: Optional[List[str]] = None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    if args[0] == "watch":
        return watch(args[1], args[2])
    flags = {a for a in args if a.startswith("--")}
    pos = [a for a in args if not a.startswith("--")]
    db, ledger, mode = pos[1], pos[2], pos[3]
    duration, threads, seed = float(pos[4]), int(pos[5]), int(pos[6])
    run = LockRun(db, ledger, mode, duration, threads, seed, "--naive" in flags,
                  "--no-walpatch" not in flags)
    print(json.dumps(run.run(), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
