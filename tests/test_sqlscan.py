"""walpatch.sqlscan against SQLite's own parser.

Two kinds of tests:

* unit tests for the documented forms (design.md section 2) and the memo cache;
* an oracle: hypothesis generates scripts that mix valid and invalid pragma forms, and each
  one is run through ``executescript`` on a fresh ``:memory:`` connection whose authorizer
  records every SQLITE_PRAGMA (and returns SQLITE_IGNORE, so no pragma runs) and whose trace
  callback records every statement that SQLite actually stepped. A journal-mode report only
  counts when its statement ran (a statement SQLite rejects, or an EXPLAIN, runs nothing), so
  the scanner's requests must equal exactly those, with ``mode_for_value`` applied to the
  value, and each ``Request.statement`` must be the very statement text SQLite ran.

``mode_for_value`` itself is checked against real journal-mode changes on database files.
"""
from __future__ import annotations

import functools
import sqlite3
import sys
from typing import Any, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from walpatch import sqlscan
from walpatch.sqlscan import Plan, Request, ascii_lower, mode_for_value, scan, scan_uncached

PY311 = sys.version_info >= (3, 11)


# --------------------------------------------------------------------------------------------
# SQLite as the oracle


def _raw_connect(database: str) -> sqlite3.Connection:
    """A plain sqlite3 connection even if walpatch happens to be installed in this process."""
    connect = getattr(sqlite3.connect, "__wrapped__", sqlite3.connect)
    conn = connect(database)
    assert type(conn) is sqlite3.Connection
    return conn


_SETUP = (
    "ATTACH ':memory:' AS aux;"
    "CREATE TEMP TABLE t(journal_mode, x);"
    "CREATE TABLE aux.u(journal_mode);"
)

Report = Tuple[Optional[str], str]  # (schema as SQLite resolved it, or None; mode)


class Run:
    """What SQLite did with one script."""

    def __init__(self, sql: str) -> None:
        self.auth: List[Tuple[int, Any, Any, Any]] = []
        self.traced: List[str] = []
        self.error: Optional[BaseException] = None
        conn = _raw_connect(":memory:")
        try:
            conn.executescript(_SETUP)

            def authorizer(action: int, arg1: Any, arg2: Any, dbname: Any, source: Any) -> int:
                self.auth.append((action, arg1, arg2, dbname))
                if action == sqlite3.SQLITE_PRAGMA:
                    return sqlite3.SQLITE_IGNORE  # prepared and reported, but nothing runs
                return sqlite3.SQLITE_OK

            conn.set_authorizer(authorizer)
            conn.set_trace_callback(self.traced.append)
            try:
                conn.executescript(sql)
            except (sqlite3.Error, ValueError, UnicodeError) as exc:
                self.error = exc
        finally:
            conn.close()

    def journal_reports(self) -> List[Tuple[Any, Any]]:
        """(dbname, value) of every journal_mode pragma SQLite prepared (ran or not)."""
        return [
            (db, value) for action, name, value, db in self.auth
            if action == sqlite3.SQLITE_PRAGMA and ascii_lower(name) == "journal_mode"
        ]


@functools.lru_cache(maxsize=None)
def _ran_alone(text: str) -> Tuple[Tuple[Any, Any], ...]:
    """The journal_mode reports of one statement that SQLite ran, run alone."""
    alone = Run(text)
    assert alone.error is None, (text, alone.error)
    assert alone.traced == [text]
    return tuple(alone.journal_reports())


def sqlite_truth(sql: str, run: Optional[Run] = None) -> Tuple[
        List[Tuple[Optional[str], str, str]], bool]:
    """(requests as [(schema, mode, statement text)], only_journal_pragmas) per SQLite."""
    if run is None:
        run = Run(sql)
    requests: List[Tuple[Optional[str], str, str]] = []
    for text in run.traced:
        # The statement that ran, run alone: its own reports, and nothing else's. (EXPLAIN is
        # never traced, and a statement that failed to prepare is never traced either.)
        for db, value in _ran_alone(text):
            if value is None:
                continue  # a query
            mode = mode_for_value(value)
            if mode is not None:
                requests.append((db, mode, text))
    only = (
        run.error is None
        and bool(run.auth)
        and all(a == sqlite3.SQLITE_PRAGMA and ascii_lower(n) == "journal_mode"
                and v is not None and mode_for_value(v) is not None
                for a, n, v, _ in run.auth)
        and len(run.auth) == len(run.traced)  # no EXPLAIN (prepared, never stepped)
    )
    return requests, only


def scanner_view(plan: Optional[Plan]) -> Tuple[List[Tuple[Optional[str], str, str]], bool]:
    if plan is None:
        return [], False
    return (
        [(ascii_lower(r.schema) if r.schema is not None else None, r.mode, r.statement)
         for r in plan.requests],
        plan.only_journal_pragmas,
    )


def assert_agrees(sql: str, judge_unknown_schema: bool = True) -> None:
    run = Run(sql)
    if not judge_unknown_schema:
        # SQLite stopped on a schema name that is not attached (a semantic error). The
        # scanner cannot know which names are attached, so it still reports such a request
        # (walpatch then finds no database file for it): generated scripts that hit this
        # are not judged.
        # The same for other semantic errors: a table name that does not exist (hypothesis
        # found "SELECT journal_mode FROM t\ufeff", where U+FEFF is part of the name).
        assume(run.error is None or not any(
            m in str(run.error) for m in ("unknown database", "no such table", "no such column")))
    expected, only = sqlite_truth(sql, run)
    plan = scan_uncached(sql)
    got, got_only = scanner_view(plan)
    assert got == expected, f"scanner {got!r} != sqlite {expected!r} for {sql!r}"
    if expected:
        assert got_only == only, f"only_journal_pragmas {got_only} != {only} for {sql!r}"
    assert scan(sql) == plan


# --------------------------------------------------------------------------------------------
# Unit tests: the documented forms


def requests_of(sql: str) -> List[Tuple[Optional[str], str]]:
    plan = scan_uncached(sql)
    return [] if plan is None else [(r.schema, r.mode) for r in plan.requests]


@pytest.mark.parametrize("sql,expected", [
    ("PRAGMA journal_mode=WAL", [(None, "wal")]),
    ("pragma JOURNAL_MODE = wal", [(None, "wal")]),
    ("PrAgMa JoUrNaL_mOdE=DeLeTe", [(None, "delete")]),
    ("PRAGMA main.journal_mode = wal", [("main", "wal")]),
    ("PRAGMA MAIN . journal_mode=truncate", [("MAIN", "truncate")]),
    ('PRAGMA "aux".journal_mode = persist', [("aux", "persist")]),
    ("PRAGMA [aux].journal_mode = memory", [("aux", "memory")]),
    ("PRAGMA `temp`.journal_mode = off", [("temp", "off")]),
    ("PRAGMA 'main'.journal_mode = wal", [("main", "wal")]),
    ('PRAGMA "journal_mode"=\'wal\'', [(None, "wal")]),
    ("PRAGMA journal_mode = 'wal'", [(None, "wal")]),
    ('PRAGMA journal_mode = "wal"', [(None, "wal")]),
    ("PRAGMA journal_mode = [wal]", [(None, "wal")]),
    ("PRAGMA journal_mode('wal')", [(None, "wal")]),
    ("PRAGMA journal_mode ( delete )", [(None, "delete")]),
    ("PRAGMA journal_mode==wal", [(None, "wal")]),
    ("PRAGMA journal_mode=of", [(None, "off")]),  # OF is a keyword that may be a name
    ("PRAGMA journal_mode=\"\"", [(None, "delete")]),  # empty quoted name: prefix of delete
    ("   \n\t PRAGMA journal_mode=wal", [(None, "wal")]),
    ("\ufeffPRAGMA journal_mode=wal", [(None, "wal")]),  # a BOM is white space to SQLite
    ("PRAGMA journal_mode=\ufeffwal", [(None, "wal")]),
    ("-- set it\nPRAGMA journal_mode=wal -- trailing", [(None, "wal")]),
    ("/*a*/PRAGMA/*b*/main/*c*/./*d*/journal_mode/*e*/=/*f*/wal/*g*/;/*h*/",
     [("main", "wal")]),
    ("PRAGMA --x\n journal_mode --y\n = --z\n wal", [(None, "wal")]),
    ("PRAGMA journal_mode=wal; PRAGMA aux.journal_mode=delete; SELECT 1;",
     [(None, "wal"), ("aux", "delete")]),
    # prefixes: SQLite compares strlen(value) characters against each mode name in order
    ("PRAGMA journal_mode='w'", [(None, "wal")]),
    ("PRAGMA journal_mode='d'", [(None, "delete")]),
    ("PRAGMA journal_mode=''", [(None, "delete")]),
    ("PRAGMA journal_mode='p'", [(None, "persist")]),
    ("PRAGMA journal_mode='o'", [(None, "off")]),
    ("PRAGMA journal_mode='t'", [(None, "truncate")]),
    ("PRAGMA journal_mode=M", [(None, "memory")]),
    ("PRAGMA journal_mode='wall'", []),
    ("PRAGMA journal_mode=bogus", []),
    ("PRAGMA journal_mode='wal '", []),
    ("PRAGMA journal_mode=1", []),
    ("PRAGMA journal_mode=-1", []),
    # no value: a query
    ("PRAGMA journal_mode", []),
    ("PRAGMA main.journal_mode;", []),
    # not requests at all
    ("SELECT 'PRAGMA journal_mode=delete'", []),
    ("SELECT journal_mode FROM t", []),
    ("CREATE TABLE x(journal_mode TEXT DEFAULT 'wal')", []),
    ("EXPLAIN PRAGMA journal_mode=delete", []),
    ("EXPLAIN QUERY PLAN PRAGMA journal_mode=delete", []),
    ("/* PRAGMA journal_mode=delete */ SELECT 1", []),
    ("-- PRAGMA journal_mode=delete", []),
    ("PRAGMA journal_size_limit=0", []),
    ("PRAGMA journal_mode_x=delete", []),
    # SQLite folds ASCII letters only: none of these name the pragma or a mode
    ("PRAGMA journal_mode=oﬀ", []),        # U+FB00 casefolds to "ff"
    ("PRAGMA journal_mode=perſist", []),   # U+017F upper()s to "S"
    ("PRAGMA journal_mode=wаl", []),       # Cyrillic a
    ("PRAGMA journal_mode=WAL\u0130", []),  # Turkish dotted I lower()s to "i̇"
    ("PRAGMA journal_mode=\u212a", []),     # Kelvin sign lower()s to "k"
    ("PRAGMA journal_mode='\u0130'", []),
    ("PRAGMA JOURNAL_MODE=DELETE\u212a", []),
    ("PRAGMA journal_mode=de\u0130ete", []),
])
def test_documented_forms(sql: str, expected: List[Tuple[Optional[str], str]]) -> None:
    assert requests_of(sql) == expected
    assert_agrees(sql)


@pytest.mark.parametrize("sql", [
    "PRAGMA journal_mode=wal junk",            # trailing junk: a syntax error, nothing runs
    "PRAGMA journal_mode = = wal",
    "PRAGMA journal_mode===wal",
    "PRAGMA journal_mode('wal'",
    "PRAGMA journal_mode=wal)",
    "PRAGMA journal_mode()",
    "PRAGMA journal_mode=",
    "PRAGMA journal_mode='wal' 'x'",
    "PRAGMA journal_mode=select",              # a reserved word cannot be a value
    "PRAGMA journal_mode=-wal",
    "PRAGMA journal_mode=$wal",
    "PRAGMA journal_mode=?",
    "PRAGMA journal_mode=x'00'",
    "PRAGMA journal_mode=1abc",
    "PRAGMA on.journal_mode=wal",
    "PRAGMA select.journal_mode=wal",
    "PRAGMA journal_mode='wal",                # unterminated string
    "PRAGMA journal_mode=wal /*",              # "/*" at the very end is a slash, not a comment
    "PRAGMA\ufeffjournal_mode=wal",            # a BOM inside a word is part of the word
    "PRAGMAjournal_mode=wal",
    "PRAGMA journal_mode=wal\v",               # \v starts no token (only continues white space)
    "PRAGMA journal_mode=w\\al",
    "PRAGMA journal_mode=wal!",
    "EXPLAIN",
])
def test_rejected_statements_are_not_requests(sql: str) -> None:
    assert requests_of(sql) == []
    run = Run(sql)
    assert run.error is not None, "SQLite accepted it: the test case is wrong"
    assert_agrees(sql)


@pytest.mark.parametrize("sql,expected", [
    # Statements after one that SQLite rejects never run.
    ("PRAGMA journal_mode=wal; junk; PRAGMA journal_mode=delete", [(None, "wal")]),
    ("PRAGMA journal_mode=bogus junk; PRAGMA journal_mode=delete", []),
    ("(SELECT 1); PRAGMA journal_mode=delete", []),
    ("SELECT 'x; PRAGMA journal_mode=delete", []),
    ("SELECT 1 AS [a; PRAGMA journal_mode=delete", []),
    ("SELECT 1 ! 2; PRAGMA journal_mode=delete", []),
    ("EXPLAIN QUERY PRAGMA journal_mode=wal; PRAGMA journal_mode=delete", []),
    # A trigger body holds semicolons; a PRAGMA inside one is a syntax error.
    ("CREATE TEMP TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; PRAGMA journal_mode=wal; END;"
     " PRAGMA journal_mode=delete", []),
    ("CREATE TEMP TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; UPDATE t SET x=CASE WHEN 1 "
     "THEN 2 END; END; PRAGMA journal_mode=delete", [(None, "delete")]),
    ("CREATE TEMP TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END junk; "
     "PRAGMA journal_mode=delete", []),
    # A semicolon inside a string, a quoted name, a comment or a Tcl-style variable is no end.
    ("SELECT 'a;PRAGMA journal_mode=delete'; PRAGMA journal_mode=wal", [(None, "wal")]),
    ("SELECT 1 AS \"x;PRAGMA journal_mode=delete\"; PRAGMA journal_mode=wal", [(None, "wal")]),
    ("SELECT $a(;x;y); PRAGMA journal_mode=wal", [(None, "wal")]),
    ("SELECT $a(;x PRAGMA journal_mode=delete); PRAGMA journal_mode=wal", []),  # no ")"
    ("SELECT 1 /* ; PRAGMA journal_mode=delete */; PRAGMA journal_mode=wal", [(None, "wal")]),
])
def test_scripts_stop_where_sqlite_stops(sql: str, expected: List[Tuple[Optional[str], str]]):
    assert requests_of(sql) == expected
    assert_agrees(sql)


def test_nul_character() -> None:
    sql = "PRAGMA journal_mode=wal\0; PRAGMA journal_mode=delete"
    if PY311:  # 3.11+: ValueError before anything runs
        assert requests_of(sql) == []
    else:  # 3.8-3.10: executescript() stops silently at the NUL
        assert requests_of(sql) == [(None, "wal")]
        assert scan_uncached(sql).requests[0].statement == "PRAGMA journal_mode=wal"
    assert_agrees(sql)
    # execute() refuses NUL on every version
    conn = _raw_connect(":memory:")
    with pytest.raises((ValueError, sqlite3.ProgrammingError)):
        conn.execute("PRAGMA journal_mode=wal\0")
    conn.close()


def test_lone_surrogate_is_never_a_request() -> None:
    sql = "PRAGMA journal_mode=delete; SELECT '\ud800'"
    assert requests_of(sql) == []
    assert isinstance(Run(sql).error, UnicodeError)


def test_only_journal_pragmas_flag() -> None:
    cases = {
        "PRAGMA journal_mode=wal": True,
        "PRAGMA journal_mode=wal; PRAGMA aux.journal_mode=delete;": True,
        # a query (or an unknown value, which SQLite treats as one) is run as part of the
        # script: it can fail on its own ("unknown database"), so the script is not split
        "PRAGMA journal_mode; PRAGMA journal_mode=wal": False,
        "PRAGMA journal_mode=bogus; PRAGMA journal_mode=wal": False,
        "  ;; PRAGMA journal_mode=wal;; -- end": True,
        "PRAGMA journal_mode=wal; SELECT 1": False,
        "SELECT 1; PRAGMA journal_mode=wal": False,
        "PRAGMA journal_mode=wal; PRAGMA cache_size=10": False,
        "PRAGMA journal_mode=wal; EXPLAIN PRAGMA journal_mode=wal": False,
        "PRAGMA journal_mode=wal; junk": False,   # a failing statement: run the script as is
        "PRAGMA journal_mode=wal; /*": False,
    }
    for sql, only in cases.items():
        plan = scan_uncached(sql)
        assert plan is not None, sql
        assert plan.only_journal_pragmas is only, sql
        assert_agrees(sql)


def test_request_statement_runs_alone_to_the_same_effect(tmp_path) -> None:
    sql = ("-- header\nSELECT 1;  ;; PRAGMA main.journal_mode = 'w' /* c */ ;"
           "\n PRAGMA \"journal_mode\"(d) -- tail")
    plan = scan_uncached(sql)
    assert plan is not None
    assert [r.statement for r in plan.requests] == [
        "  ;; PRAGMA main.journal_mode = 'w' /* c */ ;",
        "\n PRAGMA \"journal_mode\"(d) -- tail",
    ]
    for request in plan.requests:
        alone = scan_uncached(request.statement)
        assert alone is not None and alone.only_journal_pragmas
        assert [(r.schema, r.mode) for r in alone.requests] == [(request.schema, request.mode)]
    assert_agrees(sql)
    # execute() (what walpatch uses to run them one at a time) takes each text as it is
    conn = _raw_connect(str(tmp_path / "alone.db"))
    try:
        for request in plan.requests:
            assert conn.execute(request.statement).fetchone()[0] == request.mode
    finally:
        conn.close()


def test_request_object() -> None:
    plan = scan_uncached("PRAGMA aux.journal_mode=wal")
    assert plan is not None
    (request,) = plan.requests
    assert isinstance(request, Request)
    assert request.is_wal and request.schema == "aux" and request.mode == "wal"
    assert not scan_uncached("PRAGMA journal_mode=delete").requests[0].is_wal


def test_ascii_lower_folds_ascii_only() -> None:
    assert ascii_lower("JOURNAL_Mode") == "journal_mode"
    assert ascii_lower("\u0130\u212a\u00c9") == "\u0130\u212a\u00c9"


_KEYWORDS = [  # every keyword of tool/mkkeywordhash.c (WITHIN is not one in 3.40)
    "ABORT", "ACTION", "ADD", "AFTER", "ALL", "ALTER", "ALWAYS", "ANALYZE", "AND", "AS", "ASC",
    "ATTACH", "AUTOINCREMENT", "BEFORE", "BEGIN", "BETWEEN", "BY", "CASCADE", "CASE", "CAST",
    "CHECK", "COLLATE", "COLUMN", "COMMIT", "CONFLICT", "CONSTRAINT", "CREATE", "CROSS",
    "CURRENT", "CURRENT_DATE", "CURRENT_TIME", "CURRENT_TIMESTAMP", "DATABASE", "DEFAULT",
    "DEFERRED", "DEFERRABLE", "DELETE", "DESC", "DETACH", "DISTINCT", "DO", "DROP", "END", "EACH",
    "ELSE", "ESCAPE", "EXCEPT", "EXCLUSIVE", "EXCLUDE", "EXISTS", "EXPLAIN", "FAIL", "FILTER",
    "FIRST", "FOLLOWING", "FOR", "FOREIGN", "FROM", "FULL", "GENERATED", "GLOB", "GROUP",
    "GROUPS", "HAVING", "IF", "IGNORE", "IMMEDIATE", "IN", "INDEX", "INDEXED", "INITIALLY",
    "INNER", "INSERT", "INSTEAD", "INTERSECT", "INTO", "IS", "ISNULL", "JOIN", "KEY", "LAST",
    "LEFT", "LIKE", "LIMIT", "MATCH", "MATERIALIZED", "NATURAL", "NO", "NOT", "NOTHING",
    "NOTNULL", "NULL", "NULLS", "OF", "OFFSET", "ON", "OR", "ORDER", "OTHERS", "OUTER", "OVER",
    "PARTITION", "PLAN", "PRAGMA", "PRECEDING", "PRIMARY", "QUERY", "RAISE", "RANGE", "RECURSIVE",
    "REFERENCES", "REGEXP", "REINDEX", "RELEASE", "RENAME", "REPLACE", "RESTRICT", "RETURNING",
    "RIGHT", "ROLLBACK", "ROW", "ROWS", "SAVEPOINT", "SELECT", "SET", "TABLE", "TEMP",
    "TEMPORARY", "THEN", "TIES", "TO", "TRANSACTION", "TRIGGER", "UNBOUNDED", "UNION", "UNIQUE",
    "UPDATE", "USING", "VACUUM", "VALUES", "VIEW", "VIRTUAL", "WHEN", "WHERE", "WINDOW", "WITH",
    "WITHIN", "WITHOUT",
]


def _syntax_error_at_start(sql: str, word: str) -> bool:
    error = Run(sql).error
    return error is not None and str(error).startswith(f'near "{word}": syntax error')


def test_keywords_as_pragma_values_and_names() -> None:
    """The reserved-word list against SQLite: as a value, a pragma name and a schema name."""
    for kw in _KEYWORDS:
        for word in (kw, kw.lower()):
            # as a value: a syntax error stops the script, else it is a query (or OF -> off)
            assert_agrees(f"PRAGMA journal_mode={word}; PRAGMA journal_mode=wal")
            assert_agrees(f"PRAGMA journal_mode({word}); PRAGMA journal_mode=wal")
            # as a pragma name (an unknown pragma does nothing)
            assert_agrees(f"PRAGMA {word}; PRAGMA journal_mode=wal")
            assert_agrees(f"PRAGMA {word}=1; PRAGMA journal_mode=wal")
        # as a schema name: SQLite says "unknown database" when it parsed it as a name
        sql = f"PRAGMA {kw}.journal_mode=wal"
        error = Run(sql).error
        if error is None:  # TEMP: the temp schema itself
            assert_agrees(sql)
        parsed_as_name = error is None or "unknown database" in str(error)
        assert (requests_of(sql) == [(kw, "wal")]) is parsed_as_name, (kw, error)


def test_statement_starters_match_sqlite() -> None:
    """Which words may start a statement, and a statement inside a trigger body."""
    for kw in _KEYWORDS:
        assert _syntax_error_at_start(f"{kw} zzqq", kw) is (kw.lower() not in sqlscan._COMMANDS)
        in_body = f"CREATE TEMP TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; {kw} zzqq"
        assert _syntax_error_at_start(in_body, kw) is (kw.lower() not in sqlscan._TRIGGER_BODY)
    for junk in ("zzqq", "(", "'s'", "1", "x'00'", "?", "*", "."):
        assert _syntax_error_at_start(f"{junk} zzqq", junk), junk
        assert_agrees(f"{junk} zzqq; PRAGMA journal_mode=wal")
    assert_agrees("EXPLAIN CREATE TEMP TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END;"
                  " PRAGMA journal_mode=wal")
    assert requests_of("EXPLAIN CREATE TEMP TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END;"
                       " PRAGMA journal_mode=wal") == [(None, "wal")]


# --------------------------------------------------------------------------------------------
# mode_for_value against real journal-mode changes on database files

_VALUES = [
    "wal", "WAL", "Wal", "w", "W", "wa", "d", "D", "de", "delete", "DELETE", "", "p", "pers",
    "persist", "PERSIST", "o", "of", "off", "OFF", "t", "tru", "truncate", "TrUnCaTe", "m",
    "mem", "memory", "MEMORY", "wall", "bogus", "deletex", "wal ", " wal", "offx", "x",
    "walk", "oﬀ", "perſist", "wаl", "WAL\u0130", "\u212a", "memory\u0131",
]


def _switch(path: str, start: str, value: str) -> str:
    conn = _raw_connect(path)
    try:
        assert conn.execute(f"PRAGMA journal_mode={start}").fetchone()[0] == start
        quoted = "'" + value.replace("'", "''") + "'"
        return conn.execute(f"PRAGMA journal_mode={quoted}").fetchone()[0]
    finally:
        conn.close()


def test_mode_for_value_matches_sqlite(tmp_path) -> None:
    for n, value in enumerate(_VALUES):
        results = []
        for start in ("persist", "truncate"):
            results.append(_switch(str(tmp_path / f"v{n}-{start}.db"), start, value))
        if results == ["persist", "truncate"]:
            actual = None  # SQLite left the mode alone: it treated the value as a query
        else:
            assert results[0] == results[1], (value, results)
            actual = results[0]
        assert mode_for_value(value) == actual, (value, results)


def test_pragma_name_and_schema_fold_like_sqlite(tmp_path) -> None:
    path = str(tmp_path / "fold.db")
    conn = _raw_connect(path)
    try:
        assert conn.execute("PrAgMa MaIn.JoUrNaL_mOdE = 'W'").fetchone()[0] == "wal"
        assert requests_of("PrAgMa MaIn.JoUrNaL_mOdE = 'W'") == [("MaIn", "wal")]
    finally:
        conn.close()
    with open(path, "rb") as f:
        assert f.read(20)[18:20] == b"\x02\x02"


# --------------------------------------------------------------------------------------------
# The memo cache


def test_cache_is_bounded_for_unique_sql() -> None:
    for i in range(sqlscan.CACHE_MAX_ENTRIES * 3):
        assert scan(f"SELECT * FROM t WHERE id = {i}") is None
        assert sqlscan.cache_size() <= sqlscan.CACHE_MAX_ENTRIES
    plan = scan("PRAGMA journal_mode=wal")
    assert plan is not None and plan.requests[0].mode == "wal"
    assert scan("PRAGMA journal_mode=wal") is plan  # cached: the same object


def test_cache_skips_long_sql_that_cost_nothing_to_scan() -> None:
    # Long text without a place a request could be is rescanned (as cheap as hashing it);
    # long text that needed the exact scan is kept, bounded by characters (see
    # tests/test_hardening_scripts.py for the size bound).
    long_sql = ("SELECT * FROM journal_mode_log WHERE x = '"
                + "x" * sqlscan.CACHE_MAX_SQL_LENGTH + "'")
    before = sqlscan.cache_size()
    assert scan(long_sql) is None
    assert sqlscan.cache_size() == before
    assert long_sql not in sqlscan._CACHE
    long_request = "PRAGMA journal_mode=wal; SELECT '" + "x" * sqlscan.CACHE_MAX_SQL_LENGTH + "'"
    plan = scan(long_request)
    assert plan is not None and [r.mode for r in plan.requests] == ["wal"]
    assert not plan.only_journal_pragmas
    assert sqlscan._CACHE[long_request] is plan


@pytest.mark.parametrize("sql", [None, 42, b"PRAGMA journal_mode=wal", ["PRAGMA"], {"a": 1},
                                 bytearray(b"x"), object()])
def test_non_str_input_returns_none(sql: Any) -> None:
    assert scan(sql) is None


def test_hash_that_raises_returns_none() -> None:
    class Odd:
        def __hash__(self) -> int:
            raise RuntimeError("no hash")

    assert scan(Odd()) is None


def test_str_subclass_is_scanned() -> None:
    class S(str):
        pass

    plan = scan(S("PRAGMA journal_mode=truncate"))
    assert plan is not None and plan.requests[0].mode == "truncate"


# --------------------------------------------------------------------------------------------
# The oracle: generated scripts


_GAPS = ["", " ", " ", "  ", "\n", "\t", "\r\n", "\f", " \v ", "\ufeff", "-- c\n",
         "--;PRAGMA journal_mode=delete\n", "/* c */", "/**/", "/* ; PRAGMA journal_mode=off */"]
_JUNK = ["junk", "x", "1", "'s'", "(", ")", ".", "=", ";", ",", "+", "-", "!", "\\", "@",
         "?", ":a", "$b", "x'0'", "x'00'", "0x", "1e", "1_0", "select", "on", "delete",
         "default", "\v", "\x7f", "[", "'", '"', "`", "/*", "/", "*", "->", "||", "\0",
         "\ud800", "PRAGMA", "EXPLAIN", "end", "ſ", "\u212a"]
# The scanner checks the grammar of PRAGMA (and EXPLAIN PRAGMA) statements only: a statement
# that starts with another command word (SELECT, DELETE, END, ...) is taken to be valid, so a
# junk statement never starts with one (nor does EXPLAIN start one, as EXPLAIN SELECT junk).
_JUNK_FIRST = [j for j in _JUNK if j.lower() not in ("select", "delete", "end", "explain")]
_SCHEMAS = ["main", "temp", "aux", "MAIN", "Temp", "aUx"]
_NAMES = ["journal_mode"] * 6 + ["journal_size_limit", "cache_size", "journal_mod",
                                 "journal_modes", "user_version", "journal_m\u03bfde"]
_WORDS = ["wal", "delete", "truncate", "persist", "memory", "off", "wall", "bogus", "x",
          "walx", "of", "on", "default", "select", "null", "key", "left", "temp", "end",
          "window", "over", "filter", "o\ufb00", "per\u017fist", "w\u0430l", "de\u0130ete",
          "\u212a", "w$", "wal1", "_w", "begin"]
_NUMBERS = ["0", "1", "1.5", ".5", "1.", "1e3", "1E+3", "0x10", "0X1f", "1abc", "0x", "1e",
            "99999999999999999999"]
_OTHER_STATEMENTS = [
    "SELECT 1", "select 'PRAGMA journal_mode=delete'", "SELECT journal_mode FROM t",
    "SELECT 1 AS journal_mode", "SELECT \"journal_mode\" FROM t", "SELECT 1 AS [a;b]",
    "SELECT 'a;b', x'00ff', 1.5e3, .5, 0x1F", "SELECT $x(;) AS journal_mode",
    "SELECT '{}' -> '$'", "CREATE TEMP TABLE IF NOT EXISTS t2(journal_mode TEXT DEFAULT 'wal')",
    "EXPLAIN PRAGMA journal_mode=delete", "EXPLAIN QUERY PLAN PRAGMA main.journal_mode=wal",
    "explain select 1", "PRAGMA cache_size=10", "PRAGMA journal_size_limit=100",
    "PRAGMA user_version", "PRAGMA main.journal_mode", "WITH x AS (SELECT 1) SELECT * FROM x",
    "VALUES(1)",
    "CREATE TEMP TRIGGER IF NOT EXISTS tr1 AFTER INSERT ON t BEGIN "
    "SELECT 'PRAGMA journal_mode=delete;'; UPDATE t SET journal_mode = 'wal';"
    " REPLACE INTO t VALUES(1, 2); WITH y AS (SELECT 1) SELECT * FROM y; VALUES(2);"
    " DELETE FROM t WHERE x = CASE WHEN 1 THEN 2 END; END",
    "CREATE TEMPORARY TRIGGER IF NOT EXISTS tr2 BEFORE DELETE ON t WHEN old.journal_mode = "
    "'x' BEGIN DELETE FROM t; END",
]

# Strategies are built once: building them inside every draw dominated the run time.
_MASK = st.integers(min_value=0, max_value=(1 << 20) - 1)
_GAP = st.lists(st.sampled_from(_GAPS), max_size=2).map("".join)
_TOKEN_GAP = st.sampled_from([" "] * 14 + ["\n", "\t", "  ", ""])
_STYLE = st.sampled_from(["bare", "bare", "sq", "dq", "br", "bq"])
_VALUE_KIND = st.sampled_from(["mode", "mode", "prefix", "word", "number", "signed", "empty"])
_MODE = st.sampled_from(sqlscan.JOURNAL_MODES)
_CUT = st.integers(min_value=1, max_value=8)
_WORD_ST = st.sampled_from(_WORDS)
_NUMBER_ST = st.sampled_from(_NUMBERS)
_SIGN = st.sampled_from(["-", "+", "- ", "+ "])
_EMPTY = st.sampled_from(["''", '""', "[]", "``"])
_SCHEMA_ST = st.sampled_from(_SCHEMAS)
_NAME_ST = st.sampled_from(_NAMES)
_FORM = st.sampled_from(["none", "eq", "eqeq", "paren", "paren", "eq"])
_TWENTIETH = st.integers(min_value=0, max_value=19)
_INDEX = st.integers(min_value=0, max_value=12)
_JUNK_ST = st.sampled_from(_JUNK)
_JUNK_FIRST_ST = st.sampled_from(_JUNK_FIRST)
_JUNK_MORE = st.lists(_JUNK_ST, max_size=2)
_OTHER_ST = st.sampled_from(_OTHER_STATEMENTS)
_SEPS = st.sampled_from([";", ";", ";;", "; ;", ";\n"])
_SEPS_OR_NONE = st.sampled_from([";", ";", ";;", "; ;", ";\n", ""])
_ENDING = st.sampled_from(["", ";", "; ", ";-- end", "-- end", "; /* x */", "\n"])


def _randcase(draw: Any, word: str) -> str:
    mask = draw(_MASK)
    return "".join(c.upper() if mask >> (k % 20) & 1 else c.lower() for k, c in enumerate(word))


def _quoted(draw: Any, word: str) -> str:
    style = draw(_STYLE)
    if style == "sq":
        return "'" + word.replace("'", "''") + "'"
    if style == "dq":
        return '"' + word.replace('"', '""') + '"'
    if style == "br":
        return "[" + word + "]"
    if style == "bq":
        return "`" + word.replace("`", "``") + "`"
    return word


def _value(draw: Any) -> str:
    kind = draw(_VALUE_KIND)
    if kind == "mode":
        return _quoted(draw, _randcase(draw, draw(_MODE)))
    if kind == "prefix":
        mode = draw(_MODE)
        return _quoted(draw, _randcase(draw, mode[: 1 + draw(_CUT) % len(mode)]))
    if kind == "word":
        return _quoted(draw, _randcase(draw, draw(_WORD_ST)))
    if kind == "number":
        return draw(_NUMBER_ST)
    if kind == "signed":
        return draw(_SIGN) + draw(_NUMBER_ST)
    return draw(_EMPTY)


def _pragma(draw: Any) -> str:
    tokens = [_randcase(draw, "pragma")]
    if draw(st.booleans()):
        tokens += [_quoted(draw, _randcase(draw, draw(_SCHEMA_ST))), "."]
    tokens.append(_quoted(draw, _randcase(draw, draw(_NAME_ST))))
    form = draw(_FORM)
    if form in ("eq", "eqeq"):
        tokens += ["=" if form == "eq" else "==", _value(draw)]
    elif form == "paren":
        tokens += ["(", _value(draw), ")"]
    if draw(_TWENTIETH) == 0:  # a junk token somewhere
        where = draw(_INDEX) % (len(tokens) + 1)
        tokens.insert(where, draw(_JUNK_ST if where else _JUNK_FIRST_ST))
    if draw(_TWENTIETH) == 0:  # a token dropped
        del tokens[draw(_INDEX) % len(tokens)]
    out = draw(_GAP)
    for tok in tokens:
        out += tok + draw(_TOKEN_GAP) + draw(_GAP)
    return out


def _statement(draw: Any) -> Tuple[bool, str]:
    """(the scanner checks its grammar, its text)"""
    kind = draw(_TWENTIETH)
    if kind < 14:
        return True, _pragma(draw)
    if kind < 19:
        return False, draw(_GAP) + draw(_OTHER_ST) + draw(_GAP)
    return True, draw(_GAP) + " ".join([draw(_JUNK_FIRST_ST)] + draw(_JUNK_MORE))


@st.composite
def scripts(draw: Any) -> str:
    count = 1 + draw(_INDEX) % 4
    out = ""
    for i in range(count):
        checked, part = _statement(draw)
        out += part
        if i < count - 1:
            # A missing ';' only after a statement whose grammar the scanner checks.
            out += draw(_SEPS_OR_NONE if checked else _SEPS)
    return out + draw(_ENDING)


_ORACLE = settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_ORACLE
@given(scripts())
@example("PRAGMA journal_mode=wal /*")
@example("PRAGMA \ufeffjournal_mode=wal")
@example("PRAGMA journal_mode=wal; junk; PRAGMA journal_mode=delete")
@example("SELECT 1;; ; PRAGMA journal_mode=wal;")
@example("PRAGMA journal_mode=wal; \v PRAGMA journal_mode=delete")
@example("PRAGMA journal_mode='abc''; PRAGMA journal_mode=delete")
def test_oracle_scripts(sql: str) -> None:
    assert_agrees(sql, judge_unknown_schema=False)


# Character soup for the tokenizer: no letters that could spell a command word (a statement
# that starts with one is taken to be valid), but every character class SQLite's tokenizer has.
_SOUP_CHARS = list(" \t\n\v\f\r\ufeff'\"`[]()-/*;=.+019xXeEa_$@:?#!|<>,&~%\\^{}\x7f\u00e9"
                   "\u212a\u0130")
_CHAR_SOUP = st.text(st.sampled_from(_SOUP_CHARS), max_size=10)
_TEMPLATES = [
    "{0}PRAGMA journal_mode=wal",
    "PRAGMA journal_mode={0};PRAGMA journal_mode=delete",
    "PRAGMA journal_mode=wal{0}PRAGMA aux.journal_mode=delete{1}",
    "PRAGMA {0}journal_mode{1}=wal",
    "PRAGMA journal_mode=w{0}",
    "PRAGMA journal_mode=wal;{0}",
]


@settings(_ORACLE, max_examples=1500)
@given(st.sampled_from(_TEMPLATES), _CHAR_SOUP, _CHAR_SOUP)
def test_oracle_character_soup(template: str, a: str, b: str) -> None:
    assert_agrees(template.format(a, b), judge_unknown_schema=False)


@settings(_ORACLE, max_examples=1000)
@given(st.lists(st.sampled_from(
    ["PRAGMA", "pragma", "journal_mode", "JOURNAL_MODE", "main", "temp", "aux", ".", "=",
     "==", "(", ")", ";", "wal", "'w'", '"d"', "[t]", "''", "-", "+", "1", "on", "select",
     "delete", "explain", " ", " ", " ", "\n", "--c\n", "/*c*/", "'", "x'0'", "$a", "\ufeff",
     "\v", "/*"]), min_size=1, max_size=14).map("".join))
def test_oracle_token_soup(sql: str) -> None:
    assert_agrees(sql, judge_unknown_schema=False)
