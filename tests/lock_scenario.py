"""Process A of the lock-guard scenarios (issue 12), run as its own interpreter:

    python -m tests.lock_scenario DB GUARD SNIFF

GUARD: protect | detect | off (walpatch installed with that lock_guard) | none (no walpatch).
SNIFF: none | open | shutil | read_bytes | shm (os.open + os.close of DB-shm).

WAL scenario: A holds a read transaction on DB and sniffs it; process C opens DB, inserts one
row and closes its only connection (if A's locks are gone, C believes it is the last user:
it checkpoints and deletes -wal/-shm under A); then A and a long-lived process B insert 20 rows
each, alternating. The last line printed is a JSON object: rows counted afterwards by a fresh
process, whether -wal/-shm were deleted (inode changed) under A, integrity_check, and whether
another process saw A's lock on -shm's DMS byte. Runs with plain sqlite3 in C, B and the counter.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

C_CODE = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("INSERT INTO t(v) VALUES ('from C')")
c.close()
"""

B_CODE = """
import sqlite3, sys
b = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "stop":
        break
    b.execute("INSERT INTO t(v) VALUES ('from B')")
    print("ok", flush=True)
b.close()
"""

COUNT_CODE = """
import sqlite3, sys, json
c = sqlite3.connect(sys.argv[1])
print(json.dumps({"rows": c.execute("SELECT count(*) FROM t").fetchone()[0],
                  "by": dict(c.execute("SELECT v, count(*) FROM t GROUP BY v").fetchall()),
                  "integrity": c.execute("PRAGMA integrity_check").fetchone()[0]}))
c.close()
"""

#: Who holds a lock on byte 128 of -shm (the dead-man switch every user of the WAL index
#: keeps a shared lock on), asked from another process with F_GETLK.
PROBE_SHM_CODE = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
req = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 128, 1, 0)
res = fcntl.fcntl(fd, fcntl.F_GETLK, req)
kind, _, _, _, pid = struct.unpack("hhqqi", res)
print("held" if kind != fcntl.F_UNLCK else "free")
"""


def _py(code: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return proc.stdout.strip()


def _ino(path: str) -> int:
    try:
        return os.stat(path).st_ino  # stat opens nothing
    except FileNotFoundError:
        return 0


def main(db: str, guard: str, sniff: str) -> None:
    import sqlite3

    # the database, made by another process before A starts
    _py("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); "
        "c.execute('PRAGMA journal_mode=WAL'); c.execute('CREATE TABLE t(v)'); "
        "c.execute(\"INSERT INTO t(v) VALUES ('initial')\"); c.commit(); c.close()", db)
    if guard != "none":
        import walpatch

        walpatch.install(lock_guard=guard)
    a = sqlite3.connect(db, isolation_level=None)
    a.execute("BEGIN")
    a.execute("SELECT count(*) FROM t").fetchone()  # A's read transaction
    wal, shm = _ino(db + "-wal"), _ino(db + "-shm")

    if sniff == "open":
        with open(db, "rb") as f:
            assert f.read(100)[:16] == b"SQLite format 3\x00"
    elif sniff == "shutil":
        shutil.copy(db, db + ".copy")
    elif sniff == "read_bytes":
        assert Path(db).read_bytes()[:6] == b"SQLite"
    elif sniff == "shm":
        fd = os.open(db + "-shm", os.O_RDONLY)
        os.close(fd)
    shm_lock = _py(PROBE_SHM_CODE, db + "-shm")

    _py(C_CODE, db)  # opens, writes one row, closes its only connection
    deleted = {"wal": _ino(db + "-wal") != wal, "shm": _ino(db + "-shm") != shm}
    a.execute("COMMIT")

    env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    b = subprocess.Popen([sys.executable, "-c", B_CODE, db], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
    assert b.stdout is not None and b.stdin is not None
    assert b.stdout.readline().strip() == "ready"
    for _ in range(20):
        a.execute("INSERT INTO t(v) VALUES ('from A')")
        b.stdin.write("insert\n")
        b.stdin.flush()
        assert b.stdout.readline().strip() == "ok"
    a.close()
    b.stdin.write("stop\n")
    b.stdin.flush()
    b.wait(timeout=30)

    result = json.loads(_py(COUNT_CODE, db))
    result.update(deleted_under_a=deleted, shm_lock_seen_by_other=shm_lock, guard=guard,
                  sniff=sniff)
    if guard != "none":
        import walpatch

        result["stats"] = {k: v for k, v in walpatch.stats().items()
                           if k.startswith("lock_guard")}
    print(json.dumps(result))


_ = (fcntl, struct)  # used by the probe code's documentation above

if __name__ == "__main__":
    main(*sys.argv[1:4])
