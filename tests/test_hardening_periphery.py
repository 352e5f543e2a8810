"""Issue 10, items 4, 6, 7, 10, 11, 15 and 17: configuration, factories, the event sink, the
lazy import of the guard, the CLI's inputs, ``walpatch run``'s PYTHONPATH and aiosqlite.

Every case runs in real processes on real files (real FIFOs, /dev/full, real rlimits, libfiu);
each test failed on main at 737015a (the report in /work/notes/periphery.md says how each
failed there) and passes now. Every child runs with a timeout: a hang is a failure, not a
stuck suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from .dbutil import header, make_db

ROOT = Path(__file__).resolve().parent.parent
DROP_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search"]


def env(**extra: Optional[str]) -> Dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    e["PYTHONPATH"] = str(ROOT)
    # These tests count walpatch's stderr lines; the WAL-reset warning of this machine's
    # SQLite (tests/test_sqliteinfo.py's subject) is not one of theirs.
    e["WALPATCH_WAL_RESET_BUG"] = "accept"
    for k, v in extra.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


def child(code: str, *args: str, cwd: Optional[Path] = None, timeout: float = 60,
          prefix: Sequence[str] = (), **extra: Optional[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], env=env(**extra),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def cli(*args: str, cwd: Optional[Path] = None, timeout: float = 60,
        prefix: Sequence[str] = (), preexec_fn=None, **extra: Optional[str]
        ) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "walpatch", *args], env=env(**extra),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def walpatch_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if "walpatch" in line]


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in {stdout!r}")


# ---- item 4: relative globs, factories that are not classes ----------------------------------

DOWNGRADE = r"""
import json, sqlite3, sys, walpatch
{install}
c = sqlite3.connect("a.db")
try:
    c.execute("PRAGMA journal_mode=DELETE")
    out = "passed"
except walpatch.WalDowngradeRefused as e:
    out = "refused"
c.close()
print(json.dumps({{"out": out, "include": list(walpatch.status()["settings"]["include_paths"])}}))
"""


@pytest.mark.parametrize("how", ["keyword", "environment"])
def test_relative_include_glob_is_resolved_against_the_working_directory(tmp_path: Path,
                                                                          how: str) -> None:
    db = tmp_path / "a.db"
    make_db(db, "wal")
    if how == "keyword":
        proc = child(DOWNGRADE.format(install='walpatch.install(include_paths=["a.db"])'),
                     cwd=tmp_path)
    else:
        proc = child(DOWNGRADE.format(install="walpatch.install()"), cwd=tmp_path,
                     WALPATCH_INCLUDE_PATHS="a.db")
    assert proc.returncode == 0, proc.stderr
    result = last_json(proc.stdout)
    # main: the glob stayed "a.db", matched no absolute path, and the downgrade went through
    assert result == {"out": "refused", "include": [str(tmp_path / "a.db")]}
    assert header(db) == (2, 2)
    # the relative glob itself is fine: no warning about it (only the refusal is reported)
    assert [line for line in walpatch_lines(proc.stderr) if "refused" not in line] == []


def test_relative_include_glob_excludes_other_files(tmp_path: Path) -> None:
    """The control: an anchored glob guards only what it names."""
    make_db(tmp_path / "a.db", "wal")
    code = DOWNGRADE.format(install='walpatch.install(include_paths=["b.db"])')
    proc = child(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout)["out"] == "passed"
    assert header(tmp_path / "a.db") == (1, 1)


FACTORY = r"""
import functools, json, sqlite3, sys, walpatch
from walpatch.connection import is_guarded
walpatch.install()
class MyConn(sqlite3.Connection):
    pass
class MySlots(sqlite3.Connection):
    __slots__ = ()
def plain(*a, **k):
    return sqlite3.Connection(*a, **k)
factories = {
    "class": MyConn,
    "partial": functools.partial(MyConn),
    "partial-args": functools.partial(MyConn, isolation_level=None),
    "lambda": lambda *a, **k: MyConn(*a, **k),
    "lambda-slots": lambda *a, **k: MySlots(*a, **k),
    "function-plain": plain,
}
name = sys.argv[1]
out = {}
for i in range(2):
    c = sqlite3.connect("a.db", factory=factories[name])
    out["guarded"] = is_guarded(c)
    out["isinstance_myconn"] = isinstance(c, MyConn)
    out["isolation_level"] = c.isolation_level
    try:
        c.execute("PRAGMA journal_mode=DELETE")
        out["downgrade"] = "passed"
        c.execute("PRAGMA journal_mode=WAL")
    except walpatch.WalDowngradeRefused:
        out["downgrade"] = "refused"
    c.close()
out["connections"] = walpatch.stats()["connections"]
print(json.dumps(out))
"""


@pytest.mark.parametrize("name,subclass", [
    ("class", True), ("partial", True), ("partial-args", True), ("lambda", True),
    ("lambda-slots", False)])
def test_factories_that_are_not_classes_are_guarded(tmp_path: Path, name: str,
                                                    subclass: bool) -> None:
    make_db(tmp_path / "a.db", "wal")
    proc = child(FACTORY, name, cwd=tmp_path, WALPATCH_LOG_LEVEL="ERROR")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    # main: partial and lambda gave an unguarded MyConn and the downgrade passed (1/1)
    assert out["guarded"] is True and out["downgrade"] == "refused", out
    assert out["isinstance_myconn"] is subclass
    assert out["connections"] == 2
    assert out["isolation_level"] == (None if name == "partial-args" else "")
    assert header(tmp_path / "a.db") == (2, 2)
    assert proc.stderr == ""


def test_factory_whose_result_cannot_be_guarded_is_reported_once(tmp_path: Path) -> None:
    """A function returning a plain sqlite3.Connection (an immutable C type): walpatch cannot
    guard it, so it says so once, naming the factory (main: silence)."""
    make_db(tmp_path / "a.db", "wal")
    proc = child(FACTORY, "function-plain", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert out["guarded"] is False and out["downgrade"] == "passed"
    assert out["connections"] == 0
    lines = walpatch_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "connect(factory=__main__.plain)" in lines[0] and "NOT guarded" in lines[0]


# ---- item 6: the event sink never blocks ---------------------------------------------------

MANY_EVENTS = r"""
import json, sqlite3, sys, time, walpatch
t0 = time.monotonic()
c = sqlite3.connect("a.db")
for _ in range(int(sys.argv[1])):
    c.execute("PRAGMA journal_mode=WAL")
c.close()
print(json.dumps({"seconds": time.monotonic() - t0, "stats": walpatch.stats()}))
"""


def test_event_file_fifo_without_reader_does_not_hang_import(tmp_path: Path) -> None:
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    make_db(tmp_path / "a.db", "wal")
    # main: `import sqlite3` blocked forever in open(fifo, O_WRONLY) -> TimeoutExpired
    proc = child(MANY_EVENTS, "3", cwd=tmp_path, timeout=30, WALPATCH="1",
                 WALPATCH_EVENT_FILE=str(fifo))
    assert proc.returncode == 0, proc.stderr
    lines = walpatch_lines(proc.stderr)
    assert len(lines) == 1 and "is not a regular file" in lines[0] and str(fifo) in lines[0]
    assert last_json(proc.stdout)["stats"]["wal_ok"] == 3


def test_event_file_fifo_with_a_reader_that_never_reads(tmp_path: Path) -> None:
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    make_db(tmp_path / "a.db", "wal")
    reader = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)\n"
         "print('ready', flush=True)\ntime.sleep(300)\n", str(fifo)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "ready\n"
        # 600 wal-ok events are about 150 KB, more than a pipe holds (64 KB): on main the
        # application blocked inside execute() once the pipe was full -> TimeoutExpired
        proc = child(MANY_EVENTS, "600", cwd=tmp_path, timeout=60, WALPATCH="1",
                     WALPATCH_EVENT_FILE=str(fifo))
    finally:
        reader.kill()
        reader.wait()
    assert proc.returncode == 0, proc.stderr
    lines = walpatch_lines(proc.stderr)
    assert len(lines) == 1 and "is not a regular file" in lines[0]
    assert last_json(proc.stdout)["stats"]["wal_ok"] == 600


def test_cli_does_not_hang_on_a_fifo_event_file(tmp_path: Path) -> None:
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    make_db(tmp_path / "a.db", "wal")
    for args in (["check", "--integrity", "a.db"], ["probe", "--json", str(tmp_path)]):
        proc = cli(*args, cwd=tmp_path, timeout=60, WALPATCH="1",
                   WALPATCH_EVENT_FILE=str(fifo))
        assert proc.returncode == 0, (args, proc.stderr)


def test_event_file_dev_full_is_refused_with_one_warning(tmp_path: Path) -> None:
    make_db(tmp_path / "a.db", "wal")
    proc = child(MANY_EVENTS, "5", cwd=tmp_path, timeout=30, WALPATCH="1",
                 WALPATCH_EVENT_FILE="/dev/full")
    assert proc.returncode == 0, proc.stderr
    # main: every line was dropped with no word at all
    lines = walpatch_lines(proc.stderr)
    assert len(lines) == 1 and "'/dev/full' is not a regular file" in lines[0], proc.stderr
    assert last_json(proc.stdout)["stats"]["wal_ok"] == 5


FSIZE = r"""
import json, os, resource, signal, sqlite3, sys, walpatch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() past the limit fails with EFBIG
c = sqlite3.connect("a.db")
c.execute("PRAGMA journal_mode=WAL")          # one event written
size = os.path.getsize(sys.argv[1])
assert size > 0
resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
for _ in range(20):
    c.execute("PRAGMA journal_mode=WAL")      # 20 events that cannot be written
c.close()
print(json.dumps({"size_after": os.path.getsize(sys.argv[1]), "size": size,
                  "stats": walpatch.stats()}))
"""


def test_event_write_failures_are_counted_and_warned_once(tmp_path: Path) -> None:
    """A real write failure on a regular file: RLIMIT_FSIZE makes the kernel refuse the
    write with EFBIG (main: dropped silently, no counter)."""
    make_db(tmp_path / "a.db", "wal")
    events = tmp_path / "events.jsonl"
    proc = child(FSIZE, str(events), cwd=tmp_path, timeout=30, WALPATCH="1",
                 WALPATCH_EVENT_FILE=str(events))
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert out["stats"]["wal_ok"] == 21
    assert out["stats"]["events_dropped"] == 20
    assert out["size_after"] == out["size"]
    lines = walpatch_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "cannot write to WALPATCH_EVENT_FILE" in lines[0] and "file too large" in lines[0]
    assert "events_dropped" in lines[0]
    # the lines written before the limit are whole JSON
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds == ["installed", "wal-ok"]


def test_event_file_regular_file_still_works(tmp_path: Path) -> None:
    """Control: a regular event file gets every event, nothing dropped, nothing said."""
    make_db(tmp_path / "a.db", "wal")
    events = tmp_path / "events.jsonl"
    proc = child(MANY_EVENTS, "7", cwd=tmp_path, timeout=30, WALPATCH="1",
                 WALPATCH_EVENT_FILE=str(events))
    assert proc.returncode == 0 and proc.stderr == ""
    assert last_json(proc.stdout)["stats"]["events_dropped"] == 0
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds.count("wal-ok") == 7


# ---- item 7: walpatch's own failures in connect() -------------------------------------------

BLOCKED = r"""
import json, sqlite3, sys
class Blocker:
    # Stands in for a broken install (a chroot or image without walpatch's package files):
    # the guard's module cannot be imported.
    def find_spec(self, name, path=None, target=None):
        if name == "walpatch.connection":
            raise ModuleNotFoundError("No module named 'walpatch.connection'", name=name)
        return None
blocker = Blocker()
sys.meta_path.insert(0, blocker)
out = {}
c = sqlite3.connect(":memory:")
out["first"] = c.execute("SELECT 1").fetchall()
sys.stderr.write("--mark--\n")
c2 = sqlite3.connect("a.db")
c2.execute("PRAGMA journal_mode=DELETE")   # unguarded while the guard cannot load
out["second"] = c2.execute("PRAGMA journal_mode").fetchall()
c2.execute("PRAGMA journal_mode=WAL")
c2.close()
sys.meta_path.remove(blocker)               # the install is whole again: guarded again
c3 = sqlite3.connect("a.db")
from walpatch.connection import is_guarded
import walpatch
out["guarded_after"] = is_guarded(c3)
try:
    c3.execute("PRAGMA journal_mode=DELETE")
    out["downgrade_after"] = "passed"
except walpatch.WalDowngradeRefused:
    out["downgrade_after"] = "refused"
print(json.dumps(out))
"""


def test_connect_falls_back_when_the_guard_cannot_be_imported(tmp_path: Path) -> None:
    make_db(tmp_path / "a.db", "wal")
    proc = child(BLOCKED, cwd=tmp_path, timeout=30, WALPATCH="1", WALPATCH_LOG_LEVEL="ERROR")
    # main: ModuleNotFoundError: No module named 'walpatch.connection' out of connect()
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert out == {"first": [[1]], "second": [["delete"]], "guarded_after": True,
                   "downgrade_after": "refused"}
    before, after = proc.stderr.split("--mark--\n")
    lines = walpatch_lines(before)
    assert len(lines) == 1 and lines[0].startswith("walpatch: cannot load its guard "
                                                   "(ModuleNotFoundError: No module named "
                                                   "'walpatch.connection')"), proc.stderr
    assert "NOT guarded" in lines[0] and "tries again" in lines[0]
    assert walpatch_lines(after) == []  # once, not at every connect
    assert header(tmp_path / "a.db") == (2, 2)


NOFILE = r"""
import json, resource, sqlite3, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))   # no new descriptor from here on
out = {}
try:
    open(sys.executable).close()
    out["open"] = "worked"
except OSError as e:
    out["open"] = e.errno
try:
    c = sqlite3.connect(":memory:")
    out["connect"] = c.execute("SELECT 1").fetchall()
except Exception as e:
    out["connect"] = "%s: %s" % (type(e).__name__, e)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
from walpatch.connection import is_guarded
out["guarded_after"] = is_guarded(sqlite3.connect(":memory:"))
print(json.dumps(out))
"""


def test_connect_at_the_descriptor_limit(tmp_path: Path) -> None:
    proc = child(NOFILE, cwd=tmp_path, timeout=30, WALPATCH="1")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    # main: "OSError: [Errno 24] Too many open files: '.../walpatch/connection.py'"
    assert out == {"open": 24, "connect": [[1]], "guarded_after": True}
    lines = walpatch_lines(proc.stderr)
    assert len(lines) == 1 and "cannot load its guard (OSError: [Errno 24]" in lines[0]


def test_connect_at_the_descriptor_limit_control(tmp_path: Path) -> None:
    """Control: without walpatch the same program connects (what walpatch must match)."""
    proc = child(NOFILE.replace("from walpatch.connection import is_guarded\n", "")
                 .replace("is_guarded(sqlite3.connect(\":memory:\"))", "None"),
                 cwd=tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout) == {"open": 24, "connect": [[1]], "guarded_after": None}


RANDOM_EMFILE = r"""
import ctypes, json, sqlite3, sys
fiu = ctypes.CDLL("libfiu.so.0")
fiu.fiu_init(0)
fiu.fiu_enable_random.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_uint, ctypes.c_float]
fiu.fiu_enable_random(b"posix/io/oc/open", 1, ctypes.c_void_p(24), 0, 0.3)
errors = []
for _ in range(10):
    try:
        sqlite3.connect(":memory:").execute("SELECT 1").fetchall()
    except Exception as e:
        errors.append("%s: %s" % (type(e).__name__, e))
fiu.fiu_disable(b"posix/io/oc/open")
from walpatch.connection import is_guarded
print(json.dumps({"errors": errors, "guarded_after": is_guarded(sqlite3.connect(":memory:"))}))
"""


@pytest.mark.fault
def test_connect_with_random_emfile_on_open(tmp_path: Path, libfiu) -> None:
    """libfiu fails open() with EMFILE at random (p=0.3) while the guard is first imported.
    Eight runs: on main most of them raised OSError out of connect()."""
    from walpatch import faults

    failures = []
    for _ in range(8):
        proc = child(RANDOM_EMFILE, cwd=tmp_path, timeout=60, prefix=faults.command_prefix(),
                     WALPATCH="1")
        assert proc.returncode == 0, proc.stderr
        out = last_json(proc.stdout)
        failures.extend(out["errors"])
        assert out["guarded_after"] is True
        assert len(walpatch_lines(proc.stderr)) <= 1, proc.stderr
    assert failures == []


# ---- item 10: check --integrity with FIFO sidecars, probe --mountinfo, --timeout -----------

@pytest.mark.parametrize("fifo", ["-wal", "-shm", "-journal"])
def test_check_integrity_does_not_hang_on_a_fifo_sidecar(tmp_path: Path, fifo: str) -> None:
    db = tmp_path / "w.db"
    make_db(db, "wal")
    os.mkfifo(str(db) + fifo)
    other = {"-wal": "-shm", "-shm": "-wal"}.get(fifo)
    if other:
        (tmp_path / ("w.db" + other)).write_bytes(b"")
    proc = cli("check", "--integrity", "--json", str(db), timeout=30)  # main: hangs
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)["files"][0]
    assert result["integrity"]["ran"] is False
    assert f"the {fifo} file cannot be used by a read-only check: not a regular file" in \
        result["integrity"]["how"]
    assert any(f"the {fifo} file cannot be inspected" in p for p in result["problems"])
    assert os.path.exists(str(db) + fifo) and header(db) == (2, 2)


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # main: reads /dev/zero on


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo"])
def test_probe_mountinfo_that_is_not_a_mount_table(tmp_path: Path, kind: str) -> None:
    source = kind
    if kind == "fifo":
        source = str(tmp_path / "mi.fifo")
        os.mkfifo(source)
    proc = cli("probe", "--json", "--mountinfo", source, str(tmp_path), timeout=60,
               preexec_fn=_limit_memory)
    assert proc.returncode == 0, proc.stderr
    fs = json.loads(proc.stdout)["filesystem"]
    assert fs["error"] == (f"cannot read {source}: not a regular file (give a mountinfo file "
                           "such as /proc/self/mountinfo)")
    assert f"warning: cannot read {source}: not a regular file" in proc.stderr


def test_probe_mountinfo_too_large(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(17 * 1024 * 1024)  # sparse: 17 MiB of zeros, no disk used
    proc = cli("probe", "--json", "--mountinfo", str(big), str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["filesystem"]["error"] == (
        f"cannot read {big}: larger than 16 MiB: not a mount table (give a mountinfo file "
        "such as /proc/self/mountinfo)")


@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "3000000", "0", "-1", "５", "1_0",
                                   "", "soon"])
def test_check_timeout_is_validated(tmp_path: Path, value: str) -> None:
    db = tmp_path / "w.db"
    make_db(db, "wal")
    proc = cli("check", "--integrity", f"--timeout={value}", str(db), timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == (f"walpatch check: --timeout {value!r}: expected a number of seconds "
                           "greater than 0 and at most 86400 (one day), such as 5\n")
    assert proc.stdout == ""


HOLD_EXCLUSIVE = r"""
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA journal_mode=DELETE")
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(60)
"""


def test_check_timeout_waits(tmp_path: Path) -> None:
    """Control: a valid timeout is waited for (1.5 s for a lock that is never released), and
    the largest one is accepted."""
    db = tmp_path / "r.db"
    make_db(db, "delete")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_EXCLUSIVE, str(db)], env=env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        t0 = time.monotonic()
        proc = cli("check", "--integrity", "--timeout", "1.5", "--json", str(db), timeout=60)
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1
    assert "database is locked" in json.loads(proc.stdout)["files"][0]["integrity"]["error"]
    assert waited >= 1.5
    proc = cli("check", "--timeout", "86400", str(db), timeout=30)
    assert proc.returncode == 0, proc.stderr


# ---- item 11: walpatch run keeps empty PYTHONPATH entries -----------------------------------

def test_run_keeps_empty_pythonpath_entries(tmp_path: Path) -> None:
    (tmp_path / "cwdmod.py").write_text("VALUE = 42\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "app.py").write_text(
        "import os, cwdmod, json\n"
        "print(json.dumps({'value': cwdmod.VALUE, 'pp': os.environ['PYTHONPATH']}))\n")
    walpatch = [sys.executable, "-m", "walpatch", "run", sys.executable, "sub/app.py"]
    e = env(PYTHONPATH=":")
    # without walpatch: the empty entries are the cwd, cwdmod imports (the behaviour to keep)
    plain = subprocess.run([sys.executable, "sub/app.py"], env=e, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and last_json(plain.stdout)["value"] == 42
    # walpatch itself must be importable by `-m walpatch` here: ROOT after the user's entries
    e["PYTHONPATH"] = ":" + str(ROOT) + ":"
    proc = subprocess.run(walpatch, env=e, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    # main: "ModuleNotFoundError: No module named 'cwdmod'" (the empty entries were dropped)
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert out["value"] == 42
    boot = str(ROOT / "walpatch" / "_sitecustomize")
    assert out["pp"] == f"{boot}::{ROOT}:"


def test_run_pythonpath_entries_exactly() -> None:
    from walpatch.cli.run import bootstrap_dir, child_environment

    here = bootstrap_dir()
    cases = {":": f"{here}::", "/a::/b": f"{here}:/a::/b", "/a:": f"{here}:/a:",
             "": here, None: here, f"{here}:": f"{here}:"}
    for given, expected in cases.items():
        environ = {} if given is None else {"PYTHONPATH": given}
        assert child_environment(False, False, environ)["PYTHONPATH"] == expected, given


# ---- item 15: allow_downgrade() and aiosqlite -----------------------------------------------

AIOSQLITE = r"""
import asyncio, json, sys
import aiosqlite, walpatch
walpatch.install()
async def main():
    out = {}
    async with aiosqlite.connect("a.db") as db:
        try:
            await db.execute("PRAGMA journal_mode=DELETE")
            out["outside"] = "passed"
        except walpatch.WalDowngradeRefused:
            out["outside"] = "refused"
        with walpatch.allow_downgrade():
            try:
                cur = await db.execute("PRAGMA journal_mode=DELETE")
                out["inside"] = await cur.fetchall()
            except walpatch.WalDowngradeRefused:
                out["inside"] = "refused"
        out["rows"] = await (await db.execute("SELECT count(*) FROM t")).fetchall()
    out["stats"] = {k: walpatch.stats()[k] for k in ("downgrades_allowed", "downgrades_refused")}
    print(json.dumps(out))
asyncio.run(main())
"""


@pytest.mark.parametrize("route", ["install", "environment"])
def test_allow_downgrade_reaches_aiosqlite_worker_thread(tmp_path: Path, route: str) -> None:
    pytest.importorskip("aiosqlite")
    db = tmp_path / "a.db"
    make_db(db, "wal")
    if route == "install":
        proc = child(AIOSQLITE, cwd=tmp_path, timeout=60, WALPATCH_LOG_LEVEL="ERROR")
    else:  # the .pth route: walpatch installs while aiosqlite imports sqlite3
        proc = child(AIOSQLITE.replace("walpatch.install()\n", ""), cwd=tmp_path, timeout=60,
                     WALPATCH="1", WALPATCH_LOG_LEVEL="ERROR")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    # main: "inside" was refused too (the worker thread did not see allow_downgrade())
    assert out == {"outside": "refused", "inside": [["delete"]], "rows": [[3]],
                   "stats": {"downgrades_allowed": 1, "downgrades_refused": 1}}
    assert header(db) == (1, 1)


# ---- item 17: smaller CLI and settings defects ----------------------------------------------

def test_probe_json_with_a_bad_directory_prints_a_json_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    proc = cli("probe", "--json", str(missing), timeout=60)
    assert proc.returncode == 2
    # main: nothing on stdout
    assert json.loads(proc.stdout) == {"walpatch_probe": 1, "exit_code": 2,
                                       "directory": str(missing),
                                       "error": f"{missing}: no such directory"}
    assert proc.stderr == f"walpatch probe: {missing}: no such directory\n"


def test_probe_proc_says_why() -> None:
    proc = cli("probe", "/proc", timeout=60)
    assert proc.returncode == 2
    # main: "cannot create scratch files there: no such file or directory"
    assert proc.stderr == ("walpatch probe: /proc: cannot create scratch files there: this "
                           "filesystem does not allow creating files (a pseudo filesystem such "
                           "as /proc or /sys?); give a directory where the database would "
                           "live\n")


def test_demo_dir_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    proc = cli("demo", "--dir", str(f), timeout=60)
    assert proc.returncode == 2
    # main: "no such directory"
    assert proc.stderr == (f"walpatch demo: --dir {f}: not a directory (give the directory to "
                           "create the scratch directory in)\n")
    proc = cli("demo", "--dir", str(tmp_path / "nope"), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"walpatch demo: --dir {tmp_path / 'nope'}: no such directory\n"


LEAVE_WAL = r"""
import os, sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA journal_mode=WAL")
c.execute("INSERT INTO t VALUES (99)")
os._exit(0)   # no close: -wal (with a frame) and -shm stay, as after a crash
"""


def test_check_cannot_read_wal_and_shm_is_not_ok(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop DAC capabilities with setpriv")
    db = tmp_path / "w.db"
    make_db(db, "wal")
    proc = child(LEAVE_WAL, str(db))
    assert proc.returncode == 0, proc.stderr
    for sfx in ("-wal", "-shm"):
        assert os.path.getsize(str(db) + sfx) > 0
        os.chmod(str(db) + sfx, 0)
    proc = cli("check", "--json", str(db), prefix=DROP_DAC, timeout=60)
    # main: status ok, exit 0, in_use False
    assert proc.returncode == 1, proc.stderr
    r = json.loads(proc.stdout)["files"][0]
    assert r["status"] == "problem" and r["in_use"] is None
    assert r["problems"] == [
        "the -wal file cannot be inspected: permission denied (run the check as a user who "
        "can read it)",
        "the -shm file cannot be inspected: permission denied (run the check as a user who "
        "can read it)"]
    assert r["locks"]["error"] == "the -shm file cannot be opened: permission denied"
    human = cli("check", str(db), prefix=DROP_DAC, timeout=60)
    assert human.returncode == 1
    assert "in use     unknown (locks cannot be queried: the -shm file cannot be opened: " \
           "permission denied)" in human.stdout
    # control: with the files readable the same check is ok
    for sfx in ("-wal", "-shm"):
        os.chmod(str(db) + sfx, 0o644)
    ok = cli("check", "--json", str(db), prefix=DROP_DAC, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["files"][0]["in_use"] is False


SETTINGS = r"""
import json, sqlite3, walpatch
c = sqlite3.connect(":memory:")
print(json.dumps(walpatch.status()["settings"]))
"""


@pytest.mark.parametrize("var,value,setting,default", [
    ("WALPATCH_RETRY_ATTEMPTS", "١٢", "retry_attempts", 5),
    ("WALPATCH_RETRY_ATTEMPTS", "５", "retry_attempts", 5),
    ("WALPATCH_RETRY_ATTEMPTS", "1_000", "retry_attempts", 5),
    ("WALPATCH_RETRY_TOTAL_TIMEOUT", "５", "retry_total_timeout", 5.0),
    ("WALPATCH_RETRY_INITIAL_DELAY", "0_1", "retry_initial_delay", 0.05),
    ("WALPATCH_RETRY_MAX_DELAY", "١", "retry_max_delay", 1.0),
])
def test_settings_take_ascii_digits_only(var: str, value: str, setting: str,
                                         default: object) -> None:
    proc = child(SETTINGS, timeout=30, WALPATCH="1", **{var: value})
    assert proc.returncode == 0, proc.stderr
    # main: accepted (retry_attempts 12, 5 or 1000) without a word
    assert last_json(proc.stdout)[setting] == default
    lines = walpatch_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert f"ignoring {var}={value!r}: expected a " in lines[0]
    assert "in ASCII digits, such as" in lines[0] and "protection stays on" in lines[0]


def test_settings_ascii_digits_control() -> None:
    proc = child(SETTINGS, timeout=30, WALPATCH="1", WALPATCH_RETRY_ATTEMPTS="12",
                 WALPATCH_RETRY_TOTAL_TIMEOUT="2.5", WALPATCH_RETRY_INITIAL_DELAY="1e-2")
    assert proc.returncode == 0 and proc.stderr == ""
    settings = last_json(proc.stdout)
    assert (settings["retry_attempts"], settings["retry_total_timeout"],
            settings["retry_initial_delay"]) == (12, 2.5, 0.01)


def test_install_keyword_numbers_are_still_accepted() -> None:
    from walpatch.config import build_config

    config, warnings = build_config({"retry_attempts": 7, "retry_initial_delay": 1e-05,
                                     "retry_total_timeout": 3}, environ={})
    assert warnings == []
    assert (config.retry_attempts, config.retry_initial_delay, config.retry_total_timeout) \
        == (7, 1e-05, 3.0)
    config, warnings = build_config({"retry_attempts": "１２"}, environ={})
    assert config.retry_attempts == 5 and len(warnings) == 1



def test_hooks_guarded_mark_matches_connection() -> None:
    """hooks.py names the mark without importing connection.py (the guard loads lazily)."""
    from walpatch import connection, hooks

    assert hooks._GUARDED_MARK == connection.GUARDED_MARK
