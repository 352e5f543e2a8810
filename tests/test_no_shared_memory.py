"""A real filesystem where WAL cannot work: a FUSE mount without shared mmap.

``bindfs -o direct_io``: the kernel refuses MAP_SHARED on direct-I/O FUSE files, so SQLite
cannot map the ``-shm`` file. SQLite still answers ``PRAGMA journal_mode=WAL`` with 'wal' and
writes the WAL header, and then every statement fails with IOERR_SHMMAP, for every process:
the file is bricked. With walpatch the switch is undone on the spot and the application's own
fallback runs. Needs root and bindfs (CI installs it); marked ``fault`` so that CI fails if
these tests were skipped there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from .dbutil import header, last_json, make_db, run_py

pytestmark = pytest.mark.fault


@pytest.fixture
def no_shm_dir(tmp_path):
    if shutil.which("bindfs") is None:
        pytest.skip("bindfs is not installed (apt-get install -y bindfs)")
    if os.geteuid() != 0:
        pytest.skip("mounting FUSE needs root here")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    proc = subprocess.run(["bindfs", "-o", "direct_io", str(src), str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"bindfs could not mount here: {proc.stderr.strip()}")
    for _ in range(50):
        if os.path.ismount(mnt):
            break
        time.sleep(0.05)
    yield mnt
    subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True)
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


APP = r"""
import json, sqlite3, sys
if sys.argv[2] == "walpatch":
    import walpatch
    walpatch.install()
conn = sqlite3.connect(sys.argv[1])
out = {}
try:
    out["wal"] = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
except sqlite3.DatabaseError as e:
    out["wal_error"] = [type(e).__name__, str(e), getattr(e, "sqlite_errorname", None)]
    out["fallback"] = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
try:
    conn.execute("CREATE TABLE IF NOT EXISTS t(x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    out["write"] = "ok"
except sqlite3.DatabaseError as e:
    out["write"] = [type(e).__name__, str(e)]
if sys.argv[2] == "walpatch":
    out["stats"] = walpatch.stats()
print(json.dumps(out))
"""


def test_without_walpatch_the_file_is_bricked(no_shm_dir):
    db = no_shm_dir / "plain.db"
    proc = run_py(APP, str(db), "plain")
    out = last_json(proc.stdout)
    assert out["wal"] == "wal"
    assert out["write"][0] == "OperationalError" and "disk I/O error" in out["write"][1]
    assert header(db) == (2, 2)


@pytest.mark.parametrize("existing", [False, True])
def test_with_walpatch_the_switch_is_undone_and_the_fallback_runs(no_shm_dir, existing):
    db = no_shm_dir / "guarded.db"
    if existing:
        make_db(db, "delete", rows=0)  # a rollback-journal file with table t, in use before
    proc = run_py(APP, str(db), "walpatch")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    if sys.version_info < (3, 11):
        # Documented limit: before 3.11 sqlite3 exposes no extended result code, so
        # IOERR_SHMMAP is a plain "disk I/O error" (taken as transient, fail closed) and the
        # switch is not undone: walpatch does no worse than without it, and no better.
        assert out["wal"] == "wal" and out["write"][0] == "OperationalError", out
        assert out["stats"]["wal_unsupported"] == 0
        assert header(db) == (2, 2)
        return
    assert out["wal_error"][0] == "OperationalError"
    if sys.version_info >= (3, 11):
        assert out["wal_error"][2] == "SQLITE_IOERR_SHMMAP"
    assert out["fallback"] == "delete" and out["write"] == "ok"
    assert out["stats"]["wal_unsupported"] == 1 and out["stats"]["downgrades_refused"] == 0
    assert "put the file back" in proc.stderr
    assert header(db) == (1, 1)
    # and the file works for another process afterwards
    check = run_py("import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("
                   "'SELECT count(*) FROM t').fetchone()[0])", str(db))
    assert check.stdout.strip() == "1", check.stderr
