"""Real syscall faults (libfiu) against the legacy silent-downgrade pattern, with and without
walpatch.

Every scenario runs ``tests/legacy_app.py`` twice in a subprocess under ``fiu-run -x``, on a
rollback-journal database made for it: once without walpatch (the control: it must show the
damage, or the fault never reached the application and the protected run would prove
nothing) and once with ``walpatch.install()``. The fault is on exactly around
``conn.execute("PRAGMA journal_mode=WAL")``. After the child exits, the database is checked
from outside: header bytes 18/19, rows, integrity.

Interpreters: every scenario on this interpreter; (a) and (d) also on 3.8 and 3.15 through
venvs cached in ~/.cache/walpatch-test-venvs (made on first use, ~5 s each, needs PyPI for
wrapt). ``WALPATCH_ALL_PYTHONS=1`` runs every scenario on 3.8-3.15 and 3.13t.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

import pytest

from . import faultinject as fi
from .test_cpython_suite import CURRENT, find_interpreter, skip_missing_interpreter

pytestmark = pytest.mark.fault

APP = os.path.join(fi.TESTS_DIR, "legacy_app.py")
ATTEMPTS = 4
RETRY_ENV = {
    "WALPATCH_RETRY_ATTEMPTS": str(ATTEMPTS),
    "WALPATCH_RETRY_INITIAL_DELAY": "0.01",
    "WALPATCH_RETRY_MAX_DELAY": "0.05",
    "WALPATCH_RETRY_TOTAL_TIMEOUT": "10",
}
ROLLBACK, WAL = [1, 1], [2, 2]

# wrapt 2.1 dropped 3.8; 2.2.0 had a descriptor regression (setup.cfg).
WRAPT = {"3.8": "wrapt>=1.14,<2.1"}
WRAPT_DEFAULT = "wrapt>=1.14,!=2.2.0"
ALL_VERSIONS = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14", "3.15", "3.13t"]


def _versions(extra: List[str]) -> List[str]:
    if os.environ.get("WALPATCH_ALL_PYTHONS", "").strip() in ("1", "true", "yes", "on"):
        wanted = ALL_VERSIONS
    else:
        wanted = [CURRENT] + extra
    return list(dict.fromkeys(wanted))


EVERY = _versions([])  # scenarios (b), (c), (e)
WIDE = _versions(["3.8", "3.15"])  # scenarios (a), (d): the oldest and newest


@pytest.fixture(scope="session")
def python_for():
    """label ('3.8') -> an interpreter path with wrapt: this one, or a cached venv."""
    made: Dict[str, str] = {}

    def get(label: str) -> str:
        if label == CURRENT:
            return sys.executable
        if label not in made:
            # the newest X.Y.Z (X.Y.Zt for "3.13t"), compared numerically
            base = find_interpreter(label)
            if base is None:  # a failure with WALPATCH_REQUIRE_ALL_PYTHONS=1
                skip_missing_interpreter(label, f"the {label} variant")
            made[label] = fi.cached_venv(base, [WRAPT.get(label, WRAPT_DEFAULT)],
                                         f"py{label}")
        return made[label]

    return get


def seed(path: Any) -> str:
    """A rollback-journal database with table seed(x) holding one row (made in a subprocess)."""
    path = str(path)
    code = ("import sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1])\n"
            "assert c.execute('PRAGMA journal_mode=DELETE').fetchone()[0] == 'delete'\n"
            "c.execute('CREATE TABLE seed(x)'); c.execute('INSERT INTO seed VALUES (1)')\n"
            "c.commit(); c.close()\n")
    run = fi.run_script("-c", [code, path], under_fiu=False)
    assert run.returncode == 0, run.describe()
    assert fi.header_versions(path) == (1, 1)  # no connection of this process has it open
    return path


def run_app(python: str, db: str, *args: str) -> fi.RunResult:
    run = fi.run_script(APP, [db, *args], python=python, env=RETRY_ENV)
    assert run.result is not None, "legacy_app printed no JSON line\n" + run.describe()
    return run


def out(run: fi.RunResult) -> Dict[str, Any]:
    """The child's JSON result (run_app already asserted there is one)."""
    assert run.result is not None, "no JSON line\n" + run.describe()
    return run.result


def check(run: fi.RunResult, condition: Any, what: str) -> None:
    assert condition, f"{what}\n{run.describe()}"


def caught_signature(res: Dict[str, Any]) -> Optional[tuple]:
    c = res["caught"]
    return None if c is None else (c["type"], c["message"], c["errorname"])


def modern(res: Dict[str, Any]) -> bool:
    """The child's Python exposes sqlite_errorcode/-name and PEP 678 notes (3.11+)."""
    return tuple(int(x) for x in res["python"].split(".")[:2]) >= (3, 11)


def assert_control_downgraded(run: fi.RunResult, db: str, errorname: str) -> None:
    """Without walpatch the fault lands in the handler and the app leaves WAL for good."""
    res = out(run)
    check(run, run.returncode == 0, "control: the app should finish")
    check(run, res["fault"]["fired"] == 1, "control: the fault must fire exactly once")
    check(run, res["caught"] and res["caught"]["type"] == "OperationalError"
          and res["caught"]["message"] == "disk I/O error", "control: handler caught EIO")
    if modern(res):
        check(run, res["caught"]["errorname"] == errorname, f"control: {errorname}")
    check(run, res["fallback_ran"] and res["fallback_returned"] == "delete",
          "control: the legacy fallback ran and SQLite accepted DELETE")
    check(run, res["final_mode"] == "delete", "control: the app ends in rollback mode")
    info = fi.inspect_database(db)
    check(run, info["header"] == ROLLBACK, f"control: header {info['header']}, want 1/1")
    check(run, info["rows"].get("items") == 3, f"control: rows {info['rows']}")


def assert_recovered(run: fi.RunResult, db: str, where: str) -> None:
    """With walpatch one transient fault is retried away: WAL on disk, rows there."""
    res = out(run)
    stats = res["stats"]
    check(run, res["walpatch_active"], "walpatch must be active in the child")
    check(run, run.returncode == 0, "the app should finish")
    check(run, res["fault"]["fired"] == 1, "the fault must fire exactly once")
    check(run, res["caught"] is None and not res["fallback_ran"],
          "the application must not see the transient error (no fallback)")
    check(run, res["wal_returned"] == "wal", "the WAL request must return 'wal'")
    info = fi.inspect_database(db)
    check(run, info["header"] == WAL,
          f"{where}: the guard returned {res['wal_returned']!r} but header bytes 18/19 are "
          f"{info['header']} (want 2/2); the app's connection ends in {res['final_mode']!r}")
    check(run, stats["wal_retries"] >= 1 and stats["wal_recovered"] == 1
          and stats["wal_ok"] == 1, f"stats must show a retry and a recovery: {stats}")
    check(run, stats["downgrades_refused"] == 0 and stats["wal_failed"] == 0
          and stats["wal_silently_refused"] == 0, f"no refusal expected: {stats}")
    check(run, "retrying" in run.stderr, "the retry must be logged")
    check(run, res["final_mode"] == "wal", "the app's connection ends in WAL")
    check(run, info["rows"] == {"items": 3, "seed": 1} and info["integrity"] == "ok",
          f"rows/integrity: {info}")


# --- (a) one transient EIO on pwrite ------------------------------------------------------

@pytest.mark.parametrize("py", WIDE)
def test_a_pwrite_eio_once_is_retried_and_wal_sticks(libfiu, python_for, tmp_path, py):
    python = python_for(py)
    control = seed(tmp_path / "control.db")
    assert_control_downgraded(run_app(python, control, "--fault", "pwrite"), control,
                              "SQLITE_IOERR_WRITE")

    db = seed(tmp_path / "guarded.db")
    run = run_app(python, db, "--walpatch", "--fault", "pwrite")
    assert_recovered(run, db, "pwrite EIO once")
    check(run, out(run)["stats"]["wal_retries"] == 1, "exactly one retry")


# --- (b) one EIO on fdatasync -------------------------------------------------------------

def test_b_fact_failed_fdatasync_leaves_connection_claiming_wal(libfiu, tmp_path):
    """SQLite fact the guard must handle (design.md section 3): after an EIO from fdatasync
    during the switch the header still says rollback while the same connection reports 'wal'
    until its next read. If SQLite ever changes this, this test says so."""
    db = seed(tmp_path / "fact.db")
    code = (
        "import json, sqlite3, sys, faultinject as fi\n"
        "c = sqlite3.connect(sys.argv[1]); fi.libfiu()\n"
        "out = {}\n"
        "with fi.inject('fdatasync', 'EIO', times=1) as f:\n"
        "    try:\n"
        "        c.execute('PRAGMA journal_mode=WAL').fetchall()\n"
        "    except sqlite3.OperationalError as e:\n"
        "        out['error'] = str(e)\n"
        "out['fired'] = f.fired\n"
        "out['mode_after_error'] = c.execute('PRAGMA journal_mode').fetchone()[0]\n"
        "out['header_after_error'] = fi.header_versions_in_process(sys.argv[1])\n"
        "c.execute('SELECT count(*) FROM sqlite_master').fetchall()\n"
        "out['mode_after_read'] = c.execute('PRAGMA journal_mode').fetchone()[0]\n"
        "c.close(); fi.emit(out)\n")
    run = fi.run_snippet(code.replace("sys.argv[1]", repr(db)))
    res = out(run)
    check(run, run.returncode == 0 and res is not None, "snippet failed")
    check(run, res == {"error": "disk I/O error", "fired": 1, "mode_after_error": "wal",
                       "header_after_error": [1, 1], "mode_after_read": "delete"},
          f"SQLite's behaviour after a failed fdatasync changed: {res}")


@pytest.mark.parametrize("py", EVERY)
def test_b_fdatasync_eio_once_ends_in_wal_on_disk(libfiu, python_for, tmp_path, py):
    python = python_for(py)
    control = seed(tmp_path / "control.db")
    assert_control_downgraded(run_app(python, control, "--fault", "fdatasync"), control,
                              "SQLITE_IOERR_FSYNC")

    db = seed(tmp_path / "guarded.db")
    run = run_app(python, db, "--walpatch", "--fault", "fdatasync")
    assert_recovered(run, db, "fdatasync EIO once")


# --- (c) pread EIO once ---------------------------------------------------------------------

@pytest.mark.parametrize("py", EVERY)
def test_c_pread_eio_on_a_connection_that_already_read(libfiu, python_for, tmp_path, py):
    """On a connection that has read the file, an EIO on read surfaces as SQLITE_CORRUPT
    "database disk image is malformed" (a DatabaseError the legacy handler does not catch).
    Whatever the guard decides, nothing may be downgraded."""
    python = python_for(py)
    control = seed(tmp_path / "control.db")
    run0 = run_app(python, control, "--read-first", "--fault", "pread")
    res0 = out(run0)
    check(run0, run0.returncode == 3 and res0["fault"]["fired"] == 1,
          "control: the app crashes on the fault")
    check(run0, (res0["crashed"]["type"], res0["crashed"]["message"])
          == ("DatabaseError", "database disk image is malformed"), "control: CORRUPT")
    if modern(res0):
        check(run0, res0["crashed"]["errorname"] == "SQLITE_CORRUPT", "control: code")

    db = seed(tmp_path / "guarded.db")
    run = run_app(python, db, "--walpatch", "--read-first", "--fault", "pread")
    res, stats = out(run), out(run)["stats"]
    info = fi.inspect_database(db)
    check(run, res["fault"]["fired"] == 1, "the fault must fire exactly once")
    check(run, not res["fallback_ran"] and stats["downgrade_requests"] == 0
          and stats["downgrades_passed"] == 0, "nothing may be downgraded")
    check(run, info["integrity"] == "ok", f"integrity: {info}")
    if stats["wal_retries"] == 0:
        # Passed through (CORRUPT with no I/O error seen before it: fail closed), exactly as
        # without walpatch, and recorded so a later downgrade of this file is refused.
        crashed = res["crashed"]
        check(run, run.returncode == 3 and crashed is not None, "the error reaches the app")
        check(run, (crashed["type"], crashed["message"], crashed["errorname"])
              == (res0["crashed"]["type"], res0["crashed"]["message"],
                  res0["crashed"]["errorname"]), "same type and message as without walpatch")
        check(run, crashed["walpatch_attempts"] == 1, "one attempt, not retried")
        check(run, stats["wal_failed"] == 1, f"the failure is recorded: {stats}")
        check(run, info["header"] == ROLLBACK and info["rows"] == {"seed": 1},
              f"database unchanged: {info}")
    else:
        # Retried (the guard treats this CORRUPT as a possible transient read error).
        check(run, run.returncode == 0 and res["wal_returned"] == "wal", "recovered")
        check(run, info["header"] == WAL and info["rows"] == {"items": 3, "seed": 1},
              f"WAL on disk with the rows: {info}")


@pytest.mark.parametrize("py", EVERY)
def test_c_pread_eio_on_a_fresh_connection_is_retried(libfiu, python_for, tmp_path, py):
    """On a fresh connection the same EIO surfaces as an I/O error (IOERR_CORRUPTFS on
    3.40): transient, retried, WAL on disk."""
    db = seed(tmp_path / "guarded.db")
    run = run_app(python_for(py), db, "--walpatch", "--fault", "pread")
    assert_recovered(run, db, "pread EIO once (fresh connection)")


# --- (d) a persistent EIO -----------------------------------------------------------------

@pytest.mark.parametrize("py", WIDE)
def test_d_persistent_pwrite_eio_refuses_the_fallback(libfiu, python_for, tmp_path, py):
    python = python_for(py)
    control = seed(tmp_path / "control.db")
    run0 = run_app(python, control, "--fault", "pwrite", "--times", "persistent")
    assert_control_downgraded(run0, control, "SQLITE_IOERR_WRITE")

    db = seed(tmp_path / "guarded.db")
    run = run_app(python, db, "--walpatch", "--fault", "pwrite", "--times", "persistent")
    res, stats = out(run), out(run)["stats"]
    caught, crashed = res["caught"], res["crashed"]
    # The application's handler sees the very error it saw without walpatch ...
    check(run, caught_signature(res) == caught_signature(out(run0)),
          "same exception type, message and code as without walpatch")
    # ... with the retries noted on it.
    check(run, caught["walpatch_attempts"] == ATTEMPTS, f"walpatch_attempts == {ATTEMPTS}")
    check(run, res["fault"]["fired"] == ATTEMPTS, "every attempt really hit the fault")
    if modern(res):
        check(run, any(f"failed after {ATTEMPTS} attempt(s)" in n for n in caught["notes"]),
              "PEP 678 note names the attempts")
    # Its fallback is refused, chained to that error, and the file is untouched.
    check(run, run.returncode == 3 and res["fallback_ran"] and res["fallback_returned"] is None,
          "the fallback DELETE must raise")
    check(run, crashed["type"] == "WalDowngradeRefused" and crashed["is_refusal"]
          and "OperationalError" in crashed["mro"], "WalDowngradeRefused, an OperationalError")
    check(run, crashed["cause_is_caught_error"] and crashed["original_error_is_caught_error"],
          "__cause__ and .original_error are the WAL request's error")
    check(run, crashed["database"] == db and "retry WAL" in crashed["reason"],
          "the refusal names the file and says what to do")
    check(run, stats["wal_retries"] == ATTEMPTS - 1 and stats["wal_failed"] == 1
          and stats["downgrades_refused"] == 1 and stats["wal_ok"] == 0, f"stats: {stats}")
    info = fi.inspect_database(db)
    check(run, info["header"] == ROLLBACK and info["rows"] == {"seed": 1}
          and info["integrity"] == "ok", f"header unchanged, no writes: {info}")
    # errors.py promises a message free of the phrases legacy handlers match on, so that a
    # handler around the fallback cannot mistake the refusal for another transient error.
    check(run, "disk i/o error" not in crashed["message"].lower()
          and "locked" not in crashed["message"].lower(),
          "the refusal message must not contain 'disk I/O error' (errors.py's promise)")


# --- (e) open() failing ---------------------------------------------------------------------

@pytest.mark.parametrize("py", EVERY)
def test_e_open_failure_is_passed_through_not_retried(libfiu, python_for, tmp_path, py):
    python = python_for(py)
    control = seed(tmp_path / "control.db")
    run0 = run_app(python, control, "--fault", "open", "--errno", "EMFILE")
    res0 = out(run0)
    check(run0, run0.returncode == 0 and res0["fault"]["fired"] == 1, "control: fault fired")
    check(run0, res0["caught"]["type"] == "OperationalError"
          and res0["caught"]["message"] == "unable to open database file", "control: CANTOPEN")
    if modern(res0):
        check(run0, res0["caught"]["errorname"] == "SQLITE_CANTOPEN", "control: code")
    check(run0, not res0["fallback_ran"], "control: message does not match the handler")

    db = seed(tmp_path / "guarded.db")
    run = run_app(python, db, "--walpatch", "--fault", "open", "--errno", "EMFILE")
    res, stats = out(run), out(run)["stats"]
    check(run, run.returncode == 0 and res["fault"]["fired"] == 1, "fault fired once")
    check(run, caught_signature(res) == caught_signature(res0),
          "passed through: same type, message and code as without walpatch")
    check(run, res["caught"]["walpatch_attempts"] == 1 and stats["wal_retries"] == 0,
          f"not retried: {stats}")
    check(run, not res["fallback_ran"] and stats["downgrade_requests"] == 0, "no fallback")
    info = fi.inspect_database(db)
    check(run, info["header"] == ROLLBACK and info["rows"] == {"items": 3, "seed": 1}
          and info["integrity"] == "ok", f"{info}")


# --- the helper itself ----------------------------------------------------------------------

def test_fault_helper_counts_and_libfiu_onetime(libfiu, tmp_path):
    """``Fault(times, after)`` fails exactly the calls it should, and libfiu 1.1's own
    FIU_ONETIME flag fails one call only. Plain files, no SQLite."""
    path = str(tmp_path / "plain.bin")
    code = (
        "import os, faultinject as fi\n"
        "fd = os.open(%r, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "def tries(n):\n"
        "    out = []\n"
        "    for _ in range(n):\n"
        "        try:\n"
        "            os.pwrite(fd, b'x', 0); out.append('ok')\n"
        "        except OSError as e:\n"
        "            out.append(e.strerror)\n"
        "    return out\n"
        "with fi.inject('pwrite', 'ENOSPC', times=2, after=1) as f:\n"
        "    counted = tries(5)\n"
        "fi.enable_onetime('pwrite', 'EIO')\n"
        "onetime = tries(3)\n"
        "fi.libfiu().fiu_disable(b'posix/io/rw/pwrite')\n"
        "fi.emit({'counted': counted, 'calls': f.calls, 'fired': f.fired, 'onetime': onetime,"
        " 'after': tries(1)})\n") % path
    run = fi.run_snippet(code)
    check(run, run.returncode == 0 and run.result is not None, "snippet failed")
    nospace = os.strerror(28)
    check(run, out(run) == {
        "counted": ["ok", nospace, nospace, "ok", "ok"], "calls": 5, "fired": 2,
        "onetime": [os.strerror(5), "ok", "ok"], "after": ["ok"]}, f"{out(run)}")


def test_require_faults_turns_a_skipped_fault_test_into_a_failed_session(tmp_path):
    """conftest.py: with WALPATCH_REQUIRE_FAULTS=1 a fault test that skipped (here: libfiu
    made unfindable through WALPATCH_FIU_RUN) fails the session; without it, it is a skip."""
    import subprocess

    def session(require: str) -> subprocess.CompletedProcess:
        env = fi.child_env({"WALPATCH_FIU_RUN": str(tmp_path / "no-such-fiu-run"),
                            "WALPATCH_REQUIRE_FAULTS": require})
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
             "test_e_open_failure", os.path.join(fi.TESTS_DIR, "test_faults.py")],
            cwd=fi.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True, timeout=120)

    strict = session("1")
    assert strict.returncode == 1, strict.stdout
    assert "fault test(s) skipped while WALPATCH_REQUIRE_FAULTS=1" in strict.stdout
    assert "no-such-fiu-run is not on PATH" in strict.stdout
    lenient = session("0")
    assert lenient.returncode == 0 and "skipped" in lenient.stdout, lenient.stdout
