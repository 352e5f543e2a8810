"""design.md §5: the guard's on-disk check must never release a lock this process holds.

Connection A holds a write lock; the guard checks the same file for connection B in the same
process; another process must still be locked out. The control case does what a naive
header read would do (``open().read(100)`` + ``close()``) and shows that the probe process
*can* detect a lost lock, so the main assertion is meaningful.
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

import walpatch
from walpatch import events, ondisk, runtime
from walpatch.errors import WalDowngradeRefused

from .dbutil import make_db

PROBE = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
try:
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO t VALUES ('from the other process')")
    c.execute("COMMIT")
    print("GOT-LOCK")
except sqlite3.OperationalError as e:
    print("LOCKED-OUT:", e)
"""


def other_process_can_write(db) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, str(db)], capture_output=True,
                         text=True, timeout=30).stdout
    assert out.startswith(("GOT-LOCK", "LOCKED-OUT")), out
    return out.startswith("GOT-LOCK")


@pytest.fixture
def guarded():
    events.reset()
    runtime.clear_history()
    walpatch.install()
    yield
    walpatch.uninstall()


def _writer(db):
    a = sqlite3.connect(str(db), isolation_level=None)
    a.execute("BEGIN IMMEDIATE")
    a.execute("INSERT INTO t VALUES ('held by A')")
    return a


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_guard_check_keeps_the_other_connections_lock(guarded, tmp_path, journal):
    db = tmp_path / "locked.db"
    make_db(db, journal)
    a = _writer(db)
    assert not other_process_can_write(db)
    b = sqlite3.connect(str(db))
    if journal == "wal":
        with pytest.raises(WalDowngradeRefused):
            b.execute("PRAGMA journal_mode=DELETE")
    else:
        b.execute("PRAGMA journal_mode=TRUNCATE").fetchall()
    assert walpatch.stats()["disk_checks"] == 1
    assert not other_process_can_write(db), "the guard's header check released A's lock"
    a.execute("COMMIT")
    a.close()
    b.close()


def test_fallback_descriptor_is_kept_open_and_safe(guarded, tmp_path, monkeypatch):
    """Without /proc (simulated: the only mock here, since /proc cannot be unmounted for one
    test), the check opens its own read-only descriptor and keeps it for good."""
    db = tmp_path / "noproc.db"
    make_db(db, "wal")
    monkeypatch.setattr(ondisk, "_PROC_FD_DIR", str(tmp_path / "no-such-proc"))
    monkeypatch.setattr(ondisk, "_fd_by_inode", {})
    a = _writer(db)
    before = ondisk.kept_descriptor_count()
    b = sqlite3.connect(str(db))
    for _ in range(3):
        with pytest.raises(WalDowngradeRefused):
            b.execute("PRAGMA journal_mode=DELETE")
    assert ondisk.kept_descriptor_count() == before + 1  # one descriptor, reused
    assert not other_process_can_write(db)
    a.execute("COMMIT")
    a.close()
    b.close()


def test_control_naive_header_read_loses_the_lock(tmp_path):
    """What the guard must not do: it really does release A's lock (so the probe works)."""
    db = tmp_path / "naive.db"
    make_db(db, "delete")
    a = _writer(db)
    assert not other_process_can_write(db)
    with open(db, "rb") as f:  # the hazard of design.md §5, on purpose
        f.read(100)
    assert other_process_can_write(db)
    a.close()


def test_check_never_creates_a_missing_file(tmp_path):
    missing = tmp_path / "does-not-exist.db"
    state = ondisk.read_disk_state(str(missing))
    assert state.mode == ondisk.ABSENT
    assert not missing.exists()
