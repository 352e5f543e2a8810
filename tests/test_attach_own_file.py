"""A connection that has its own main file attached a second time (``ATTACH 'db' AS aux``):
the differential harness's ``attach_own_file`` finding.

With the same file attached twice, ``PRAGMA journal_mode=WAL`` inside a write transaction
raises "cannot change into wal mode from within a transaction" (the schema that has not
written cannot switch) where a single schema would answer 'delete' silently, and outside a
transaction the second schema meets the first one's lock (SQLITE_BUSY). So WAL requests fail
there, often through a cursor of the application's.

The defect: walpatch kept the error of a failed WAL request alive (in a reference cycle with
its own retry frame, and in the per-file history used to chain a later refusal). The error's
traceback holds walpatch's frames, and they hold the caller's cursor; a live cursor keeps its
prepared statement, so ``conn.close()`` left a zombie connection (``sqlite3_close_v2``): the
open transaction was neither rolled back nor its locks released. Seen as a ``-journal`` file
(4,616 bytes: one page) left next to a rollback-mode database after ``DELETE FROM`` and a
close, and another process getting "database is locked" for as long as the process lived.

Real SQLite files and real processes; plain sqlite3 is the control each time.
"""
from __future__ import annotations

import gc
import json
import os
import sqlite3
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any, Dict

import pytest

import walpatch
from walpatch import events, runtime

#: One program, run in a child with WALPATCH=0 (plain) or WALPATCH=1 (the installed .pth).
#: It stays alive after close() until the parent has looked, then ends without a collection.
CHILD = r"""
import gc, json, os, sqlite3, sys
directory, gc_mode, entry = sys.argv[1:4]
if gc_mode == "disabled":
    gc.disable()  # reference counting only: what plain sqlite3 needs to free a cursor
os.chdir(directory)
setup = sqlite3.Connection("db")  # the plain class: never guarded
setup.execute("CREATE TABLE t(x)")
setup.executemany("INSERT INTO t VALUES (?)", [(1,), (2,), (3,)])
setup.commit()
setup.close()

conn = sqlite3.connect("db", timeout=0.05)
conn.execute("ATTACH 'db' AS aux")  # its own main file, a second time
conn.execute("DELETE FROM t")  # implicit BEGIN: a write transaction with a -journal
out = {"walpatch": "walpatch" in sys.modules and sys.modules["walpatch"].is_installed()}
try:
    if entry == "cursor":
        conn.cursor().execute("PRAGMA journal_mode=WAL")
    else:
        conn.execute("PRAGMA journal_mode=WAL")
    out["wal"] = "no error"
except sqlite3.OperationalError as e:
    out["wal"] = [type(e).__name__, str(e)]
conn.close()  # never committed: rolled back, its locks released
if gc_mode == "collect":
    gc.collect()
out["files"] = {n: os.path.getsize(n) for n in sorted(os.listdir("."))}
print(json.dumps(out), flush=True)
sys.stdin.readline()
os._exit(0)  # like a killed process: no collection at exit
"""

WRITER = r"""
import sqlite3, sys
c = sqlite3.Connection(sys.argv[1], timeout=0)
try:
    c.execute("INSERT INTO t VALUES (4)")
    c.commit()
    print("ok")
except sqlite3.Error as e:
    print(type(e).__name__ + ": " + str(e))
"""


def _env(walpatch_on: bool) -> Dict[str, str]:
    env = dict(os.environ, WALPATCH="1" if walpatch_on else "0")
    env.pop("WALPATCH_ALLOW_DOWNGRADE", None)
    return env


def _header(path: Path) -> Any:
    data = path.read_bytes()[:100]
    return data[18], data[19]


def _run_child(tmp_path: Path, walpatch_on: bool, gc_mode: str, entry: str) -> Dict[str, Any]:
    """Run CHILD; while it is still alive, another process writes one row."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), gc_mode, entry],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env(walpatch_on))
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line, child.stderr.read()  # type: ignore[union-attr]
        out = json.loads(line)
        writer = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path / "db")],
                                capture_output=True, text=True, env=_env(False), timeout=60)
        out["other_process_writes"] = writer.stdout.strip() or writer.stderr.strip()
    finally:
        child.communicate("\n", timeout=60)
    assert child.returncode == 0
    return out


@pytest.mark.parametrize("entry", ["cursor", "conn"])
@pytest.mark.parametrize("gc_mode", ["collect", "disabled"])
@pytest.mark.parametrize("walpatch_on", [False, True], ids=["plain", "walpatch"])
def test_failed_wal_request_leaves_no_transaction_behind(tmp_path, walpatch_on, gc_mode, entry):
    """After close() the uncommitted DELETE is rolled back: no -journal, no lock, another
    process writes at once; the application saw the same error as without walpatch."""
    out = _run_child(tmp_path, walpatch_on, gc_mode, entry)
    assert out["walpatch"] is walpatch_on
    assert out["wal"] == ["OperationalError",
                          "cannot change into wal mode from within a transaction"]
    assert out["files"] == {"db": 8192}, "a -journal left behind: the transaction is open"
    assert out["other_process_writes"] == "ok"
    assert sorted(os.listdir(tmp_path)) == ["db"]
    assert _header(tmp_path / "db") == (1, 1)
    check = sqlite3.Connection(str(tmp_path / "db"))
    try:
        assert check.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,), (3,), (4,)]
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        check.close()


@pytest.fixture
def guarded_or_plain(request):
    """walpatch installed (the test's subject) or not (the control)."""
    events.reset()
    runtime.clear_history()
    if request.param:
        assert walpatch.install(retry_initial_delay=0.001, retry_max_delay=0.01,
                                retry_total_timeout=0.2)
    yield request.param
    walpatch.uninstall()
    events.reset()
    runtime.clear_history()


@pytest.mark.parametrize("guarded_or_plain", [False, True], ids=["plain", "walpatch"],
                         indirect=True)
def test_a_failed_wal_request_keeps_neither_the_cursor_nor_the_error(guarded_or_plain,
                                                                      tmp_path):
    """Reference counting alone frees the caller's cursor and the error once the application
    drops them, as without walpatch (no cycle through walpatch's frames, no traceback kept in
    its history). A later refused downgrade still carries the error: the same object while the
    application holds it (tests/test_guard.py), else a copy with the same type, message and
    codes and no traceback."""
    db = tmp_path / "db"
    setup = sqlite3.Connection(str(db))
    setup.execute("CREATE TABLE t(x)")
    setup.close()
    conn = sqlite3.connect(str(db), isolation_level=None)
    conn.execute("ATTACH ? AS aux", (str(db),))
    conn.execute("BEGIN")
    gc.collect()
    gc.disable()
    try:
        cur = conn.cursor()
        cursor_ref = weakref.ref(cur)
        try:
            cur.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as e:
            error_ref = weakref.ref(e)
            message = str(e)
        else:
            pytest.fail("the WAL request in a transaction did not raise")
        del cur
        assert message == "cannot change into wal mode from within a transaction"
        assert cursor_ref() is None, "the caller's cursor outlives its last reference"
        assert error_ref() is None, "the WAL request's error outlives the application's use"
    finally:
        gc.enable()
    conn.execute("ROLLBACK")
    if guarded_or_plain:
        # ("WAL failed, not permanent": the fallback is refused, chained to that error)
        with pytest.raises(walpatch.WalDowngradeRefused) as info:
            conn.execute("PRAGMA journal_mode=DELETE")
        cause = info.value.__cause__
        assert info.value.original_error is cause
        assert type(cause) is sqlite3.OperationalError and str(cause) == message
        assert cause.__traceback__ is None
        if sys.version_info >= (3, 11):
            assert cause.sqlite_errorname == "SQLITE_ERROR"
    else:
        assert conn.execute("PRAGMA journal_mode=DELETE").fetchall() == [("delete",)]
    conn.close()
    assert sorted(os.listdir(tmp_path)) == ["db"]


@pytest.mark.parametrize("walpatch_on", [False, True], ids=["plain", "walpatch"])
def test_busy_from_its_own_attached_file_is_retried_to_a_consistent_wal(tmp_path, walpatch_on):
    """Characterisation (passes before and after the fix): outside a transaction the second
    schema of the same file meets the first one's lock. Plain sqlite3 raises SQLITE_BUSY and
    leaves the connection half switched (aux answers 'wal', the file stays 1/1); walpatch
    retries the application's own WAL request (the decision table retries contention) and the
    second attempt completes it: 2/2 on disk, both schemas in WAL, and the file keeps working
    for this connection and another process (rows and integrity_check)."""
    script = r"""
import json, os, sqlite3, subprocess, sys
os.chdir(sys.argv[1])
setup = sqlite3.Connection("db")
setup.execute("CREATE TABLE t(x)")
setup.commit()
setup.close()
conn = sqlite3.connect("db", timeout=0.05, isolation_level=None)
conn.execute("ATTACH 'db' AS aux")
out = {}
try:
    out["wal"] = conn.execute("PRAGMA journal_mode=WAL").fetchall()
except sqlite3.OperationalError as e:
    out["wal"] = [type(e).__name__, str(e), getattr(e, "sqlite_errorname", None)]
out["modes"] = [conn.execute(f"PRAGMA {s}.journal_mode").fetchone()[0] for s in ("main", "aux")]
# The short timeout was for the WAL request only: the writes below share the file with another
# process (with 50 ms, plain sqlite3 met "database is locked" there in the 3.14 cell).
conn.execute("PRAGMA busy_timeout=10000")
other = subprocess.Popen([sys.executable, "-c", "import sqlite3\n"
    "c = sqlite3.Connection('db', timeout=10, isolation_level=None)\n"
    "for i in range(50): c.execute('INSERT INTO t VALUES (?)', (1000 + i,))\n"],
    env=dict(os.environ, WALPATCH="0"))
for i in range(50):
    conn.execute("INSERT INTO t VALUES (?)", (i,))
    conn.execute("INSERT INTO aux.t VALUES (?)", (500 + i,))
other.wait()
out["other"] = other.returncode
conn.close()
print(json.dumps(out))
"""
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, env=_env(walpatch_on), timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["other"] == 0
    if walpatch_on:
        assert out["wal"] == [["wal"]]
        assert out["modes"] == ["wal", "wal"]
        assert _header(tmp_path / "db") == (2, 2)
    else:
        assert out["wal"][:2] == ["OperationalError", "database is locked"]
        assert out["wal"][2] in (None, "SQLITE_BUSY")
        assert out["modes"] == ["delete", "wal"]
        assert _header(tmp_path / "db") == (1, 1)
    check = sqlite3.Connection(str(tmp_path / "db"))
    try:
        assert check.execute("SELECT count(*), count(DISTINCT x) FROM t").fetchone() == (150, 150)
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        check.close()
    assert sorted(os.listdir(tmp_path)) == ["db"]
