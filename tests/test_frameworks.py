"""walpatch under the frameworks legacy applications are built on, with the real packages.

Each test drives a real framework from PyPI (SQLAlchemy, Django, peewee, aiosqlite,
sqlite-utils, coverage.py) against real database files in ``tmp_path``, in a fresh
interpreter that calls ``walpatch.install()`` first (as the ``.pth``/``sitecustomize``
activation would), and shows two things:

* normal use works: WAL set through the framework's own hook, tables created (Django through
  real migrations), rows written and read back, header bytes 18/19 = 2/2 on disk afterwards;
* a downgrade of the WAL file issued *through the framework* is refused: the exception that
  reaches the caller is, or is caused by, ``WalDowngradeRefused`` (frameworks wrap DB-API
  errors in their own types: SQLAlchemy's and Django's ``OperationalError``), and the header
  is still 2/2.

Each downgrade test also runs the same child once *without* walpatch (the control): the
framework then really does take the file out of WAL (header 1/1), so the refusal is
walpatch's doing and the test can fail.

A test is skipped only when its package is not installed here; it says so (and with
``WALPATCH_REQUIRE_FRAMEWORKS=1`` that skip becomes a failure, for CI). Install them with::

    pip install sqlalchemy django peewee aiosqlite sqlite-utils coverage

Child processes read/write databases; the pytest process only reads headers through
``dbutil.header`` (another short process), never opening a database file itself.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest

from .dbutil import ROOT, header, last_json, make_db, run_py

WAL, ROLLBACK = (2, 2), (1, 1)
REFUSED = "walpatch.errors.WalDowngradeRefused"

#: module to import -> pip requirement that provides it
PACKAGES = {
    "sqlalchemy": "sqlalchemy",
    "django": "django",
    "peewee": "peewee",
    "aiosqlite": "aiosqlite",
    "sqlite_utils": "sqlite-utils",
    "coverage": "coverage",
}


def need(module: str) -> None:
    """Skip (and say so) when ``module`` is not installed; fail instead under
    WALPATCH_REQUIRE_FRAMEWORKS=1."""
    if importlib.util.find_spec(module) is not None:
        return
    msg = (f"NOT TESTED: {module} is not installed in {sys.executable} "
           f"(pip install {PACKAGES[module]}): walpatch was NOT checked under it")
    print(msg, file=sys.stderr)
    if os.environ.get("WALPATCH_REQUIRE_FRAMEWORKS", "").strip().lower() in (
            "1", "true", "yes", "on"):
        pytest.fail(msg + " (WALPATCH_REQUIRE_FRAMEWORKS=1)")
    pytest.skip(msg)


# Prepended to every child. argv[1] is "on" (walpatch installed first) or "off" (control).
PRELUDE = '''
import json, sys
GUARD = sys.argv[1] == "on"
import walpatch
if GUARD:
    assert walpatch.install(retry_initial_delay=0.01, retry_max_delay=0.05,
                            retry_total_timeout=0.5)
RESULT = {"walpatch": walpatch.is_installed()}

def chain(exc):
    """The exception and its causes, outermost first: type, refused?, message."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        refused = False
        if GUARD:
            refused = isinstance(exc, walpatch.WalDowngradeRefused)
        out.append({"type": type(exc).__module__ + "." + type(exc).__qualname__,
                    "refused": refused, "message": str(exc)[:400]})
        exc = exc.__cause__ or exc.__context__
    return out

def attempt(fn):
    """Run fn(); 'passed' (with its value) or the exception chain."""
    try:
        value = fn()
    except Exception as exc:
        return {"outcome": "raised", "chain": chain(exc)}
    return {"outcome": "passed", "value": value}

def done():
    if GUARD:
        RESULT["stats"] = walpatch.stats()
    print(json.dumps(RESULT, default=str))
'''


def child(code: str, guard: bool, *args: Any, timeout: float = 90) -> Dict[str, Any]:
    """Run PRELUDE + ``code`` in a fresh interpreter; its RESULT dict."""
    proc = run_py(PRELUDE + textwrap.dedent(code), "on" if guard else "off",
                  *[str(a) for a in args], timeout=timeout)
    assert proc.returncode == 0, (
        f"child exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-5000:]}")
    result = last_json(proc.stdout)
    assert result["walpatch"] is guard, result
    result["_stderr"] = proc.stderr
    return result


def assert_refused(outcome: Dict[str, Any], db: Any, outer: str = "") -> List[Dict[str, Any]]:
    """The attempt raised, WalDowngradeRefused is in the chain (naming the file), and the
    outermost exception is of type ``outer`` when given (the framework's own wrapper)."""
    assert outcome["outcome"] == "raised", f"downgrade was NOT refused: {outcome}"
    links = outcome["chain"]
    refused = [link for link in links if link["refused"]]
    assert refused, f"no WalDowngradeRefused in the exception chain: {links}"
    assert refused[0]["type"].endswith("WalDowngradeRefused"), refused[0]
    assert "walpatch refused PRAGMA main.journal_mode=" in refused[0]["message"]
    assert str(db) in refused[0]["message"]
    assert "WAL mode on disk" in refused[0]["message"]
    if outer:
        assert links[0]["type"] == outer, links
    return links


def assert_downgrade_passed(outcome: Dict[str, Any]) -> None:
    assert outcome["outcome"] == "passed", f"control run: downgrade failed: {outcome}"


# --------------------------------------------------------------------------------------------
# SQLAlchemy: pysqlite engine, a "connect" event listener sets WAL
# --------------------------------------------------------------------------------------------

SQLALCHEMY = '''
import sqlalchemy as sa
from sqlalchemy import event
db, step = sys.argv[2], sys.argv[3]
RESULT["version"] = sa.__version__

def engine_with(mode):
    engine = sa.create_engine("sqlite:///" + db)
    assert engine.dialect.driver == "pysqlite", engine.dialect.driver
    seen = RESULT.setdefault("connect_" + mode, [])

    @event.listens_for(engine, "connect")
    def set_journal_mode(dbapi_connection, connection_record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=" + mode)
        seen.append(cursor.fetchone()[0])
        cursor.close()
    return engine

meta = sa.MetaData()
notes = sa.Table("notes", meta, sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("text", sa.String(50)))

def texts(engine):
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.select(notes.c.text).order_by(notes.c.id))]

if step == "use":
    engine = engine_with("WAL")
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"text": "a"}, {"text": "b"}])
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"text": "c"}])
    RESULT["rows"] = texts(engine)
    with engine.connect() as conn:
        RESULT["mode"] = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        if GUARD:
            from walpatch.connection import is_guarded
            RESULT["guarded"] = is_guarded(conn.connection.driver_connection)
    engine.dispose()
elif step == "exec_driver_sql":
    engine = engine_with("WAL")
    def downgrade():
        with engine.connect() as conn:
            return conn.exec_driver_sql("PRAGMA journal_mode=DELETE").scalar()
    RESULT["downgrade"] = attempt(downgrade)
    RESULT["rows"] = texts(engine)  # the engine and its pool still work
    engine.dispose()
elif step == "connect_event":
    engine = engine_with("DELETE")
    RESULT["downgrade"] = attempt(lambda: texts(engine))
    engine.dispose()
done()
'''


@pytest.mark.parametrize("step", ["exec_driver_sql", "connect_event"])
def test_sqlalchemy(tmp_path, step):
    need("sqlalchemy")
    db = tmp_path / "sa.db"
    used = child(SQLALCHEMY, True, db, "use")
    assert used["connect_WAL"] and set(used["connect_WAL"]) == {"wal"}, used
    assert used["rows"] == ["a", "b", "c"] and used["mode"] == "wal"
    assert used["guarded"] is True
    assert header(db) == WAL
    ctl = tmp_path / "control.db"
    child(SQLALCHEMY, False, ctl, "use")
    assert header(ctl) == WAL

    got = child(SQLALCHEMY, True, db, step)
    assert_refused(got["downgrade"], db, outer="sqlalchemy.exc.OperationalError")
    assert header(db) == WAL
    if step == "exec_driver_sql":
        assert got["rows"] == ["a", "b", "c"]
        assert got["connect_WAL"] == ["wal"]
    assert got["stats"]["downgrades_refused"] >= 1

    control = child(SQLALCHEMY, False, ctl, step)
    assert_downgrade_passed(control["downgrade"])
    assert header(ctl) == ROLLBACK
    print(f"SQLAlchemy {got['version']}: {step} downgrade refused; control left WAL")


# --------------------------------------------------------------------------------------------
# Django: sqlite3 backend, init_command (5.1+) or connection_created, real migrations
# --------------------------------------------------------------------------------------------

DJANGO_MODELS = '''
from django.db import models


class Note(models.Model):
    text = models.CharField(max_length=50)
    created = models.IntegerField(default=0)
'''

DJANGO = '''
import os
db, mode, step, apps_dir = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
sys.path.insert(0, apps_dir)
import django
from django.conf import settings
RESULT["version"] = django.get_version()
options = {}
use_init_command = django.VERSION >= (5, 1)
RESULT["via"] = "init_command" if use_init_command else "connection_created"
if use_init_command:
    options["init_command"] = "PRAGMA journal_mode=" + mode
    options["transaction_mode"] = "IMMEDIATE"
settings.configure(
    DEBUG=False, SECRET_KEY="walpatch-test", USE_TZ=True,
    INSTALLED_APPS=["walnotes"],
    DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": db,
                           "OPTIONS": options}},
)
if not use_init_command:  # Django < 5.1 has no init_command for SQLite: the usual signal
    from django.db.backends.signals import connection_created

    def set_journal_mode(sender, connection, **kwargs):
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=" + mode)

    connection_created.connect(set_journal_mode)
django.setup()
from django.core.management import call_command
from django.db import connection
from walnotes.models import Note

def journal_mode():
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        return cursor.fetchone()[0]

if step == "migrate":
    call_command("makemigrations", "walnotes", verbosity=0)
    call_command("migrate", verbosity=0)
    Note.objects.create(text="a")
    Note.objects.bulk_create([Note(text="b"), Note(text="c")])
    RESULT["rows"] = list(Note.objects.order_by("id").values_list("text", flat=True))
    RESULT["mode"] = journal_mode()
    RESULT["migrations"] = sorted(os.listdir(os.path.join(apps_dir, "walnotes", "migrations")))
    if GUARD:
        from walpatch.connection import is_guarded
        RESULT["guarded"] = is_guarded(connection.connection)
elif step == "connect":  # the journal-mode pragma of the settings runs on connect
    RESULT["downgrade"] = attempt(lambda: Note.objects.count())
    connection.close()
    RESULT["migrate_again"] = attempt(lambda: call_command("migrate", verbosity=0))
elif step == "cursor":
    def downgrade():
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=DELETE")
            return cursor.fetchone()[0]
    RESULT["downgrade"] = attempt(downgrade)
    RESULT["rows"] = list(Note.objects.order_by("id").values_list("text", flat=True))
    connection.close()
done()
'''


def _django_app(root: Path) -> Path:
    app = root / "walnotes"
    (app / "migrations").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "migrations" / "__init__.py").write_text("")
    (app / "models.py").write_text(DJANGO_MODELS)
    return root


@pytest.mark.parametrize("step", ["connect", "cursor"])
def test_django(tmp_path, step):
    need("django")
    db, ctl = tmp_path / "dj.db", tmp_path / "control.db"
    apps = _django_app(tmp_path / "apps")
    used = child(DJANGO, True, db, "WAL", "migrate", apps)
    assert used["rows"] == ["a", "b", "c"] and used["mode"] == "wal", used
    assert "0001_initial.py" in used["migrations"]
    assert used["guarded"] is True
    assert header(db) == WAL
    child(DJANGO, False, ctl, "WAL", "migrate", apps)
    assert header(ctl) == WAL

    # "connect": settings whose journal-mode pragma asks for DELETE on every connection;
    # "cursor": WAL settings, and the application runs the downgrade on Django's cursor.
    mode = "DELETE" if step == "connect" else "WAL"
    got = child(DJANGO, True, db, mode, step, apps)
    assert_refused(got["downgrade"], db, outer="django.db.utils.OperationalError")
    assert header(db) == WAL
    if step == "connect":
        # every new connection is refused the same way, migrations included
        assert_refused(got["migrate_again"], db, outer="django.db.utils.OperationalError")
    else:
        assert got["rows"] == ["a", "b", "c"]

    control = child(DJANGO, False, ctl, mode, step, apps)
    assert_downgrade_passed(control["downgrade"])
    assert header(ctl) == ROLLBACK
    print(f"Django {got['version']} ({got['via']}): {step} downgrade refused")


# --------------------------------------------------------------------------------------------
# peewee: SqliteDatabase(pragmas={"journal_mode": ...})
# --------------------------------------------------------------------------------------------

PEEWEE = '''
import peewee as pw
db, step = sys.argv[2], sys.argv[3]
RESULT["version"] = pw.__version__

def database(mode):
    return pw.SqliteDatabase(db, pragmas={"journal_mode": mode, "cache_size": -4000,
                                          "foreign_keys": 1})

database_wal = database("wal")

class Note(pw.Model):
    text = pw.TextField()

    class Meta:
        database = database_wal

if step == "use":
    database_wal.connect()
    database_wal.create_tables([Note])
    Note.create(text="a")
    with database_wal.atomic():
        Note.insert_many([{"text": "b"}, {"text": "c"}]).execute()
    RESULT["rows"] = [n.text for n in Note.select().order_by(Note.id)]
    RESULT["mode"] = database_wal.journal_mode
    if GUARD:
        from walpatch.connection import is_guarded
        RESULT["guarded"] = is_guarded(database_wal.connection())
    database_wal.close()
elif step == "pragmas":
    database_delete = database("delete")
    RESULT["downgrade"] = attempt(lambda: database_delete.connect())
    RESULT["closed"] = database_delete.is_closed()
elif step == "property":
    database_wal.connect()
    def downgrade():
        database_wal.journal_mode = "delete"
        return database_wal.journal_mode
    RESULT["downgrade"] = attempt(downgrade)
    RESULT["rows"] = [n.text for n in Note.select().order_by(Note.id)]
    database_wal.close()
done()
'''


@pytest.mark.parametrize("step", ["pragmas", "property"])
def test_peewee(tmp_path, step):
    need("peewee")
    db, ctl = tmp_path / "pw.db", tmp_path / "control.db"
    used = child(PEEWEE, True, db, "use")
    assert used["rows"] == ["a", "b", "c"] and used["mode"] == "wal", used
    assert used["guarded"] is True
    assert header(db) == WAL
    child(PEEWEE, False, ctl, "use")
    assert header(ctl) == WAL

    got = child(PEEWEE, True, db, step)
    assert_refused(got["downgrade"], db, outer="peewee.OperationalError")
    assert header(db) == WAL
    if step == "property":
        assert got["rows"] == ["a", "b", "c"]

    control = child(PEEWEE, False, ctl, step)
    assert_downgrade_passed(control["downgrade"])
    assert header(ctl) == ROLLBACK
    print(f"peewee {got['version']}: {step} downgrade refused")


# --------------------------------------------------------------------------------------------
# aiosqlite: its worker thread calls sqlite3.connect
# --------------------------------------------------------------------------------------------

AIOSQLITE = '''
import asyncio, threading
import aiosqlite
db = sys.argv[2]
RESULT["version"] = getattr(aiosqlite, "__version__", "?")

async def fetch(conn, sql):
    async with conn.execute(sql) as cursor:
        return await cursor.fetchall()

async def main():
    async with aiosqlite.connect(db) as conn:
        RESULT["wal"] = (await fetch(conn, "PRAGMA journal_mode=WAL"))[0][0]
        await conn.execute("CREATE TABLE notes(id INTEGER PRIMARY KEY, text TEXT)")
        await conn.executemany("INSERT INTO notes(text) VALUES (?)", [("a",), ("b",)])
        await conn.commit()
        if GUARD:
            from walpatch.connection import is_guarded
            RESULT["guarded"] = is_guarded(conn._conn)
        RESULT["downgrade"] = await attempt_async(fetch(conn, "PRAGMA journal_mode=DELETE"))
        # allow_downgrade() is a context variable of this task; aiosqlite runs the statement
        # in its own thread, and walpatch carries the context there (issue 10 item 15).
        if GUARD:
            with walpatch.allow_downgrade():
                RESULT["allowed_in_task"] = await attempt_async(
                    fetch(conn, "PRAGMA journal_mode=DELETE"))
        await conn.execute("INSERT INTO notes(text) VALUES ('c')")
        await conn.commit()
        RESULT["rows"] = [r[0] for r in await fetch(conn, "SELECT text FROM notes ORDER BY id")]
        RESULT["mode"] = (await fetch(conn, "PRAGMA journal_mode"))[0][0]

async def attempt_async(awaitable):
    try:
        value = await awaitable
    except Exception as exc:
        return {"outcome": "raised", "chain": chain(exc)}
    return {"outcome": "passed", "value": value}

asyncio.run(main())
done()
'''


def test_aiosqlite(tmp_path):
    need("aiosqlite")
    db = tmp_path / "aio.db"
    got = child(AIOSQLITE, True, db)
    assert got["wal"] == "wal" and got["guarded"] is True
    assert_refused(got["downgrade"], db, outer=REFUSED)
    # allow_downgrade() reaches aiosqlite's worker thread (issue 10 item 15): the maintenance
    # downgrade inside the block passes, and the file really leaves WAL.
    assert_downgrade_passed(got["allowed_in_task"])
    assert got["rows"] == ["a", "b", "c"] and got["mode"] == "delete"
    assert header(db) == ROLLBACK

    ctl = tmp_path / "control.db"
    control = child(AIOSQLITE, False, ctl)
    assert control["wal"] == "wal"
    assert_downgrade_passed(control["downgrade"])
    assert control["mode"] == "delete" and control["rows"] == ["a", "b", "c"]
    assert header(ctl) == ROLLBACK
    print(f"aiosqlite {got['version']}: downgrade refused in its worker thread, allowed inside "
          "allow_downgrade()")


# --------------------------------------------------------------------------------------------
# sqlite-utils: Database.enable_wal() / disable_wal()
# --------------------------------------------------------------------------------------------

SQLITE_UTILS = '''
import sqlite_utils
db, step = sys.argv[2], sys.argv[3]
RESULT["version"] = getattr(sqlite_utils, "__version__", "?")
database = sqlite_utils.Database(db)
if step == "enable":
    database["notes"].insert_all([{"id": 1, "text": "a"}, {"id": 2, "text": "b"}], pk="id")
    RESULT["before"] = database.journal_mode
    database.enable_wal()
    RESULT["mode"] = database.journal_mode
    database["notes"].insert({"id": 3, "text": "c"})
    if GUARD:
        from walpatch.connection import is_guarded
        RESULT["guarded"] = is_guarded(database.conn)
elif step == "disable":
    RESULT["downgrade"] = attempt(database.disable_wal)
    RESULT["mode"] = database.journal_mode
    RESULT["rows"] = [r["text"] for r in database["notes"].rows_where(order_by="id")]
elif step == "disable_allowed":
    with walpatch.allow_downgrade():
        RESULT["downgrade"] = attempt(database.disable_wal)
    RESULT["mode"] = database.journal_mode
    RESULT["rows"] = [r["text"] for r in database["notes"].rows_where(order_by="id")]
database.close()
done()
'''


def test_sqlite_utils(tmp_path):
    need("sqlite_utils")
    db, ctl = tmp_path / "su.db", tmp_path / "control.db"
    used = child(SQLITE_UTILS, True, db, "enable")
    assert used["before"] == "delete" and used["mode"] == "wal" and used["guarded"] is True
    assert header(db) == WAL

    got = child(SQLITE_UTILS, True, db, "disable")
    assert_refused(got["downgrade"], db, outer=REFUSED)
    assert got["mode"] == "wal" and got["rows"] == ["a", "b", "c"]
    assert header(db) == WAL

    # A maintenance job leaving WAL on purpose: inside allow_downgrade() it goes through.
    allowed = child(SQLITE_UTILS, True, db, "disable_allowed")
    assert_downgrade_passed(allowed["downgrade"])
    assert allowed["mode"] == "delete" and allowed["rows"] == ["a", "b", "c"]
    assert allowed["stats"]["downgrades_allowed"] == 1
    assert header(db) == ROLLBACK

    child(SQLITE_UTILS, False, ctl, "enable")
    assert header(ctl) == WAL
    control = child(SQLITE_UTILS, False, ctl, "disable")
    assert_downgrade_passed(control["downgrade"])
    assert control["mode"] == "delete"
    assert header(ctl) == ROLLBACK
    print(f"sqlite-utils {got['version']}: disable_wal refused, allowed inside allow_downgrade")


# --------------------------------------------------------------------------------------------
# coverage.py measuring a program while walpatch is active
# --------------------------------------------------------------------------------------------

COVERED_PROGRAM = '''
import json
import sqlite3
import sys

import walpatch


def run(path):
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO t VALUES (42)")
    conn.commit()
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        outcome = "passed"
    except walpatch.WalDowngradeRefused:
        outcome = "refused"
    if outcome == "never":
        print("this line is never run")  # coverage must report it missing
    count = conn.execute("SELECT count(*) FROM t").fetchone()[0]
    conn.close()
    return outcome, count


outcome, count = run(sys.argv[1])
print(json.dumps({"installed": walpatch.is_installed(), "outcome": outcome, "count": count}))
'''


def test_coverage_measures_a_program_with_walpatch_active(tmp_path):
    """coverage.py runs ``PRAGMA journal_mode=off`` on its own data file. With walpatch
    active in every process (a sitecustomize, like the .pth activation), coverage must keep
    working: its data file is a fresh (empty) or rollback-journal file, never WAL on disk and
    never the subject of a failed WAL request, so OFF passes (logged as downgrade-passed)."""
    need("coverage")
    db = tmp_path / "app.db"
    make_db(db, "wal", rows=3)
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "sitecustomize.py").write_text("import walpatch\nwalpatch.install()\n")
    prog = tmp_path / "prog.py"
    prog.write_text(COVERED_PROGRAM)
    data = tmp_path / "cov" / ".coverage"
    data.parent.mkdir()
    events = tmp_path / "events.jsonl"
    env = {"PYTHONPATH": os.pathsep.join([str(boot), str(ROOT)]),
           "WALPATCH_EVENT_FILE": str(events)}
    cov = "import sys; from coverage.cmdline import main; sys.exit(main())"

    def coverage(*args: str) -> Any:
        proc = run_py(cov, *args, env=env, timeout=120)
        assert proc.returncode == 0, (
            f"coverage {args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    # two measured runs: a new data file, then appending to the existing one (-a)
    for extra in ([], ["-a"]):
        proc = coverage("run", *extra, f"--data-file={data}", str(prog), str(db))
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
            "installed": True, "outcome": "refused", "count": 3 + (1 if extra else 0) + 1}
    # parallel data files, combined by a process that is itself protected
    proc = coverage("run", "--parallel-mode", f"--data-file={data}", str(prog), str(db))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["outcome"] == "refused"
    coverage("combine", "-a", f"--data-file={data}")
    report = coverage("json", f"--data-file={data}", "-o", str(tmp_path / "cov.json"),
                      f"--include={prog}")
    assert "Wrote JSON report" in report.stdout + report.stderr
    measured = json.loads((tmp_path / "cov.json").read_text())["files"]
    [(name, info)] = measured.items()
    assert os.path.basename(name) == "prog.py"
    # missing: the line after the refused downgrade, and the branch never taken
    source = COVERED_PROGRAM.splitlines()
    never = [source.index('        outcome = "passed"') + 1,
             source.index('        print("this line is never run")  # coverage must report it'
                          ' missing') + 1]
    assert info["missing_lines"] == never, info
    assert info["summary"]["covered_lines"] >= 15

    assert header(db) == WAL
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    ours = [e for e in lines if e.get("file", "").startswith(str(data))]
    app = [e for e in lines if e.get("file") == str(db)]
    assert ours, f"walpatch saw no journal-mode request on coverage's data file: {lines}"
    # coverage (7.6 on 3.8) also reads and writes its own data file with open() while its
    # connection is open: the lock guard (issue 12) keeps that close from dropping the locks
    # and says so; those events carry no journal-mode request
    requests = [e for e in ours if e["event"] != "lock-guard"]
    assert {e["event"] for e in requests} == {"downgrade-passed"}, ours
    assert {e["request"] for e in requests} == {"off"}, ours
    assert [e["event"] for e in app] == ["downgrade-refused"] * 3, app
    # coverage's data file is a rollback-journal file (it never was WAL)
    assert header(data) == ROLLBACK
    print(f"coverage: {len(ours)} journal_mode=off on its data files passed under walpatch")
