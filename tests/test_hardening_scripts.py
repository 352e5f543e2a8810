"""Issue 10 items 1, 9 and 12: scripts that ATTACH/DETACH, recognition cost, sqlite3's own
rejections.

Every scenario runs in a fresh subprocess twice, once with plain sqlite3 and once with
walpatch installed, on real files; the header bytes 18/19 are read afterwards by yet another
process (dbutil.header). The plain run is the control: it shows what would have happened
without walpatch (a WAL file downgraded to 1/1, or the exact exception sqlite3 raises).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any, Dict, List

import pytest

from walpatch import sqlscan

from .dbutil import ROOT, header, make_db

_SCENARIO = r'''
import json, os, sqlite3, sys
variant, main, uri, setup, entry, sql, params = sys.argv[1:8]
if variant == "walpatch":
    import walpatch
    assert walpatch.install()
sql = json.loads(sql)
conn = sqlite3.connect(main, uri=uri == "1")
for stmt in json.loads(setup):
    conn.execute(stmt)
out = {"error": None}
try:
    if entry == "executescript":
        conn.executescript(sql)
    elif entry == "executemany":
        conn.executemany(sql, [()])
    elif params == "-":
        conn.execute(sql)
    else:
        conn.execute(sql, eval(params))
except BaseException as exc:
    out = {"error": type(exc).__name__, "message": str(exc),
           "schema": getattr(exc, "schema", None), "database": getattr(exc, "database", None),
           "refused": type(exc).__name__ == "WalDowngradeRefused"}
conn.close()
print(json.dumps(out))
'''


def _run(variant: str, cwd: Path, sql: str, *, main: str = ":memory:", setup: List[str] = (),
         entry: str = "executescript", params: str = "-", uri: bool = False,
         python: str = sys.executable) -> Dict[str, Any]:
    env = dict(os.environ)
    env.pop("WALPATCH", None)
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [python, "-c", _SCENARIO, variant, main, "1" if uri else "0", json.dumps(list(setup)),
         entry, json.dumps(sql), params],
        cwd=str(cwd), capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Item 1: ATTACH/DETACH inside the script


def _fresh(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    make_db(d / "wal.db", "wal")
    make_db(d / "rb.db", "delete")
    return d


ATTACH_CASES = {
    "attach-then-unqualified": ("ATTACH 'wal.db' AS aux; PRAGMA journal_mode=DELETE;", {}),
    "attach-then-qualified": ("ATTACH 'wal.db' AS aux; PRAGMA aux.journal_mode=DELETE;", {}),
    "attach-database-kw-quoted": (
        'ATTACH DATABASE "wal.db" AS "Aux"; PRAGMA AUX.journal_mode=TRUNCATE;', {}),
    "rollback-main": ("ATTACH 'wal.db' AS aux; PRAGMA journal_mode=DELETE;",
                      {"main": "rb.db"}),
    "detach-reattach": ("DETACH aux; ATTACH 'wal.db' AS aux; PRAGMA aux.journal_mode=DELETE;",
                        {"setup": ["ATTACH 'rb.db' AS aux"]}),
    "in-a-transaction": ("CREATE TABLE m(x); ATTACH 'wal.db' AS aux; PRAGMA journal_mode=DELETE;",
                         {"main": "rb.db"}),
    "relative-dotdot": ("ATTACH './../wal.db' AS aux; PRAGMA journal_mode=DELETE;",
                        {"cwd": "sub"}),
    "uri": ("ATTACH 'file:wal.db?mode=rw' AS aux; PRAGMA journal_mode=DELETE;", {"uri": True}),
    "file-is-an-expression": ("ATTACH 'wal' || '.db' AS aux; PRAGMA journal_mode=DELETE;", {}),
    "name-is-an-expression": ("ATTACH 'wal.db' AS 'a' || 'ux'; PRAGMA journal_mode=DELETE;",
                              {}),
}


@pytest.mark.parametrize("case", sorted(ATTACH_CASES))
def test_attach_inside_a_script_cannot_downgrade_a_wal_file(tmp_path: Path, case: str) -> None:
    sql, opts = ATTACH_CASES[case]
    outcomes = {}
    for variant in ("plain", "walpatch"):
        d = _fresh(tmp_path, variant)
        cwd = d
        if opts.get("cwd"):
            cwd = d / opts["cwd"]
            cwd.mkdir()
        main = str(d / opts["main"]) if "main" in opts else ":memory:"
        setup = [s.replace("'rb.db'", repr(str(d / "rb.db"))) for s in opts.get("setup", [])]
        out = _run(variant, cwd, sql, main=main, setup=setup, uri=opts.get("uri", False))
        outcomes[variant] = (out, header(d / "wal.db"))
    plain, plain_header = outcomes["plain"]
    assert plain["error"] is None and plain_header == (1, 1), plain  # the control: data risk
    out, wal_header = outcomes["walpatch"]
    assert wal_header == (2, 2), out
    assert out["refused"], out
    assert out["error"] == "WalDowngradeRefused"
    assert "walpatch refused PRAGMA" in out["message"]
    if "expression" in case and case.startswith("file"):
        assert "cannot be known before it runs" in out["message"], out
    else:
        assert out["database"].endswith("wal.db") and "WAL mode on disk" in out["message"], out


def test_nothing_of_a_refused_script_runs(tmp_path: Path) -> None:
    d = _fresh(tmp_path, "all")
    out = _run("walpatch", d, "CREATE TABLE made_here(x); ATTACH 'wal.db' AS aux; "
               "PRAGMA journal_mode=DELETE;", main=str(d / "rb.db"))
    assert out.get("refused"), out
    check = subprocess.run(
        [sys.executable, "-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("
         "\"SELECT count(*) FROM sqlite_master WHERE name='made_here'\").fetchone()[0])",
         str(d / "rb.db")], capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "0"
    assert header(d / "wal.db") == (2, 2) and header(d / "rb.db") == (1, 1)


def test_attach_of_a_rollback_file_still_passes(tmp_path: Path) -> None:
    """Guarding scripts must not refuse what is safe: a rollback file attached and switched
    between rollback modes behaves as without walpatch."""
    for variant in ("plain", "walpatch"):
        d = _fresh(tmp_path, variant)
        out = _run(variant, d, "ATTACH 'rb.db' AS aux; PRAGMA aux.journal_mode=TRUNCATE; "
                   "DETACH aux; ATTACH 'rb.db' AS other; PRAGMA journal_mode=DELETE;")
        assert out["error"] is None, (variant, out)
        assert header(d / "rb.db") == (1, 1) and header(d / "wal.db") == (2, 2)


def test_detached_wal_file_is_no_longer_a_target(tmp_path: Path) -> None:
    d = _fresh(tmp_path, "det")
    out = _run("walpatch", d, "DETACH aux; PRAGMA journal_mode=DELETE;", main=str(d / "rb.db"),
               setup=[f"ATTACH '{d / 'wal.db'}' AS aux"])
    assert out["error"] is None, out
    assert header(d / "wal.db") == (2, 2)


def test_wal_then_downgrade_of_the_same_file_in_one_script_is_refused(tmp_path: Path) -> None:
    """The downgrade is checked before the script runs, when the file is still rollback; the
    script's own WAL request would make it WAL by then. Refused (fail closed)."""
    d = _fresh(tmp_path, "wd")
    plain = _run("plain", d, "PRAGMA journal_mode=WAL; CREATE TABLE y(z); "
                 "PRAGMA journal_mode=DELETE;", main=str(d / "rb.db"))
    assert plain["error"] is None
    d2 = _fresh(tmp_path, "wd2")
    out = _run("walpatch", d2, "PRAGMA journal_mode=WAL; CREATE TABLE y(z); "
               "PRAGMA journal_mode=DELETE;", main=str(d2 / "rb.db"))
    assert out["refused"] and "earlier statement of the same script" in out["message"], out
    assert header(d2 / "rb.db") == (1, 1)


@pytest.mark.parametrize("entry", ["execute", "executescript"])
def test_attach_alone_then_a_later_downgrade(tmp_path: Path, entry: str) -> None:
    """ATTACH in one call, the downgrade in the next: the guard lists the databases afresh
    (worked before this fix too; pinned here)."""
    d = _fresh(tmp_path, entry)
    setup_sql = "ATTACH 'wal.db' AS aux"
    code = (
        "import json, sqlite3, walpatch\n"
        "walpatch.install()\n"
        "c = sqlite3.connect(':memory:')\n"
        f"c.{entry}({setup_sql!r})\n"
        "try:\n"
        "    c.execute('PRAGMA journal_mode=DELETE'); print('ran')\n"
        "except sqlite3.OperationalError as e:\n"
        "    print(type(e).__name__, e.schema)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WALPATCH", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(d), capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.stdout.split() == ["WalDowngradeRefused", "aux"], proc.stderr
    assert header(d / "wal.db") == (2, 2)


def test_wal_request_on_a_file_attached_in_the_script_is_recorded(tmp_path: Path) -> None:
    d = _fresh(tmp_path, "rec")
    code = (
        "import json, sqlite3, walpatch\n"
        "walpatch.install()\n"
        "c = sqlite3.connect(':memory:')\n"
        "c.executescript(\"ATTACH 'rb.db' AS aux; PRAGMA aux.journal_mode=WAL; DETACH aux;\")\n"
        "print(json.dumps(walpatch.stats()))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WALPATCH", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(d), capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["wal_ok"] == 1 and stats.get("wal_silently_refused", 0) == 0, stats
    assert header(d / "rb.db") == (2, 2)


def test_script_steps_from_the_scanner() -> None:
    plan = sqlscan.scan_uncached(
        "DETACH DATABASE aux; ATTACH 'x.db' AS [a b]; ATTACH f() AS c; ATTACH 'y' AS null; "
        "EXPLAIN ATTACH 'z' AS q; PRAGMA journal_mode=DELETE; ATTACH 'late' AS l")
    assert plan is not None
    steps = plan.steps
    assert steps[0] == sqlscan.Detach("aux")
    assert steps[1] == sqlscan.Attach("a b", "x.db", "")
    assert steps[2].file is None and steps[2].schema == "c"
    assert steps[3].schema is None and steps[3].file == "y"
    assert steps[2].why == "ATTACH whose file is an expression, a parameter or a keyword"
    assert isinstance(steps[4], sqlscan.Request) and len(steps) == 5  # EXPLAIN runs nothing


# --------------------------------------------------------------------------------------------
# Item 12: what sqlite3 rejects before running anything, sqlite3 rejects

REJECTED = [
    ("execute", "PRAGMA journal_mode=DELETE; SELECT 1", "-"),
    ("execute", "  ;;PRAGMA journal_mode=DELETE;;", "-"),
    ("execute", "SELECT 1; PRAGMA journal_mode=DELETE", "-"),
    ("execute", "PRAGMA journal_mode=DELETE;\v", "-"),
    ("execute", "PRAGMA journal_mode=DELETE", "(1,)"),
    ("execute", "PRAGMA journal_mode=DELETE", "'ab'"),
    ("execute", "PRAGMA journal_mode=DELETE", "42"),
    ("execute", "PRAGMA journal_mode=DELETE", "None"),
    ("execute", "PRAGMA journal_mode=DELETE\0", "-"),
    ("executemany", "PRAGMA journal_mode=DELETE; SELECT 1", "-"),
]


def _compare_rejections(tmp_path: Path, python: str) -> None:
    for n, (entry, sql, params) in enumerate(REJECTED):
        got = {}
        for variant in ("plain", "walpatch"):
            d = tmp_path / f"{n}-{variant}"
            d.mkdir()
            make_db(d / "w.db", "wal")
            got[variant] = _run(variant, d, sql, main=str(d / "w.db"), entry=entry,
                                params=params, python=python)
            assert header(d / "w.db") == (2, 2), (sql, variant)
        assert got["plain"]["error"] is not None, (sql, got)  # the control: sqlite3 rejects
        assert got["walpatch"] == got["plain"], (sql, params, got)
    # and a clean downgrade is still refused
    d = tmp_path / "clean"
    d.mkdir()
    make_db(d / "w.db", "wal")
    out = _run("walpatch", d, "PRAGMA journal_mode=DELETE; -- ok\n", main=str(d / "w.db"),
               entry="execute", params="()", python=python)
    assert out["refused"], out
    assert header(d / "w.db") == (2, 2)


def _executemany_of_a_downgrade_is_refused(tmp_path: Path, python: str) -> None:
    """3.8-3.10 raise "executemany() can only execute DML statements" only *after* running
    the statement once: plain sqlite3 downgrades the file and then raises. That is no
    rejection before running, so walpatch guards it (and refuses)."""
    got = {}
    for variant in ("plain", "walpatch"):
        d = tmp_path / f"many-{variant}"
        d.mkdir()
        make_db(d / "w.db", "wal")
        got[variant] = (_run(variant, d, "PRAGMA journal_mode=DELETE", main=str(d / "w.db"),
                             entry="executemany", python=python), header(d / "w.db"))
    out, wal_header = got["walpatch"]
    assert out["refused"] and wal_header == (2, 2), got
    plain, plain_header = got["plain"]
    if plain["error"] == "ProgrammingError":  # 3.8-3.10: ran, then raised
        assert "DML" in plain["message"] and plain_header == (1, 1), got
    else:  # 3.11+: executemany runs any statement
        assert plain["error"] is None and plain_header == (1, 1), got


def test_sqlite3_rejections_pass_through(tmp_path: Path) -> None:
    _compare_rejections(tmp_path, sys.executable)
    _executemany_of_a_downgrade_is_refused(tmp_path, sys.executable)


# ids are the minor versions so that a nox cell of another interpreter deselects them (they
# run once per CI run, in the full suite, not once per cell).
@pytest.mark.parametrize("version", [pytest.param("3.8.18", id="3.8"),
                                     pytest.param("3.10.13", id="3.10")])
def test_sqlite3_rejections_pass_through_on_older_pythons(tmp_path: Path, version: str) -> None:
    """On the pyenv interpreter of that version (walpatch from this checkout on PYTHONPATH,
    wrapt from a cached venv: tests/test_cpython_suite.py's python_with_wrapt). A missing
    interpreter fails: nothing is skipped."""
    from .test_cpython_suite import python_with_wrapt

    base = Path.home() / ".pyenv" / "versions" / version / "bin" / "python"
    if not base.exists():
        pytest.fail(f"CPython {version} is not installed at {base} (pyenv install {version})")
    python = python_with_wrapt(version[:version.rindex(".")], str(base))
    _compare_rejections(tmp_path, python)
    _executemany_of_a_downgrade_is_refused(tmp_path, python)


# --------------------------------------------------------------------------------------------
# Item 9: recognition is cheap and bounded in memory

_ROW = ("INSERT INTO journal_mode_log VALUES(12345,'some text, with words; and -- things',"
        "3.5,x'00ff');\n")


def _peak(sql: str) -> int:
    tracemalloc.start()
    try:
        sqlscan.scan_uncached(sql)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_mention_only_dump_costs_no_memory() -> None:
    dump = _ROW * 50_000  # 4.5 MB
    assert sqlscan.scan_uncached(dump) is None
    assert sqlscan.last_site(dump) == -1
    assert _peak(dump) < 64 * 1024


def test_a_request_after_a_large_dump_is_found_in_bounded_memory() -> None:
    dump = ("CREATE TABLE t(journal_mode TEXT);\n" + _ROW * 20_000
            + "SELECT journal_mode, t.journal_mode FROM t;\nPRAGMA main.journal_mode = wal;\n")
    plan = sqlscan.scan_uncached(dump)
    assert plan is not None and [(r.schema, r.mode) for r in plan.requests] == [("main", "wal")]
    assert plan.requests[0].statement == "\nPRAGMA main.journal_mode = wal;"
    assert _peak(dump) < 256 * 1024  # the token list of the old scanner took ~100x the text


def test_long_text_is_cached_by_size_only_where_scanning_cost_something() -> None:
    mention = "SELECT * FROM journal_mode_log WHERE x = '" + "y" * 10_000 + "'"
    request = "PRAGMA journal_mode=wal; SELECT '" + "y" * 10_000 + "'"
    assert sqlscan.scan(mention) is None and mention not in sqlscan._CACHE
    plan = sqlscan.scan(request)
    assert plan is not None and sqlscan._CACHE.get(request) is plan
    assert sqlscan._cache_chars <= sqlscan.CACHE_MAX_CHARS
    for i in range(sqlscan.CACHE_MAX_CHARS // 10_000 + 5):
        sqlscan.scan(f"PRAGMA journal_mode=wal; SELECT {i}, '" + "y" * 10_000 + "'")
        assert sqlscan._cache_chars <= sqlscan.CACHE_MAX_CHARS


@pytest.mark.parametrize("sql,site", [
    ("PRAGMA journal_mode=wal", True),
    ("PRAGMA -- c\n journal_mode=wal", True),
    ("PRAGMA /* c */ \"journal_mode\"=wal", True),
    ("PRAGMA [main] . [journal_mode]=wal", True),
    ("PRAGMA " + " " * 1000 + "journal_mode=wal", True),
    ("PRAGMA /*" + "x" * 1000 + "*/journal_mode=wal", True),
    ("SELECT journal_mode, x FROM t", False),
    ("INSERT INTO t(a, journal_mode) VALUES (1, 2)", False),
    ("CREATE TABLE t(journal_mode)", False),
    ("SELECT * FROM journal_mode_log", False),
    ("SELECT $journal_mode", False),
])
def test_sites(sql: str, site: bool) -> None:
    assert (sqlscan.last_site(sql) >= 0) is site


def _run_on_a_wal_file(code: str, db: Path, variant: str) -> Dict[str, Any]:
    """Make ``db`` a WAL file, run ``code DB VARIANT`` (plain or walpatch) in a fresh
    interpreter, return its last JSON line."""
    make_db(db, "wal")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WALPATCH", None)
    proc = subprocess.run([sys.executable, "-c", code, str(db), variant],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CALLABLE_TEXT_FACTORY_SCRIPT = r"""
import json, sqlite3, sys
if sys.argv[2] == "walpatch":
    import walpatch
    assert walpatch.install()
c = sqlite3.connect(sys.argv[1])
c.text_factory = lambda b: b.decode("utf-8", "replace").upper()   # any callable
try:
    c.executescript("CREATE TABLE IF NOT EXISTS t(x); PRAGMA journal_mode='delete';")
    print(json.dumps({"error": None}))
except sqlite3.Error as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


@pytest.mark.parametrize("variant", ["plain", "walpatch"])
def test_mixed_script_downgrade_under_a_callable_text_factory(tmp_path: Path, variant: str):
    """Found by the differential harness after the merges: under a text_factory that upper-
    cases text, the script check read the database list through it, saw a file name that
    does not exist and let the downgrade through (2/2 -> 1/1). Control: plain downgrades."""
    db = tmp_path / "w.db"
    out = _run_on_a_wal_file(_CALLABLE_TEXT_FACTORY_SCRIPT, db, variant)
    if variant == "plain":
        assert out == {"error": None} and header(db) == (1, 1)
    else:
        assert out["error"] == "WalDowngradeRefused" and str(db) in out["message"], out
        assert header(db) == (2, 2)


_EXECUTEMANY_BAD_SETS = r"""
import json, sqlite3, sys
if sys.argv[2] == "walpatch":
    import walpatch
    assert walpatch.install()
c = sqlite3.connect(sys.argv[1])
try:
    c.executemany("PRAGMA journal_mode='delete'", (1,))   # a set that is not a sequence
    print(json.dumps({"error": None}))
except Exception as e:  # ProgrammingError on 3.11+, ValueError before
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def test_executemany_with_a_bad_parameter_set_raises_sqlite3s_error(tmp_path: Path) -> None:
    """executemany(pragma, (1,)): sqlite3 rejects the parameter set before running anything
    ("parameters are of unsupported type"); walpatch lets it (found by the differential
    harness). The first set of a list/tuple is probed; the file stays 2/2 either way."""
    got = {}
    for variant in ("plain", "walpatch"):
        db = tmp_path / f"{variant}.db"
        got[variant] = (_run_on_a_wal_file(_EXECUTEMANY_BAD_SETS, db, variant), header(db))
    assert got["plain"][0]["error"] in ("ProgrammingError", "ValueError"), got
    assert got["walpatch"] == got["plain"], got
    assert got["walpatch"][1] == (2, 2)
