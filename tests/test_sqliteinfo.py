"""Issue 11: which SQLite is underneath, the WAL-reset bug (warn / avoid / accept), and
``on_refusal=keep``. Real interpreters, real files: headers are read by other processes
(dbutil), events come from real walpatch processes or from the guard in this process.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

import walpatch
from walpatch import events, runtime, sqliteinfo
from walpatch.config import build_config
from walpatch.errors import WalDowngradeRefused

from .dbutil import ROOT, header, make_db, row_count, run_py
from .test_dropins import dropin_python  # noqa: F401  (session fixture: a venv with both)

DOWNGRADES = ["DELETE", "TRUNCATE", "PERSIST", "MEMORY", "OFF", "''"]
THIS_SQLITE_AFFECTED = sqliteinfo.wal_reset_bug(sqlite3.sqlite_version) == "affected"
needs_affected = pytest.mark.skipif(
    not THIS_SQLITE_AFFECTED,
    reason=f"this interpreter's SQLite {sqlite3.sqlite_version} is not affected")


# ------------------------------------------------------------------------------------------
# the verdict (pure)
# ------------------------------------------------------------------------------------------

VERDICTS = [
    ("3.6.0", "not-applicable"), ("3.6.23.1", "not-applicable"), ("3.6.99", "not-applicable"),
    ("3.7.0", "affected"), ("3.7.17", "affected"), ("3.40.1", "affected"),
    ("3.44.0", "affected"), ("3.44.5", "affected"), ("3.44.6", "fixed"), ("3.44.7", "fixed"),
    ("3.45.0", "affected"), ("3.49.2", "affected"),
    ("3.50.0", "affected"), ("3.50.4", "affected"), ("3.50.6", "affected"),
    ("3.50.7", "fixed"), ("3.50.8", "fixed"),
    ("3.51.0", "affected"), ("3.51.1", "affected"), ("3.51.2", "affected"),
    ("3.51.3", "fixed"), ("3.52.0", "fixed"), ("3.53.4", "fixed"), ("4.0.0", "fixed"),
    ("3.44.6.1", "fixed"), ("3.51.2.9", "affected"), ("3.7", "affected"),
    ("", "unknown"), ("three", "unknown"), ("3.x.1", "unknown"),
]


@pytest.mark.parametrize("version,expected", VERDICTS)
def test_verdict_table(version: str, expected: str) -> None:
    assert sqliteinfo.wal_reset_bug(version) == expected
    assert sqliteinfo.wal_reset_bug(version, "warn") == expected
    assert sqliteinfo.wal_reset_bug(version, "avoid") == expected
    accepted = "accepted" if expected in ("affected", "unknown") else expected
    assert sqliteinfo.wal_reset_bug(version, "accept") == accepted


@pytest.fixture(autouse=True)
def _default_wal_reset_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest.py accepts the WAL-reset bug for the rest of the suite; here it is the subject."""
    monkeypatch.delenv("WALPATCH_WAL_RESET_BUG", raising=False)



def test_parse_maps_keeps_file_mappings_only() -> None:
    text = (
        "7f0000000000-7f0000001000 r--p 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/"
        "libsqlite3.so.0.8.6\n"
        "7f0000001000-7f0000002000 r-xp 00001000 08:01 123 /usr/lib/x86_64-linux-gnu/"
        "libsqlite3.so.0.8.6\n"
        "7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0 [stack]\n"
        "7ffe00000000-7ffe00001000 rw-p 00000000 00:00 0\n"
        "55550000-55551000 r--p 00000000 08:01 9 /tmp/dir with space/lib x.so\n"
        "garbage\n")
    maps = sqliteinfo.parse_maps(text)
    assert maps == [
        (0x7f0000000000, 0x7f0000001000, "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0.8.6"),
        (0x7f0000001000, 0x7f0000002000, "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0.8.6"),
        (0x55550000, 0x55551000, "/tmp/dir with space/lib x.so"),
    ]
    assert sqliteinfo._mapped_file(maps, 0x7f0000001800).endswith("libsqlite3.so.0.8.6")
    assert sqliteinfo._mapped_file(maps, 0x1) is None


def test_settings_from_environment_and_install() -> None:
    config, warnings = build_config({}, {"WALPATCH_WAL_RESET_BUG": " Avoid ",
                                         "WALPATCH_ON_REFUSAL": "KEEP"})
    assert (config.wal_reset_bug, config.on_refusal, warnings) == ("avoid", "keep", [])
    assert dict(config.sources)["wal_reset_bug"] == "WALPATCH_WAL_RESET_BUG"
    config, warnings = build_config({"wal_reset_bug": "accept", "on_refusal": "raise"},
                                    {"WALPATCH_WAL_RESET_BUG": "avoid"})
    assert (config.wal_reset_bug, config.on_refusal) == ("accept", "raise")
    config, warnings = build_config({}, {})
    assert (config.wal_reset_bug, config.on_refusal) == ("warn", "raise")
    config, warnings = build_config({}, {"WALPATCH_WAL_RESET_BUG": "ignore",
                                         "WALPATCH_ON_REFUSAL": "swallow"})
    assert (config.wal_reset_bug, config.on_refusal) == ("warn", "raise")
    assert warnings == [
        "walpatch: ignoring WALPATCH_WAL_RESET_BUG='ignore': expected one of warn, avoid, "
        "accept; using the default ('warn'), protection stays on",
        "walpatch: ignoring WALPATCH_ON_REFUSAL='swallow': expected one of raise, keep; using "
        "the default ('raise'), protection stays on",
    ]


# ------------------------------------------------------------------------------------------
# status: which SQLite, really (this machine's interpreters)
# ------------------------------------------------------------------------------------------

def _status_json(python: Any, env: Optional[Dict[str, str]] = None,
                 pythonpath: Optional[str] = str(ROOT)) -> Dict[str, Any]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    if pythonpath is not None:
        full["PYTHONPATH"] = pythonpath
    full.update(env or {})
    proc = subprocess.run([str(python), "-m", "walpatch", "status", "--json"],
                          capture_output=True, text=True, env=full, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _by_module(info: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {e["module"]: e for e in info["sqlite"]}


def _ldd_libsqlite3(extension: str) -> str:
    """What the dynamic linker says the extension module loads (independent of walpatch)."""
    out = subprocess.run(["ldd", extension], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "libsqlite3" in line and "=>" in line:
            return os.path.realpath(line.split("=>")[1].split("(")[0].strip())
    raise AssertionError(f"ldd names no libsqlite3 for {extension}: {out}")


def test_status_names_this_interpreters_sqlite_and_library() -> None:
    info = _status_json(sys.executable)
    entry = _by_module(info)["sqlite3"]
    expected_id = sqlite3.Connection(":memory:").execute("select sqlite_source_id()").fetchone()
    assert entry["version"] == sqlite3.sqlite_version
    assert entry["source_id"] == expected_id[0]
    assert entry["extension"] == sys.modules["_sqlite3"].__file__
    # The library is what the dynamic linker resolves for the extension module (ldd).
    assert os.path.realpath(entry["library"]) == _ldd_libsqlite3(entry["extension"])
    assert entry["library_how"] == "shared library the extension module links"
    assert entry["wal_reset_bug"] == sqliteinfo.wal_reset_bug(sqlite3.sqlite_version)
    assert entry["fixed_in"] == ["3.51.3", "3.50.7", "3.44.6"]
    assert entry["error"] is None


@needs_affected
def test_status_says_affected_and_accept_says_accepted() -> None:
    assert _by_module(_status_json(sys.executable))["sqlite3"]["wal_reset_bug"] == "affected"
    accepted = _status_json(sys.executable, {"WALPATCH_WAL_RESET_BUG": "accept"})
    assert _by_module(accepted)["sqlite3"]["wal_reset_bug"] == "accepted"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    env["PYTHONPATH"] = str(ROOT)
    human = subprocess.run([sys.executable, "-m", "walpatch", "status"], capture_output=True,
                           text=True, env=env, timeout=120).stdout
    assert f"  sqlite3: SQLite {sqlite3.sqlite_version} (" in human
    assert "    WAL-reset bug  AFFECTED: 3.7.0 to 3.51.2 are affected, fixed in 3.51.3, " \
           "3.50.7, 3.44.6" in human


def test_status_of_the_drop_ins(dropin_python: Path) -> None:  # noqa: F811
    """pysqlite3-binary and sqlean.py bundle their own SQLite (statically linked into the
    extension module): status names that file, and their versions' verdicts."""
    entries = _by_module(_status_json(dropin_python, pythonpath=None))
    assert set(entries) == {"sqlite3", "pysqlite3", "sqlean"}
    if sys.version_info >= (3, 15):
        # No pysqlite3-binary wheel for 3.15: pysqlite3 is built from its sdist and links
        # the interpreter's own libsqlite3 (tests/test_dropins.py), so it is not bundled.
        e = entries["pysqlite3"]
        assert e["version"] == sqlite3.sqlite_version and e["error"] is None, e
        assert e["wal_reset_bug"] == sqliteinfo.wal_reset_bug(e["version"])
        assert (entries["sqlean"]["version"], entries["sqlean"]["wal_reset_bug"]) == \
            ("3.50.4", "affected")
        return
    for name in ("pysqlite3", "sqlean"):
        e = entries[name]
        assert e["error"] is None
        assert e["version"] != sqlite3.sqlite_version
        assert e["wal_reset_bug"] == sqliteinfo.wal_reset_bug(e["version"])
        assert e["library"] == e["extension"]
        assert f"/site-packages/{name}/_sqlite3." in e["library"]
        assert e["library_how"] == "statically linked into the extension module"
    # The versions PyPI ships today (issue 11): both affected.
    assert (entries["pysqlite3"]["version"], entries["pysqlite3"]["wal_reset_bug"]) == \
        ("3.51.1", "affected")
    assert (entries["sqlean"]["version"], entries["sqlean"]["wal_reset_bug"]) == \
        ("3.50.4", "affected")


def _pyenv_pythons() -> List[Path]:
    root = Path.home() / ".pyenv" / "versions"
    return sorted(p for p in root.glob("3.*/bin/python3") if p.exists())


def _fixed_python() -> Optional[Path]:
    """Any ~/.pyenv CPython whose sqlite3 has the fix (e.g. Debian's 3.15 with 3.53.x)."""
    for python in _pyenv_pythons():
        proc = subprocess.run([str(python), "-c", "import sqlite3; print(sqlite3.sqlite_version)"],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0 and sqliteinfo.wal_reset_bug(proc.stdout.strip()) == "fixed":
            return python
    return None


@pytest.fixture(scope="module")
def fixed_python() -> Path:
    python = _fixed_python()
    if python is None:
        # Not silently green: the verdict table covers the fixed versions; a run with
        # WALPATCH_REQUIRE_FIXED_SQLITE=1 (CI with the Debian 3.14/3.15 builds) fails here.
        message = ("no interpreter under ~/.pyenv/versions has a fixed SQLite (3.51.3+, "
                   "3.50.7+, 3.44.6+): 'fixed' is covered only by the verdict table")
        if os.environ.get("WALPATCH_REQUIRE_FIXED_SQLITE", "") in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def _wrapt_only_path(tmp_path: Path) -> str:
    """A directory holding only wrapt (its pure-Python fallback works on any CPython 3),
    so another interpreter can run walpatch from this checkout."""
    import wrapt

    d = tmp_path / "wrapt-only"
    d.mkdir()
    (d / "wrapt").symlink_to(Path(wrapt.__file__).parent)
    return str(d)


def test_fixed_sqlite_says_fixed_and_never_warns(fixed_python: Path, tmp_path: Path) -> None:
    entry = _by_module(_status_json(fixed_python))["sqlite3"]
    assert entry["wal_reset_bug"] == "fixed"
    assert os.path.realpath(entry["library"]).startswith(
        os.path.realpath(fixed_python.parent.parent))  # its own libsqlite3, not the system's
    # At run time: WAL requests and a connection to a WAL file, no warning at all.
    db = tmp_path / "fixed.db"
    code = EVENT_SCRIPT
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), _wrapt_only_path(tmp_path)])
    proc = subprocess.run([str(fixed_python), "-c", code, str(db), str(tmp_path / "ev.jsonl"),
                           "warn"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["modes"] == ["wal", "wal", "wal"]
    assert out["warnings"] == [] and out["stats"]["wal_reset_bug_warnings"] == 0
    assert "WAL-reset" not in proc.stderr


# ------------------------------------------------------------------------------------------
# the run-time warning: once per process and module, at the first WAL use
# ------------------------------------------------------------------------------------------

# argv: db, event file, wal_reset_bug setting. Two files, three WAL requests, a second
# connection to a file already WAL; prints the modes and the warnings in the event file.
EVENT_SCRIPT = r'''
import json, sqlite3, sys
import walpatch
db, evfile, setting = sys.argv[1:4]
assert walpatch.install(event_file=evfile, wal_reset_bug=setting)
before = walpatch.stats()["wal_reset_bug_warnings"]
mem = sqlite3.connect(":memory:"); mem.execute("PRAGMA journal_mode=WAL"); mem.close()
plain = sqlite3.connect(db + ".rollback"); plain.execute("CREATE TABLE t(x)"); plain.commit()
after_plain = walpatch.stats()["wal_reset_bug_warnings"]
modes = []
for path in (db, db + ".second", db):
    c = sqlite3.connect(path)
    modes.append(c.execute("PRAGMA journal_mode=WAL").fetchone()[0])
    c.execute("CREATE TABLE IF NOT EXISTS t(x)"); c.commit(); c.close()
warnings = []
for line in open(evfile):
    e = json.loads(line)
    if e["event"] == "sqlite-wal-reset-bug":
        warnings.append(e)
print(json.dumps({"before": before, "after_plain": after_plain, "modes": modes,
                  "warnings": warnings, "stats": walpatch.stats()}))
'''


@needs_affected
def test_wal_request_warns_once_per_process(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    proc = run_py(EVENT_SCRIPT, str(db), str(tmp_path / "ev.jsonl"), "warn")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    # not at install/import, not for :memory:, not for a rollback-journal file
    assert out["before"] == 0 and out["after_plain"] == 0
    assert out["modes"] == ["wal", "wal", "wal"]
    assert len(out["warnings"]) == 1
    w = out["warnings"][0]
    assert (w["module"], w["sqlite_version"], w["fixed_in"], w["outcome"]) == (
        "sqlite3", sqlite3.sqlite_version, ["3.51.3", "3.50.7", "3.44.6"], "warned")
    assert w["file"] == str(db) and w["silence"] == "WALPATCH_WAL_RESET_BUG=accept"
    assert f"SQLite {sqlite3.sqlite_version} has the WAL-reset bug" in w["message"]
    assert "fixed in 3.51.3, 3.50.7, 3.44.6" in w["message"]
    assert "WALPATCH_WAL_RESET_BUG=accept" in w["message"]
    assert out["stats"]["wal_reset_bug_warnings"] == 1
    # one line on stderr (no logging configured: Python's last-resort handler)
    assert [line for line in proc.stderr.splitlines() if "WAL-reset bug" in line] == [
        w["message"]]
    assert header(db) == (2, 2)


@needs_affected
def test_accept_silences_the_warning(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    proc = run_py(EVENT_SCRIPT, str(db), str(tmp_path / "ev.jsonl"), "accept")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["modes"] == ["wal", "wal", "wal"]
    assert out["warnings"] == [] and out["stats"]["wal_reset_bug_warnings"] == 0
    assert "WAL-reset" not in proc.stderr
    assert header(db) == (2, 2)


@needs_affected
def test_warning_under_avoid_does_not_suggest_avoid(tmp_path: Path) -> None:
    """Under avoid the fresh files stay out of WAL; the one warning (for the file already WAL)
    names the fix and accept, and does not tell the operator to set what is already set.
    Control: the same program under warn does suggest avoid."""
    db = tmp_path / "app.db"
    make_db(db, "wal")
    proc = run_py(EVENT_SCRIPT, str(db), str(tmp_path / "ev.jsonl"), "avoid")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["modes"] == ["wal", "delete", "wal"]  # avoid: the fresh .second stays out
    assert len(out["warnings"]) == 1
    message = out["warnings"][0]["message"]
    assert "WALPATCH_WAL_RESET_BUG=accept" in message and "fixed in 3.51.3" in message
    assert "WALPATCH_WAL_RESET_BUG=avoid" not in message
    control = run_py(EVENT_SCRIPT, str(tmp_path / "c.db"), str(tmp_path / "c.jsonl"), "warn")
    assert control.returncode == 0, control.stderr
    warned = json.loads(control.stdout.splitlines()[-1])["warnings"]
    assert "WALPATCH_WAL_RESET_BUG=avoid" in warned[0]["message"]


STATUS_API = r'''
import json, sys
import walpatch
before = walpatch.status()["sqlite"]
walpatch.install()
import sqlite3
after = walpatch.status()["sqlite"]
print(json.dumps({"before": before, "after": after,
                  "dropins_imported": sorted(m for m in ("pysqlite3", "sqlean")
                                             if m in sys.modules)}))
'''


def test_status_api_lists_the_sqlite_of_imported_modules_only(tmp_path: Path) -> None:
    """walpatch.status() (the API, inside an application) has the same "sqlite" entries as
    `walpatch status --json`, for the DB-API modules the process has imported, and never
    imports a drop-in itself."""
    proc = run_py(STATUS_API, env={"WALPATCH_WAL_RESET_BUG": "warn"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["before"] == []  # nothing imported yet: nothing said, nothing imported
    assert [e["module"] for e in out["after"]] == ["sqlite3"]
    entry = out["after"][0]
    assert entry["version"] == sqlite3.sqlite_version
    assert entry["wal_reset_bug"] == sqliteinfo.wal_reset_bug(sqlite3.sqlite_version)
    assert entry["source_id"] == sqlite3.connect(":memory:").execute(
        "SELECT sqlite_source_id()").fetchone()[0]
    assert out["dropins_imported"] == []
    cli = _status_json(sys.executable, env={"WALPATCH_WAL_RESET_BUG": "warn"})
    assert {k: v for k, v in _by_module(cli)["sqlite3"].items()} == entry


CONNECT_ONLY = r'''
import json, sqlite3, sys
import walpatch
assert walpatch.install(event_file=sys.argv[2])
c = sqlite3.connect(sys.argv[1])   # a file already WAL: no statement at all
n = walpatch.stats()["wal_reset_bug_warnings"]
c2 = sqlite3.connect(sys.argv[1]); c2.execute("SELECT count(*) FROM t").fetchall()
print(json.dumps({"at_connect": n, "total": walpatch.stats()["wal_reset_bug_warnings"]}))
'''


@needs_affected
def test_connection_to_a_wal_file_warns_at_connect(tmp_path: Path) -> None:
    db = tmp_path / "wal.db"
    make_db(db, "wal")
    proc = run_py(CONNECT_ONLY, str(db), str(tmp_path / "ev.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"at_connect": 1, "total": 1}
    events_seen = [json.loads(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    warned = [e for e in events_seen if e["event"] == "sqlite-wal-reset-bug"]
    assert len(warned) == 1 and warned[0]["file"] == str(db)
    assert "a connection to a WAL file" in warned[0]["message"]
    # control: the same connect to a rollback-journal file says nothing
    rb = tmp_path / "rb.db"
    make_db(rb, "delete")
    proc = run_py(CONNECT_ONLY, str(rb), str(tmp_path / "ev2.jsonl"))
    assert json.loads(proc.stdout.splitlines()[-1]) == {"at_connect": 0, "total": 0}


DROPIN_WARN = r'''
import json, sys
import sqlite3, sqlean, pysqlite3
import walpatch
assert walpatch.install(event_file=sys.argv[2])
modes = []
for i, mod in enumerate((sqlite3, sqlean, pysqlite3, sqlite3, sqlean)):
    c = mod.connect(sys.argv[1] + str(i))
    modes.append(c.execute("PRAGMA journal_mode=WAL").fetchone()[0])
    c.close()
print(json.dumps(modes))
'''


def test_warning_is_per_module(dropin_python: Path, tmp_path: Path) -> None:  # noqa: F811
    evfile = tmp_path / "ev.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(dropin_python), "-c", DROPIN_WARN, str(tmp_path / "d.db"),
                           str(evfile)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == ["wal"] * 5
    warned = [json.loads(line) for line in evfile.read_text().splitlines()]
    warned = [e for e in warned if e["event"] == "sqlite-wal-reset-bug"]
    expected = {"sqlean", "pysqlite3"}
    if sys.version_info >= (3, 15):  # pysqlite3 built from its sdist: the interpreter's SQLite
        expected = {"sqlean"} | ({"pysqlite3"} if THIS_SQLITE_AFFECTED else set())
    if THIS_SQLITE_AFFECTED:
        expected.add("sqlite3")
    assert sorted(e["module"] for e in warned) == sorted(expected)


# ------------------------------------------------------------------------------------------
# avoid, accept, keep: the guard in this process (like tests/test_guard.py)
# ------------------------------------------------------------------------------------------

@pytest.fixture
def install():
    def _install(**settings: Any) -> None:
        events.reset()
        runtime.clear_history()
        sqliteinfo.reset()
        assert walpatch.install(retry_initial_delay=0.01, retry_max_delay=0.05,
                                retry_total_timeout=0.5, **settings)

    yield _install
    walpatch.uninstall()
    events.reset()
    runtime.clear_history()
    sqliteinfo.reset()


def _walpatch_records(caplog: pytest.LogCaptureFixture, event: str,
                      level: int = logging.WARNING) -> List[Dict[str, Any]]:
    return [r.walpatch for r in caplog.records  # type: ignore[attr-defined]
            if getattr(r, "walpatch", {}).get("event") == event and r.levelno == level]


class MyCursor(sqlite3.Cursor):
    pass


def _rows_of(result: Any) -> Any:
    return result.fetchall()


REQUEST_ENTRY_POINTS = {
    "conn.execute": lambda c, sql: c.execute(sql),
    "cursor.execute": lambda c, sql: c.cursor().execute(sql),
    "factory-cursor.execute": lambda c, sql: c.cursor(MyCursor).execute(sql),
    "conn.executemany": lambda c, sql: c.executemany(sql, [()]),
    "cursor.executemany": lambda c, sql: c.cursor().executemany(sql, [()]),
    "conn.executescript": lambda c, sql: c.executescript(sql),
    "cursor.executescript": lambda c, sql: c.cursor().executescript(sql),
}


def _expected_rows(entry: str, mode: str) -> Any:
    """What sqlite3 itself gives for a journal-mode statement answered with ``mode``."""
    if "executescript" in entry:
        return []  # executescript never leaves rows
    if "executemany" in entry:
        if sys.version_info < (3, 11):
            return ProgrammingError
        return [] if sys.version_info < (3, 12) else [(mode,)]
    return [(mode,)]


ProgrammingError = sqlite3.ProgrammingError


def _run(entry: str, conn: Any, sql: str) -> Any:
    try:
        return _rows_of(REQUEST_ENTRY_POINTS[entry](conn, sql))
    except sqlite3.ProgrammingError as exc:
        assert "executemany() can only execute DML statements" in str(exc)
        return ProgrammingError


@needs_affected
@pytest.mark.parametrize("entry", sorted(REQUEST_ENTRY_POINTS))
def test_avoid_keeps_a_fresh_file_out_of_wal(install, tmp_path, caplog, entry) -> None:
    caplog.set_level(logging.DEBUG, logger="walpatch")
    install(wal_reset_bug="avoid")
    db = tmp_path / "fresh.db"
    conn = sqlite3.connect(str(db))
    assert _run(entry, conn, "PRAGMA journal_mode=WAL") == _expected_rows(entry, "delete")
    assert _run(entry, conn, "PRAGMA journal_mode='w'") == _expected_rows(entry, "delete")
    conn.execute("CREATE TABLE t(x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    conn.close()
    assert header(db) == (1, 1)
    assert walpatch.stats()["wal_avoided"] == 2
    avoided = _walpatch_records(caplog, "wal-avoided")
    assert len(avoided) == 1  # once per file at WARNING (the repeat at DEBUG)
    assert (avoided[0]["file"], avoided[0]["disk"], avoided[0]["outcome"]) == (
        str(db), "empty", "avoided")
    assert len(_walpatch_records(caplog, "wal-avoided", logging.DEBUG)) == 1


@needs_affected
def test_avoid_answers_with_the_current_mode(install, tmp_path) -> None:
    install(wal_reset_bug="avoid")
    db = tmp_path / "rb.db"
    make_db(db, "delete")
    conn = sqlite3.connect(str(db))
    assert conn.execute("PRAGMA journal_mode=TRUNCATE").fetchone() == ("truncate",)
    assert conn.execute("PRAGMA main.journal_mode=WAL").fetchone() == ("truncate",)
    cur = conn.cursor()
    assert cur.execute("PRAGMA journal_mode=wal") is cur
    assert cur.description[0][0] == "journal_mode" and cur.fetchall() == [("truncate",)]
    conn.close()
    assert header(db) == (1, 1) and row_count(db) == 3


@needs_affected
def test_avoid_leaves_a_wal_file_in_wal_and_still_refuses_downgrades(install, tmp_path,
                                                                    caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="walpatch")
    install(wal_reset_bug="avoid")
    db = tmp_path / "wal.db"
    make_db(db, "wal")
    conn = sqlite3.connect(str(db))
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    conn.execute("INSERT INTO t VALUES (9)")
    conn.commit()
    with pytest.raises(WalDowngradeRefused):
        conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    assert header(db) == (2, 2) and row_count(db) == 4
    assert walpatch.stats()["wal_avoided"] == 0
    assert _walpatch_records(caplog, "wal-avoided") == []
    assert len(_walpatch_records(caplog, "sqlite-wal-reset-bug")) == 1  # it is WAL use


@needs_affected
def test_warn_and_accept_put_a_fresh_file_into_wal(install, tmp_path, caplog) -> None:
    """The control for avoid: the same statement without it enters WAL."""
    caplog.set_level(logging.DEBUG, logger="walpatch")
    for setting in ("warn", "accept"):
        install(wal_reset_bug=setting)
        db = tmp_path / f"{setting}.db"
        conn = sqlite3.connect(str(db))
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
        conn.execute("CREATE TABLE t(x)")
        conn.commit()
        conn.close()
        assert header(db) == (2, 2)
        assert walpatch.stats()["wal_avoided"] == 0
        warned = _walpatch_records(caplog, "sqlite-wal-reset-bug")
        assert len(warned) == (1 if setting == "warn" else 0)
        caplog.clear()


@needs_affected
def test_avoid_in_observe_mode_only_logs(install, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="walpatch")
    install(wal_reset_bug="avoid", mode="observe")
    db = tmp_path / "obs.db"
    conn = sqlite3.connect(str(db))
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    conn.close()
    assert header(db) == (2, 2)
    assert len(_walpatch_records(caplog, "wal-would-avoid")) == 1
    assert walpatch.stats()["observed_would_avoid"] == 1 and walpatch.stats()["wal_avoided"] == 0


KEEP_ENTRY_POINTS = dict(REQUEST_ENTRY_POINTS)


@pytest.mark.parametrize("entry", sorted(KEEP_ENTRY_POINTS))
@pytest.mark.parametrize("mode", DOWNGRADES)
def test_keep_answers_wal_for_every_downgrade(install, tmp_path, caplog, entry, mode) -> None:
    caplog.set_level(logging.DEBUG, logger="walpatch")
    install(on_refusal="keep")
    db = tmp_path / "kept.db"
    make_db(db, "wal")
    conn = sqlite3.connect(str(db))
    assert _run(entry, conn, f"PRAGMA journal_mode={mode}") == _expected_rows(entry, "wal")
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.execute("INSERT INTO t VALUES (7)")  # the application carries on
    conn.commit()
    conn.close()
    assert header(db) == (2, 2) and row_count(db) == 4
    stats = walpatch.stats()
    assert (stats["downgrade_requests"], stats["downgrades_refused"],
            stats["downgrades_kept"]) == (1, 1, 1)
    refused = _walpatch_records(caplog, "downgrade-refused")
    assert len(refused) == 1
    expected_mode = "delete" if mode == "''" else mode.lower()
    assert (refused[0]["outcome"], refused[0]["file"], refused[0]["request"],
            refused[0]["disk"]) == ("kept", str(db), expected_mode, "wal")


def test_keep_hands_back_the_callers_own_cursor(install, tmp_path) -> None:
    install(on_refusal="keep")
    db = tmp_path / "cur.db"
    make_db(db, "wal")
    conn = sqlite3.connect(str(db))
    conn.row_factory = sqlite3.Row
    cur = conn.cursor(MyCursor)
    assert cur.execute("PRAGMA main.journal_mode = 'delete'") is cur
    assert isinstance(cur, MyCursor)
    assert cur.description[0][0] == "journal_mode"
    row = cur.fetchone()
    assert isinstance(row, sqlite3.Row) and row["journal_mode"] == "wal"
    assert cur.fetchone() is None
    conn.close()
    assert header(db) == (2, 2)


def test_keep_with_a_mixed_script_still_raises(install, tmp_path) -> None:
    """A mixed executescript cannot hand back a row honestly: it raises as with raise."""
    install(on_refusal="keep")
    db = tmp_path / "mixed.db"
    make_db(db, "wal")
    conn = sqlite3.connect(str(db))
    with pytest.raises(WalDowngradeRefused):
        conn.executescript("CREATE TABLE other(y); PRAGMA journal_mode=DELETE; "
                           "INSERT INTO other VALUES (1);")
    conn.close()
    assert header(db) == (2, 2)
    proc = run_py("import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("
                  "\"SELECT count(*) FROM sqlite_master WHERE name='other'\").fetchone()[0])",
                  str(db))
    assert proc.stdout.strip() == "0"
    assert walpatch.stats()["downgrades_kept"] == 0


def test_keep_in_observe_mode_changes_nothing(install, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="walpatch")
    install(on_refusal="keep", mode="observe")
    db = tmp_path / "obs.db"
    make_db(db, "wal")
    conn = sqlite3.connect(str(db))
    assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    conn.close()
    assert header(db) == (1, 1)
    assert len(_walpatch_records(caplog, "downgrade-would-refuse")) == 1
    assert walpatch.stats()["downgrades_kept"] == 0


def test_raise_is_still_the_default(install, tmp_path) -> None:
    """The control for keep: the same downgrade raises without the setting."""
    install()
    db = tmp_path / "raise.db"
    make_db(db, "wal")
    conn = sqlite3.connect(str(db))
    with pytest.raises(WalDowngradeRefused):
        conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    assert header(db) == (2, 2)
    assert walpatch.stats()["downgrades_kept"] == 0


def test_keep_in_a_legacy_process(tmp_path: Path) -> None:
    """WALPATCH_ON_REFUSAL=keep from the environment, a real process, the legacy fallback."""
    db = tmp_path / "legacy.db"
    make_db(db, "wal")
    code = ("import sqlite3, sys, walpatch\n"
            "assert walpatch.install()\n"
            "c = sqlite3.connect(sys.argv[1])\n"
            "print(c.execute('PRAGMA journal_mode=DELETE').fetchone()[0])\n"
            "c.execute('INSERT INTO t VALUES (5)'); c.commit(); c.close()\n"
            "print(walpatch.stats()['downgrades_kept'])\n")
    proc = run_py(code, str(db), env={"WALPATCH_ON_REFUSAL": "keep",
                                      "WALPATCH_WAL_RESET_BUG": "accept"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["wal", "1"]
    assert header(db) == (2, 2) and row_count(db) == 4
    # control: without walpatch the same program downgrades the file
    db2 = tmp_path / "legacy2.db"
    make_db(db2, "wal")
    plain = run_py(code.replace("assert walpatch.install()\n", "")
                   .replace("print(walpatch.stats()['downgrades_kept'])\n", ""), str(db2))
    assert plain.stdout.split() == ["delete"] and header(db2) == (1, 1)


# ------------------------------------------------------------------------------------------
# check, probe, demo
# ------------------------------------------------------------------------------------------

def _cli(*args: str, extra_env: Optional[Dict[str, str]] = None,
         timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "walpatch", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


LINE = (f"SQLite {sqlite3.sqlite_version} (this interpreter's sqlite3) has the WAL-reset bug; "
        "fixed in 3.51.3, 3.50.7, 3.44.6")


@needs_affected
def test_check_adds_one_line_for_wal_files(tmp_path: Path) -> None:
    wal, rb = tmp_path / "wal.db", tmp_path / "rb.db"
    make_db(wal, "wal")
    make_db(rb, "delete")
    proc = _cli("check", "--json", str(wal), str(rb))
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout)["files"]
    assert [f["wal_reset_bug"] for f in files] == ["affected", None]
    human = _cli("check", str(wal), str(rb))
    assert human.returncode == 0
    lines = [line for line in human.stdout.splitlines() if "WAL-reset bug" in line]
    assert lines == [f"  sqlite     {LINE} (README, \"The WAL-reset bug\"; `walpatch status`)"]
    assert human.stdout.index(lines[0]) < human.stdout.index("rb.db: rollback")
    accepted = _cli("check", "--json", str(wal), extra_env={"WALPATCH_WAL_RESET_BUG": "accept"})
    assert json.loads(accepted.stdout)["files"][0]["wal_reset_bug"] == "accepted"
    assert "WAL-reset" not in _cli("check", str(wal),
                                   extra_env={"WALPATCH_WAL_RESET_BUG": "accept"}).stdout


@needs_affected
def test_probe_adds_one_line_where_wal_works(tmp_path: Path) -> None:
    proc = _cli("probe", "--json", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["verdict"], data["wal_reset_bug"]) == ("wal-ok", "affected")
    human = _cli("probe", str(tmp_path)).stdout.splitlines()
    assert [line for line in human if "WAL-reset bug" in line] == [f"note        {LINE} "
                                                                    "(README, \"The WAL-reset "
                                                                    "bug\"; `walpatch status`)"]
    assert human[-1].startswith("verdict     wal-ok")
    accepted = _cli("probe", "--json", str(tmp_path),
                    extra_env={"WALPATCH_WAL_RESET_BUG": "accept"})
    assert json.loads(accepted.stdout)["wal_reset_bug"] == "accepted"


@pytest.mark.fault
def test_demo_on_refusal_keep_lets_the_legacy_app_start(libfiu: Any, tmp_path: Path) -> None:
    proc = _cli("demo", "--json", "--on-refusal", "keep", "--dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["on_refusal"] == "keep" and data["exit_code"] == 0
    s1, s2 = data["scenarios"]
    with_, without = s2["runs"]["with"], s2["runs"]["without"]
    assert without["header_after"] == [1, 1]  # the control: downgraded without walpatch
    assert with_["exit_code"] == 0 and with_["app"]["error"] is None
    assert with_["app"]["fallback"] is True and with_["app"]["final_mode"] == "wal"
    assert with_["header_after"] == [2, 2]
    refused = [e for e in with_["events"] if e["event"] == "downgrade-refused"]
    assert [e["outcome"] for e in refused] == ["kept"]
    assert with_["app"]["walpatch"]["stats"]["downgrades_kept"] == 1
    assert "WALPATCH_ON_REFUSAL=keep" in s2["summary_with"]
    # the once-per-process WAL-reset warning is kept apart from the scenario's events
    if THIS_SQLITE_AFFECTED:
        assert [e["event"] for e in with_["sqlite_events"]] == ["sqlite-wal-reset-bug"]
    # and the default is unchanged: raise
    raised = json.loads(_cli("demo", "--json", "--dir", str(tmp_path)).stdout)
    assert raised["on_refusal"] == "raise"
    assert raised["scenarios"][1]["runs"]["with"]["app"]["error"]["type"] == "WalDowngradeRefused"
