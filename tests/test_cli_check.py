"""`walpatch check` on real files: WAL, rollback, hot journal (a writer killed with SIGKILL),
truncated, not SQLite, empty, corrupt; databases held open and mid-transaction by another
process; bad paths; the JSON shape; exit codes; and that nothing is ever created or changed.

Every database is made and every check runs in a subprocess (the pytest process opens no
database file through SQLite).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent

TOP_KEYS = {"walpatch_check", "exit_code", "files"}
FILE_KEYS = {
    "path", "realpath", "status", "error", "size", "journal_mode", "journal_mode_detail",
    "header", "header_ok", "sidecars", "locks", "in_use", "lock_holders", "integrity",
    "expect", "expect_ok", "problems", "notes", "wal_reset_bug",
}
HEADER_KEYS = {
    "bytes_read", "magic_ok", "page_size", "write_version", "read_version", "reserved_bytes",
    "change_counter", "page_count", "schema_format", "text_encoding", "sqlite_version",
}
SIDECAR_KEYS = {
    "wal": {"exists", "size", "error", "valid_header", "page_size", "frames"},
    "shm": {"exists", "size", "error"},
    "journal": {"exists", "size", "error", "hot", "header_magic"},
}
INTEGRITY_KEYS = {"check", "ran", "ok", "messages", "error", "how"}
DROP_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search"]


def env() -> Dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    e["PYTHONPATH"] = str(ROOT)
    return e


def py(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=env(), capture_output=True,
                          text=True, timeout=timeout)


def check(*args: str, prefix: Sequence[str] = (), cwd: Optional[Path] = None
          ) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "walpatch", "check", *args],
                          env=env(), capture_output=True, text=True, timeout=60, cwd=cwd)


def check_json(*args: str, **kw) -> tuple:
    proc = check("--json", *args, **kw)
    assert "Traceback" not in proc.stderr, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == TOP_KEYS
    assert data["exit_code"] == proc.returncode
    for f in data["files"]:
        assert set(f) == FILE_KEYS, set(f) ^ FILE_KEYS
        if f["sidecars"] is not None:
            assert {k: set(v) for k, v in f["sidecars"].items()} == SIDECAR_KEYS
            assert set(f["locks"]) == {"error", "reserved", "pending", "shared", "shm"}
    return proc, data


MAKE = r"""
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
assert c.execute("PRAGMA journal_mode=" + sys.argv[2]).fetchone()[0] == sys.argv[2]
c.execute("CREATE TABLE t(x)")
c.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(int(sys.argv[3]))])
c.commit(); c.close()
"""


def make_db(path: Path, mode: str = "wal", rows: int = 50) -> Path:
    proc = py(MAKE, str(path), mode, str(rows))
    assert proc.returncode == 0, proc.stderr
    return path


def snapshot(directory: Path) -> Dict[str, tuple]:
    """Every file in ``directory``: (size, mtime_ns, sha256) — to prove nothing changed."""
    out = {}
    for p in sorted(directory.iterdir()):
        if p.is_file():
            out[p.name] = (p.stat().st_size, p.stat().st_mtime_ns,
                           hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# ---- plain files ----------------------------------------------------------------------------

def test_wal_and_rollback_files_json(tmp_path: Path) -> None:
    wal, rb = make_db(tmp_path / "wal.db", "wal"), make_db(tmp_path / "rb.db", "delete")
    before = snapshot(tmp_path)
    proc, data = check_json("--integrity", str(wal), str(rb))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["walpatch_check"] == 1
    w, r = data["files"]
    assert (w["status"], w["journal_mode"], r["journal_mode"]) == ("ok", "wal", "rollback")
    assert (w["header"]["write_version"], w["header"]["read_version"]) == (2, 2)
    assert (r["header"]["write_version"], r["header"]["read_version"]) == (1, 1)
    for f in (w, r):
        assert set(f["header"]) == HEADER_KEYS
        assert set(f["integrity"]) >= INTEGRITY_KEYS
        assert f["integrity"]["ran"] and f["integrity"]["ok"] and f["integrity"]["check"] == \
            "quick_check"
        assert f["header"]["page_size"] == 4096 and f["header"]["magic_ok"] is True
        assert f["header_ok"] is True and f["problems"] == []
        assert f["in_use"] is False and f["lock_holders"] == []
        assert set(f["sidecars"]) == {"wal", "shm", "journal"}
    # A WAL file without -wal/-shm: a mode=ro connection would have created both; the check
    # must have read it another way and left the directory exactly as it was.
    assert "immutable=1" in w["integrity"]["how"]
    assert snapshot(tmp_path) == before


def test_human_output_and_full_integrity(tmp_path: Path) -> None:
    wal = make_db(tmp_path / "wal.db", "wal")
    proc = check("--full", str(wal))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{wal}: WAL (header bytes 18-19 = 2/2)"
    assert "  integrity  integrity_check: ok" in lines
    assert "  sidecars   -wal none, -shm none, -journal none" in lines


def test_expect_wal_exit_codes(tmp_path: Path) -> None:
    wal, rb = make_db(tmp_path / "wal.db", "wal"), make_db(tmp_path / "rb.db", "delete")
    assert check("--expect", "wal", str(wal)).returncode == 0
    proc, data = check_json("--expect", "wal", str(wal), str(rb))
    assert proc.returncode == 1
    assert [f["expect_ok"] for f in data["files"]] == [True, False]
    assert data["files"][1]["problems"] == ["expected journal mode wal, the header says rollback"]
    assert check("--expect", "rollback", str(rb)).returncode == 0


def test_not_sqlite_truncated_empty(tmp_path: Path) -> None:
    rb = make_db(tmp_path / "rb.db", "delete")
    (tmp_path / "text.db").write_text("hello, this is not a database\n" * 10)
    (tmp_path / "trunc.db").write_bytes(rb.read_bytes()[:50])
    (tmp_path / "empty.db").write_bytes(b"")
    before = snapshot(tmp_path)
    proc, data = check_json("--integrity", *(str(tmp_path / n) for n in
                                             ("text.db", "trunc.db", "empty.db")))
    assert proc.returncode == 1
    text, trunc, empty = data["files"]
    assert text["status"] == "problem" and text["header"]["magic_ok"] is False
    assert text["problems"][0].startswith("not an SQLite database")
    assert text["journal_mode"] == "unknown" and text["integrity"]["ran"] is False
    assert trunc["problems"] == ["truncated header: 50 of 100 bytes"]
    assert trunc["header_ok"] is False
    assert empty["status"] == "ok" and empty["journal_mode"] == "empty"
    assert empty["integrity"]["ran"] is False
    assert check(str(tmp_path / "empty.db")).returncode == 0
    assert check("--expect", "wal", str(tmp_path / "empty.db")).returncode == 1
    assert snapshot(tmp_path) == before


def test_corrupt_page_fails_integrity(tmp_path: Path) -> None:
    db = make_db(tmp_path / "c.db", "delete", rows=2000)
    data = bytearray(db.read_bytes())
    data[4096 + 8:4096 + 40] = b"\xff" * 32  # page 2: the table's b-tree page header/cells
    db.write_bytes(bytes(data))
    proc, out = check_json("--integrity", str(db))
    assert proc.returncode == 1, proc.stdout
    f = out["files"][0]
    assert f["integrity"]["ok"] is False
    assert any("quick_check failed" in p for p in f["problems"])
    assert check(str(db)).returncode == 0  # without --integrity the header alone looks fine


def test_odd_characters_in_path_are_percent_encoded(tmp_path: Path) -> None:
    d = tmp_path / "we?ird#dir%41"
    d.mkdir()
    db = make_db(d / "a?mode=rw#x%20y.db", "delete")
    before = snapshot(d)
    proc, data = check_json("--integrity", str(db))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["files"][0]["integrity"]["ok"] is True
    assert snapshot(d) == before and sorted(os.listdir(tmp_path)) == [d.name]


# ---- bad input ------------------------------------------------------------------------------

def test_missing_path_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    proc = check(str(missing))
    assert proc.returncode == 2
    assert proc.stderr == f"walpatch check: {missing}: no such file or directory\n"
    assert proc.stdout == ""
    proc = check("--integrity", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("is a directory (give the database file itself)")
    assert len(proc.stderr.splitlines()) == 1
    assert not missing.exists() and list(tmp_path.iterdir()) == []  # nothing created
    # An error outranks a problem: missing + not-SQLite -> 2.
    (tmp_path / "x.txt").write_text("x" * 200)
    proc, data = check_json(str(tmp_path / "x.txt"), str(missing))
    assert proc.returncode == 2
    assert [f["status"] for f in data["files"]] == ["problem", "error"]


def test_fifo_is_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.db"
    os.mkfifo(fifo)
    proc = check(str(fifo))  # must not block waiting for a writer
    assert proc.returncode == 2 and "not a regular file" in proc.stderr


def test_permission_denied(tmp_path: Path) -> None:
    """A file this process may not read. As root, the kernel's permission check is made real
    by dropping CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH for the check process (setpriv)."""
    d = tmp_path / "perm"
    d.mkdir()
    tmp_path.chmod(0o755)  # let the unprivileged check reach the directory itself
    db = make_db(d / "secret.db", "wal")
    db.chmod(0)
    sub = d / "closed"
    sub.mkdir()
    make_db(sub / "inner.db", "delete")
    sub.chmod(0)
    prefix: List[str] = []
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop root's DAC caps"
        prefix = DROP_DAC
    try:
        proc = check("--integrity", str(db), str(sub / "inner.db"), prefix=prefix)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.splitlines() == [
            f"walpatch check: {db}: permission denied",
            f"walpatch check: {sub / 'inner.db'}: permission denied",
        ]
        # The same files are fine for a process that may read them (root with its caps).
        if prefix:
            assert check(str(db)).returncode == 0
    finally:
        sub.chmod(0o755)
        db.chmod(0o644)
    assert sorted(os.listdir(d)) == ["closed", "secret.db"]


def test_usage_errors() -> None:
    proc = check()
    assert proc.returncode == 2 and "the following arguments are required" in proc.stderr
    proc = check("--timeout", "-1", "x.db")
    assert proc.returncode == 2 and proc.stderr == (
        "walpatch check: --timeout '-1': expected a number of seconds greater than 0 and at "
        "most 86400 (one day), such as 5\n")


# ---- databases in use -----------------------------------------------------------------------

HOLDER = r"""
import sqlite3, sys
path, mode, spill = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
c = sqlite3.connect(path, isolation_level=None, timeout=10)
c.execute("PRAGMA journal_mode=" + mode)
if spill:
    c.execute("PRAGMA cache_size=1")
c.execute("BEGIN IMMEDIATE")
if spill:
    c.execute("UPDATE t SET x = x + 1")
else:
    c.execute("INSERT INTO t VALUES (-1)")
print("in-transaction", flush=True)
sys.stdin.readline()
c.execute("COMMIT")
print("committed", c.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
sys.stdin.readline()
"""


class Holder:
    def __init__(self, db: Path, mode: str, spill: bool = False) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), mode,
                                      "1" if spill else "0"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env())
        assert self.proc.stdout.readline().strip() == "in-transaction"

    def commit(self) -> str:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_wal_database_held_open_mid_transaction(tmp_path: Path) -> None:
    db = make_db(tmp_path / "busy.db", "wal", rows=50)
    holder = Holder(db, "wal")
    try:
        before = sorted(os.listdir(tmp_path))
        assert before == ["busy.db", "busy.db-shm", "busy.db-wal"]
        wal_before = (tmp_path / "busy.db-wal").read_bytes()
        shm_before = (tmp_path / "busy.db-shm").read_bytes()
        proc, data = check_json("--integrity", "--expect", "wal", str(db))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        f = data["files"][0]
        assert f["in_use"] is True and holder.proc.pid in f["lock_holders"]
        assert f["locks"]["reserved"] is None  # WAL writers lock the -shm, not the db file
        assert f["integrity"]["ok"] is True and "readonly_shm=1" in f["integrity"]["how"]
        assert f["sidecars"]["wal"]["exists"] and f["sidecars"]["shm"]["exists"]
        assert sorted(os.listdir(tmp_path)) == before
        assert (tmp_path / "busy.db-wal").read_bytes() == wal_before
        # readonly_shm=1: not even a read mark was written into the -shm file
        assert (tmp_path / "busy.db-shm").read_bytes() == shm_before
        # The holder's transaction was not disturbed: it commits its row.
        assert holder.commit() == "committed 51"
    finally:
        holder.close()


def test_rollback_database_with_a_live_writer(tmp_path: Path) -> None:
    db = make_db(tmp_path / "w.db", "delete", rows=50)
    holder = Holder(db, "delete")  # RESERVED lock, nothing spilled: readers may still read
    try:
        proc, data = check_json("--integrity", str(db))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        f = data["files"][0]
        assert f["locks"]["reserved"] == holder.proc.pid
        j = f["sidecars"]["journal"]
        assert j["exists"] is True and j["hot"] is False  # a live writer's journal is not hot
        assert f["integrity"]["ok"] is True
        assert "pid %d is writing" % holder.proc.pid in check(str(db)).stdout
        assert holder.commit() == "committed 51"
    finally:
        holder.close()


def test_exclusive_lock_makes_integrity_a_problem_not_a_hang(tmp_path: Path) -> None:
    db = make_db(tmp_path / "x.db", "delete", rows=3000)
    holder = Holder(db, "delete", spill=True)  # cache spill: EXCLUSIVE lock held
    try:
        proc, data = check_json("--integrity", "--timeout", "0.2", str(db))
        assert proc.returncode == 1, proc.stdout
        f = data["files"][0]
        assert f["integrity"]["ran"] is False
        assert "database is locked" in f["integrity"]["error"]
        assert f["problems"] == [f"quick_check could not run: {f['integrity']['error']}"]
        assert holder.commit() == "committed 3000"
    finally:
        holder.close()


def test_hot_journal_after_sigkill(tmp_path: Path) -> None:
    db = make_db(tmp_path / "hot.db", "delete", rows=3000)
    holder = Holder(db, "delete", spill=True)  # pages already written to the db file
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait()
    journal = tmp_path / "hot.db-journal"
    assert journal.exists() and journal.stat().st_size > 512
    before = snapshot(tmp_path)
    proc, data = check_json("--integrity", str(db))
    assert proc.returncode == 1, proc.stdout
    f = data["files"][0]
    assert f["sidecars"]["journal"]["hot"] is True
    assert f["sidecars"]["journal"]["header_magic"] is True
    assert f["in_use"] is False
    assert f["problems"][0].startswith("hot journal: a writer died mid-transaction")
    assert f["integrity"]["ran"] is False and "hot journal" in f["integrity"]["how"]
    assert "(HOT)" in check(str(db)).stdout
    assert snapshot(tmp_path) == before  # the check rolled nothing back
    # It really was hot: the next read-write connection rolls it back and the rows are intact.
    proc = py("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); "
              "print(c.execute('SELECT count(*), sum(x) FROM t').fetchone())", str(db))
    assert proc.stdout.strip() == f"(3000, {sum(range(3000))})", proc.stderr
    assert check(str(db)).returncode == 0


def test_wal_file_without_shm_is_not_opened(tmp_path: Path) -> None:
    """-wal present, -shm absent: a read-only connection would create the -shm file."""
    src = make_db(tmp_path / "src.db", "wal", rows=10)
    holder = Holder(src, "wal")
    try:
        assert holder.commit() == "committed 11"  # a committed frame sits in the -wal file
        copy = tmp_path / "copy"
        copy.mkdir()
        shutil.copy(src, copy / "c.db")
        shutil.copy(str(src) + "-wal", copy / "c.db-wal")
    finally:
        holder.close()
    before = snapshot(copy)
    proc, data = check_json("--integrity", str(copy / "c.db"))
    assert proc.returncode == 1, proc.stdout
    f = data["files"][0]
    assert f["sidecars"]["wal"]["frames"] >= 1 and f["sidecars"]["shm"]["exists"] is False
    assert f["integrity"]["ran"] is False
    assert "would create the -shm file" in f["integrity"]["how"]
    assert snapshot(copy) == before and sorted(os.listdir(copy)) == ["c.db", "c.db-wal"]


def test_wal_left_by_a_killed_process_is_read_without_writing(tmp_path: Path) -> None:
    """-wal and -shm left by a writer killed with SIGKILL: the check reads them (a committed
    frame lives only in the -wal) and leaves all three files byte for byte as they were."""
    db = make_db(tmp_path / "k.db", "wal", rows=20)
    holder = Holder(db, "wal")
    assert holder.commit() == "committed 21"
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait()
    assert sorted(os.listdir(tmp_path)) == ["k.db", "k.db-shm", "k.db-wal"]
    before = snapshot(tmp_path)
    proc, data = check_json("--integrity", "--full", str(db))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    f = data["files"][0]
    assert f["in_use"] is False and f["integrity"]["ok"] is True
    assert f["integrity"]["check"] == "integrity_check"
    assert f["sidecars"]["wal"]["frames"] >= 1 and f["sidecars"]["wal"]["valid_header"] is True
    assert snapshot(tmp_path) == before
