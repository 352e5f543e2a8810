"""The decision table of design.md §4 on real SQLite files, through every entry point."""
from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import time

import pytest

import walpatch
from walpatch import events, runtime
from walpatch.errors import WalDowngradeRefused

from .dbutil import ROOT, header, make_db, row_count, run_py

DOWNGRADES = ["DELETE", "TRUNCATE", "PERSIST", "MEMORY", "OFF", "''"]


@pytest.fixture
def guarded():
    events.reset()
    runtime.clear_history()
    assert walpatch.install(retry_initial_delay=0.01, retry_max_delay=0.05,
                            retry_total_timeout=0.5)
    yield
    walpatch.uninstall()
    events.reset()
    runtime.clear_history()


def _entry_points():
    """(name, function running one SQL text through that entry point)."""

    class MyCursor(sqlite3.Cursor):
        pass

    return {
        "conn.execute": lambda c, sql: c.execute(sql),
        "conn.executemany": lambda c, sql: c.executemany(sql, [()]),
        "conn.executescript": lambda c, sql: c.executescript(sql),
        "conn.executescript-mixed": lambda c, sql: c.executescript(
            "CREATE TABLE IF NOT EXISTS other(y);\n" + sql + ";\nINSERT INTO other VALUES (1);"),
        "cursor.execute": lambda c, sql: c.cursor().execute(sql),
        "cursor.executemany": lambda c, sql: c.cursor().executemany(sql, [()]),
        "cursor.executescript": lambda c, sql: c.cursor().executescript(sql),
        "factory-cursor.execute": lambda c, sql: c.cursor(MyCursor).execute(sql),
    }


ENTRY_POINTS = _entry_points()


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("mode", DOWNGRADES)
def test_downgrade_of_wal_file_is_refused_everywhere(guarded, tmp_path, entry, mode):
    db = tmp_path / "kanban.db"
    make_db(db, "wal")  # made by another process
    conn = sqlite3.connect(str(db))
    sql = f"PRAGMA journal_mode={mode}"
    with pytest.raises(WalDowngradeRefused) as info:
        ENTRY_POINTS[entry](conn, sql)
    err = info.value
    assert isinstance(err, sqlite3.OperationalError)
    assert err.database == str(db)
    assert err.schema == "main"
    expected_mode = "delete" if mode == "''" else mode.lower()
    assert err.requested_mode == expected_mode
    assert "WAL mode on disk" in str(err) and str(db) in str(err)
    assert "header bytes 18-19 = 2/2" in err.reason
    conn.close()
    assert header(db) == (2, 2)
    if entry == "conn.executescript-mixed":
        # all-or-nothing: nothing in the script ran
        proc = run_py("import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("
                      "\"SELECT count(*) FROM sqlite_master WHERE name='other'\").fetchone()[0])",
                      str(db))
        assert proc.stdout.strip() == "0"
    assert walpatch.stats()["downgrades_refused"] == 1
    assert walpatch.stats()["downgrade_requests"] == 1


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_allow_downgrade_lets_it_through(guarded, tmp_path, entry):
    db = tmp_path / "maint.db"
    make_db(db, "wal")
    conn = sqlite3.connect(str(db))
    with walpatch.allow_downgrade():
        try:
            ENTRY_POINTS[entry](conn, "PRAGMA journal_mode=DELETE")
        except sqlite3.ProgrammingError:
            assert "executemany" in entry and sys.version_info < (3, 11)
    conn.close()
    assert header(db) == (1, 1)
    assert row_count(db) == 3
    assert walpatch.stats()["downgrades_allowed"] == 1
    assert walpatch.stats()["downgrades_refused"] == 0


def test_allow_downgrade_is_scoped(guarded, tmp_path):
    db = tmp_path / "scoped.db"
    make_db(db, "wal")
    conn = sqlite3.connect(str(db))
    with walpatch.allow_downgrade():
        pass
    with pytest.raises(WalDowngradeRefused):
        conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    assert header(db) == (2, 2)


def test_allow_downgrade_by_setting_and_by_path(tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    make_db(a, "wal")
    make_db(b, "wal")
    try:
        walpatch.install(allow_downgrade_paths=[str(tmp_path / "a*.db")])
        conn = sqlite3.connect(str(a))
        assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
        conn.close()
        conn = sqlite3.connect(str(b))
        with pytest.raises(WalDowngradeRefused):
            conn.execute("PRAGMA journal_mode=DELETE")
        walpatch.install(allow_downgrade=True)
        assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
        conn.close()
    finally:
        walpatch.uninstall()
    assert header(a) == (1, 1) and header(b) == (1, 1)


def test_rollback_file_may_change_between_rollback_modes(guarded, tmp_path):
    db = tmp_path / "rb.db"
    make_db(db, "delete")
    conn = sqlite3.connect(str(db))
    for mode in ("truncate", "persist", "delete"):
        assert conn.execute(f"PRAGMA journal_mode={mode}").fetchone() == (mode,)
    conn.close()
    assert header(db) == (1, 1)
    assert walpatch.stats()["downgrades_passed"] == 3


def test_wal_request_ok_and_query_untouched(guarded, tmp_path):
    db = tmp_path / "new.db"
    conn = sqlite3.connect(str(db))
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    conn.close()
    assert header(db) == (2, 2)
    s = walpatch.stats()
    assert s["wal_requests"] == 1 and s["wal_ok"] == 1 and s["downgrade_requests"] == 0


def test_script_of_only_pragmas_is_guarded_statement_by_statement(guarded, tmp_path):
    db = tmp_path / "s.db"
    make_db(db, "delete")
    conn = sqlite3.connect(str(db))
    cur = conn.executescript("-- setup\nPRAGMA journal_mode = 'wal'; PRAGMA journal_mode;")
    assert isinstance(cur, sqlite3.Cursor)
    with pytest.raises(WalDowngradeRefused):
        conn.executescript("PRAGMA journal_mode=wal; PRAGMA main.journal_mode=delete;")
    conn.close()
    assert header(db) == (2, 2)


# --- attached databases, memory and temp ---------------------------------------------------

def test_attached_wal_database_is_protected(guarded, tmp_path):
    main, aux = tmp_path / "main.db", tmp_path / "aux.db"
    make_db(main, "delete")
    make_db(aux, "wal")
    conn = sqlite3.connect(str(main))
    conn.execute("ATTACH DATABASE ? AS aux", (str(aux),))
    with pytest.raises(WalDowngradeRefused) as info:
        conn.execute("PRAGMA aux.journal_mode=DELETE")
    assert info.value.database == str(aux) and info.value.schema == "aux"
    with pytest.raises(WalDowngradeRefused) as info:
        conn.execute("PRAGMA journal_mode=DELETE")  # no schema: applies to every database
    assert info.value.database == str(aux)
    assert conn.execute("PRAGMA main.journal_mode=TRUNCATE").fetchone() == ("truncate",)
    conn.close()
    assert header(aux) == (2, 2) and header(main) == (1, 1)


def test_memory_and_temp_databases_pass_untouched(guarded):
    conn = sqlite3.connect(":memory:")
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("memory",)
    assert conn.execute("PRAGMA journal_mode=OFF").fetchone() == ("off",)
    assert conn.execute("PRAGMA temp.journal_mode=DELETE").fetchone() == ("delete",)
    s = walpatch.stats()
    assert s["downgrade_requests"] == 0 and s["wal_requests"] == 0
    assert s["wal_silently_refused"] == 0


def test_excluded_paths_are_not_guarded(tmp_path):
    db = tmp_path / "excluded.db"
    make_db(db, "wal")
    try:
        walpatch.install(exclude_paths=[str(tmp_path / "excl*")])
        conn = sqlite3.connect(str(db))
        assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
        conn.close()
    finally:
        walpatch.uninstall()
    assert header(db) == (1, 1)


# --- permanent errors: the application's own fallback may downgrade a non-WAL file ----------

LEGACY_FALLBACK = """
def legacy_open(conn):
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.DatabaseError as e:
        return conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    if mode != "wal":
        mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    return mode
"""


def _legacy_open(conn):
    ns = {"sqlite3": sqlite3}
    exec(LEGACY_FALLBACK, ns)
    return ns["legacy_open"](conn)


def test_not_authorized_is_wal_unsupported_and_fallback_passes(guarded, tmp_path):
    db = tmp_path / "auth.db"
    conn = sqlite3.connect(str(db))

    def deny_wal(action, arg1, arg2, dbname, source):
        if action == sqlite3.SQLITE_PRAGMA and arg1 == "journal_mode" and arg2 \
                and arg2.lower() == "wal":
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    conn.set_authorizer(deny_wal)
    assert _legacy_open(conn) == "delete"
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    conn.close()
    s = walpatch.stats()
    assert s["wal_unsupported"] == 1 and s["wal_retries"] == 0
    assert s["downgrades_passed"] == 1 and s["downgrades_refused"] == 0
    assert header(db) == (1, 1)


def test_vfs_without_shared_memory_is_a_silent_refusal(guarded, tmp_path, caplog):
    db = tmp_path / "nolock.db"
    make_db(db, "delete")
    conn = sqlite3.connect(f"file:{db}?vfs=unix-none", uri=True)
    with caplog.at_level(logging.WARNING, logger="walpatch"):
        assert _legacy_open(conn) == "delete"
    conn.close()
    s = walpatch.stats()
    assert s["wal_silently_refused"] == 1 and s["downgrades_passed"] == 1
    assert any("vfs=unix-none" in r.getMessage() and "no shared memory" in r.getMessage()
               for r in caplog.records)
    assert header(db) == (1, 1)


# --- real contention: another process holds the lock -------------------------------------

HOLDER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("COMMIT")
"""


def _hold_lock(db, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_contention_is_retried_until_the_lock_goes(guarded, tmp_path):
    db = tmp_path / "busy.db"
    make_db(db, "delete")
    walpatch.install(retry_attempts=50, retry_initial_delay=0.02, retry_max_delay=0.05,
                     retry_total_timeout=5)
    holder = _hold_lock(db, 0.3)
    conn = sqlite3.connect(str(db), timeout=0)
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    holder.wait()
    conn.close()
    s = walpatch.stats()
    assert s["wal_retries"] >= 1 and s["wal_recovered"] == 1 and s["wal_ok"] == 1
    assert header(db) == (2, 2)


def test_persistent_contention_raises_then_downgrade_is_refused(guarded, tmp_path):
    db = tmp_path / "stuck.db"
    make_db(db, "delete")
    holder = _hold_lock(db, 3)
    try:
        conn = sqlite3.connect(str(db), timeout=0)
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError) as info:
            conn.execute("PRAGMA journal_mode=WAL")
        elapsed = time.monotonic() - started
        original = info.value
        assert type(original) is sqlite3.OperationalError
        assert str(original) == "database is locked"
        assert original.walpatch_attempts > 1
        assert elapsed < 2, "retries must respect retry_total_timeout (0.5 s)"
        if sys.version_info >= (3, 11):
            assert any("walpatch" in n for n in original.__notes__)
        with pytest.raises(WalDowngradeRefused) as info2:
            conn.execute("PRAGMA journal_mode=DELETE")
        assert info2.value.__cause__ is original
        assert info2.value.original_error is original
        assert "failed" in info2.value.reason and "retry WAL" in info2.value.reason
    finally:
        holder.kill()
        holder.wait()
    conn.close()
    assert header(db) == (1, 1)


def test_success_clears_the_failure(guarded, tmp_path):
    db = tmp_path / "clears.db"
    make_db(db, "delete")
    holder = _hold_lock(db, 0.2)
    conn = sqlite3.connect(str(db), timeout=0)
    walpatch.install(retry_attempts=1)
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("PRAGMA journal_mode=WAL")
    holder.wait()
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    with walpatch.allow_downgrade():
        assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    # after WAL succeeded and the file was deliberately left, a new rollback request passes
    assert conn.execute("PRAGMA journal_mode=TRUNCATE").fetchone() == ("truncate",)
    conn.close()


# --- observe mode ------------------------------------------------------------------------

def test_observe_mode_changes_nothing_but_logs(tmp_path, caplog):
    db = tmp_path / "obs.db"
    make_db(db, "wal")
    events.reset()
    try:
        walpatch.install(mode="observe")
        conn = sqlite3.connect(str(db))
        with caplog.at_level(logging.WARNING, logger="walpatch"):
            assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
        conn.close()
    finally:
        walpatch.uninstall()
    assert header(db) == (1, 1)
    assert walpatch.stats()["observed_would_refuse"] == 1
    assert any("observe mode" in r.getMessage() and "would refuse" in r.getMessage()
               for r in caplog.records)


def test_uninstall_turns_existing_guarded_connections_into_pass_through(tmp_path):
    db = tmp_path / "un.db"
    make_db(db, "wal")
    walpatch.install()
    conn = sqlite3.connect(str(db))
    walpatch.uninstall()
    assert not walpatch.is_installed()
    assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    conn.close()
    assert header(db) == (1, 1)


# --- events -------------------------------------------------------------------------------

def test_refusal_warnings_are_deduplicated_per_file(guarded, tmp_path, caplog):
    db = tmp_path / "dedupe.db"
    make_db(db, "wal")
    conn = sqlite3.connect(str(db))
    with caplog.at_level(logging.DEBUG, logger="walpatch"):
        for _ in range(5):
            with pytest.raises(WalDowngradeRefused):
                conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    refusals = [r for r in caplog.records if r.walpatch["event"] == "downgrade-refused"]
    assert len(refusals) == 5
    assert [r.levelno for r in refusals] == [logging.WARNING] + [logging.DEBUG] * 4
    assert walpatch.stats()["downgrades_refused"] == 5
    fields = refusals[0].walpatch
    assert fields["file"] == str(db) and fields["disk"] == "wal" and fields["pid"] > 0


def test_event_file_gets_json_lines_without_parameters(tmp_path):
    db = tmp_path / "ev.db"
    make_db(db, "wal")
    sink = tmp_path / "events.jsonl"
    try:
        walpatch.install(event_file=str(sink))
        conn = sqlite3.connect(str(db))
        conn.execute("INSERT INTO t VALUES (?)", ("s3cr3t-row-value",))
        with pytest.raises(WalDowngradeRefused):
            conn.execute("PRAGMA journal_mode=DELETE")
        conn.close()
    finally:
        walpatch.uninstall()
        walpatch.install(event_file="")
        walpatch.uninstall()
    text = sink.read_text()
    assert '"event": "downgrade-refused"' in text
    assert "s3cr3t" not in text
    assert (sink.stat().st_mode & 0o777) == 0o600


def test_event_file_refuses_a_symlink(tmp_path, caplog):
    target = tmp_path / "elsewhere"
    link = tmp_path / "events.jsonl"
    link.symlink_to(target)
    try:
        with caplog.at_level(logging.WARNING, logger="walpatch"):
            assert walpatch.install(event_file=str(link))
        assert walpatch.is_installed()
    finally:
        walpatch.uninstall()
    assert not target.exists()
    assert any("WALPATCH_EVENT_FILE" in r.getMessage() for r in caplog.records)


def test_refused_error_pickles_and_names_the_file(tmp_path):
    import pickle

    err = WalDowngradeRefused("/x/kanban.db", "main", "delete", "the file is in WAL mode")
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is WalDowngradeRefused and str(copy) == str(err)
    assert "/x/kanban.db" in str(err) and "journal_mode=DELETE" in str(err)
    for phrase in ("disk i/o error", "database is locked", "locking protocol"):
        assert phrase not in str(err).lower()
    assert str(ROOT)  # keeps the import used


def test_mixed_script_failing_after_a_successful_wal_request_records_ok(guarded, tmp_path):
    db = tmp_path / "mixed.db"
    make_db(db, "delete")
    conn = sqlite3.connect(str(db))
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        conn.executescript("PRAGMA journal_mode=wal; INSERT INTO no_such_table VALUES (1);")
    assert walpatch.stats()["wal_ok"] == 1 and walpatch.stats()["wal_failed"] == 0
    conn.close()
    assert header(db) == (2, 2)


def test_script_with_a_query_runs_whole_and_keeps_its_errors(guarded, tmp_path):
    db = tmp_path / "q.db"
    make_db(db, "delete")
    conn = sqlite3.connect(str(db))
    with pytest.raises(sqlite3.OperationalError, match="unknown database nosuch"):
        conn.executescript("PRAGMA nosuch.journal_mode; PRAGMA journal_mode=wal;")
    conn.close()
    assert header(db) == (1, 1)


def test_usage_errors_pass_through_and_are_not_recorded(guarded, tmp_path):
    db = tmp_path / "usage.db"
    make_db(db, "delete")
    conn = sqlite3.connect(str(db))
    with pytest.raises(sqlite3.ProgrammingError) as info:
        conn.execute("PRAGMA journal_mode=WAL", (1,))
    assert not hasattr(info.value, "walpatch_attempts")
    assert walpatch.stats()["wal_failed"] == 0
    # nothing recorded: a rollback-to-rollback change still passes
    assert conn.execute("PRAGMA journal_mode=TRUNCATE").fetchone() == ("truncate",)
    conn.close()


@pytest.mark.parametrize("text_factory", [bytes, bytearray, lambda b: b.decode().upper()])
def test_callers_text_factory_cannot_blind_the_guard(guarded, tmp_path, text_factory):
    db = tmp_path / "tf.db"
    make_db(db, "wal")
    conn = sqlite3.connect(str(db))
    conn.text_factory = text_factory
    with pytest.raises(WalDowngradeRefused) as info:
        conn.execute("PRAGMA journal_mode=DELETE")
    assert info.value.database == str(db)
    assert conn.text_factory is text_factory
    conn.close()
    assert header(db) == (2, 2)


RACE = """
import sqlite3, sys, threading, walpatch
walpatch.install()
sys.setswitchinterval(1e-6)  # switch threads as often as possible: widens any race
barrier = threading.Barrier(16)
errors = []
def first_connect():
    barrier.wait()
    try:
        c = sqlite3.connect(":memory:")
        c.close()
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=first_connect) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
c = sqlite3.connect(sys.argv[1])
print("errors", len(errors), errors[:1], walpatch.stats()["connections"])
"""


def test_first_connects_from_many_threads_at_once(tmp_path):
    """The guard is loaded lazily at the first connect(); threads racing through that once
    stored it twice, and every connect() after failed with ValueError. The window is the
    import of the guard's modules: reproduced by hand with uncompiled modules (15 of 16
    threads failed), but with .pyc files present this test rarely hits it. It stays as a
    smoke test of concurrent first connects."""
    for attempt in range(5):
        proc = run_py(RACE, str(tmp_path / f"race{attempt}.db"))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[:2] == ["errors", "0"], proc.stdout
        assert proc.stdout.split()[-1] == "17"
