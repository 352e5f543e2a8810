"""walpatch stacked with another wrapper of ``sqlite3.connect``: the real
opentelemetry-instrumentation-sqlite3 from PyPI (``SQLite3Instrumentor``), in either order.

Every scenario runs in a fresh interpreter (patches must not leak between scenarios), with an
in-memory span exporter from opentelemetry-sdk, through four phases, each on its own WAL file
made by another process:

1. ``both``: both installed (walpatch first, or OpenTelemetry first). OpenTelemetry records a
   span per cursor statement, and the refused downgrade's span carries the
   ``WalDowngradeRefused`` exception; walpatch refuses the downgrade through the traced cursor
   and through ``conn.execute``; rows written through the stack are there.
2. ``after``: one of them uninstalled (``SQLite3Instrumentor().uninstrument()`` or
   ``walpatch.uninstall()``). The other must be intact: walpatch still refuses, or
   OpenTelemetry still records spans (and, walpatch gone, the downgrade really happens:
   header 1/1).
3. ``again``: the uninstalled one installed again: both work again.
4. ``none``: both uninstalled: connections are plain ``sqlite3.Connection`` again, no spans.

Skipped only when the packages are missing (it says so; ``WALPATCH_REQUIRE_FRAMEWORKS=1``
makes that a failure). pip install opentelemetry-instrumentation-sqlite3 opentelemetry-sdk
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Dict

import pytest

from .dbutil import header, last_json, make_db, run_py

WAL, ROLLBACK = (2, 2), (1, 1)
PHASES = ("both", "after", "again", "none")

CHILD = r'''
import json, sqlite3, sys
from sqlite3 import dbapi2
import walpatch
from walpatch.connection import is_guarded
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.instrumentation.sqlite3 import SQLite3Instrumentor

order, removed = sys.argv[1], sys.argv[2]
dbs = dict(zip(("both", "after", "again", "none"), sys.argv[3:7]))
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
RESULT = {"phases": {}}

def otel_on():
    SQLite3Instrumentor().instrument(tracer_provider=provider)

def otel_off():
    SQLite3Instrumentor().uninstrument()

def walpatch_on():
    assert walpatch.install(retry_initial_delay=0.01, retry_total_timeout=0.5)

def walpatch_off():
    walpatch.uninstall()

def chain_of(func):
    """The wrappers around a connect function, outermost first, by the wrapper's module."""
    out = []
    while hasattr(func, "__wrapped__"):
        wrapper = getattr(func, "_self_wrapper", None)
        out.append(getattr(wrapper, "__module__", type(func).__name__))
        func = func.__wrapped__
    out.append(getattr(func, "__module__", None) or "?")
    return out

def attempt(fn):
    try:
        return {"outcome": "passed", "value": fn()}
    except Exception as exc:
        return {"outcome": "raised", "type": type(exc).__name__,
                "refused": isinstance(exc, walpatch.WalDowngradeRefused),
                "message": str(exc)[:300]}

def phase(name):
    exporter.clear()
    db = dbs[name]
    conn = sqlite3.connect(db)
    raw = getattr(conn, "__wrapped__", conn)
    info = {
        "connect": chain_of(sqlite3.connect),
        "dbapi2_connect": chain_of(dbapi2.connect),
        "walpatch_installed": walpatch.is_installed(),
        "proxy": type(conn).__name__,
        "guarded": is_guarded(raw),
        "plain": type(raw) is sqlite3.Connection,
    }
    cur = conn.cursor()
    cur.execute("INSERT INTO t VALUES (?)", (100,))
    conn.commit()
    cur.execute("SELECT count(*) FROM t")
    info["count"] = cur.fetchone()[0]
    info["cursor_downgrade"] = attempt(
        lambda: cur.execute("PRAGMA journal_mode=DELETE").fetchone()[0])
    if info["cursor_downgrade"]["outcome"] == "raised":
        info["conn_downgrade"] = attempt(
            lambda: conn.execute("PRAGMA journal_mode=TRUNCATE").fetchone()[0])
    cur.close()
    conn.close()
    spans = []
    for span in exporter.get_finished_spans():
        exc = [e.attributes.get("exception.type") for e in span.events if e.name == "exception"]
        spans.append({"name": span.name, "status": span.status.status_code.name,
                      "statement": span.attributes.get("db.statement")
                      or span.attributes.get("db.query.text"),
                      "exception": exc[0] if exc else None})
    info["spans"] = spans
    RESULT["phases"][name] = info

on = {"otel": otel_on, "walpatch": walpatch_on}
off = {"otel": otel_off, "walpatch": walpatch_off}
first, second = ("walpatch", "otel") if order == "walpatch-first" else ("otel", "walpatch")
kept = "walpatch" if removed == "otel" else "otel"

on[first](); on[second](); phase("both")
off[removed](); phase("after")
on[removed](); phase("again")
off[removed](); off[kept](); phase("none")
print(json.dumps(RESULT))
'''


def _need() -> None:
    missing = [m for m in ("opentelemetry.instrumentation.sqlite3",
                           "opentelemetry.sdk.trace.export.in_memory_span_exporter")
               if _missing(m)]
    if not missing:
        return
    msg = (f"NOT TESTED: {', '.join(missing)} not installed in {sys.executable} (pip install "
           "opentelemetry-instrumentation-sqlite3 opentelemetry-sdk): stacking with "
           "OpenTelemetry was NOT checked")
    print(msg, file=sys.stderr)
    if os.environ.get("WALPATCH_REQUIRE_FRAMEWORKS", "").strip().lower() in (
            "1", "true", "yes", "on"):
        pytest.fail(msg + " (WALPATCH_REQUIRE_FRAMEWORKS=1)")
    pytest.skip(msg)


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


def run_scenario(tmp_path: Any, order: str, removed: str) -> Dict[str, Any]:
    dbs = [tmp_path / f"{p}.db" for p in PHASES]
    for db in dbs:
        make_db(db, "wal", rows=3)
    proc = run_py(CHILD, order, removed, *map(str, dbs), timeout=60)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    result = last_json(proc.stdout)["phases"]
    result["_headers"] = {p: header(db) for p, db in zip(PHASES, dbs)}
    result["_dbs"] = {p: str(db) for p, db in zip(PHASES, dbs)}
    return result


def assert_walpatch_guards(info: Dict[str, Any], db: str) -> None:
    assert info["walpatch_installed"] is True and info["guarded"] is True, info
    for key in ("cursor_downgrade", "conn_downgrade"):
        outcome = info[key]
        assert outcome["outcome"] == "raised" and outcome["refused"], (key, info)
        assert outcome["type"] == "WalDowngradeRefused"
        assert "walpatch refused PRAGMA main.journal_mode=" in outcome["message"]
        assert db in outcome["message"]


def assert_otel_traces(info: Dict[str, Any], walpatch_active: bool) -> None:
    assert info["proxy"] == "TracedConnectionProxy", info
    names = [s["name"] for s in info["spans"]]
    assert names == ["INSERT", "SELECT", "PRAGMA"], info["spans"]
    pragma = info["spans"][2]
    assert pragma["statement"] == "PRAGMA journal_mode=DELETE"
    if walpatch_active:  # the refusal is recorded on the statement's span
        assert pragma["status"] == "ERROR", pragma
        assert pragma["exception"] and pragma["exception"].endswith("WalDowngradeRefused")
    else:
        assert pragma["status"] != "ERROR" and pragma["exception"] is None, pragma


def assert_no_otel(info: Dict[str, Any]) -> None:
    assert info["proxy"] != "TracedConnectionProxy" and info["spans"] == [], info
    assert "opentelemetry.instrumentation.dbapi" not in info["connect"], info["connect"]


@pytest.mark.parametrize("removed", ["otel", "walpatch"])
@pytest.mark.parametrize("order", ["walpatch-first", "otel-first"])
def test_walpatch_stacked_with_opentelemetry(tmp_path, order, removed):
    _need()
    got = run_scenario(tmp_path, order, removed)
    headers, dbs = got["_headers"], got["_dbs"]

    # 1. both installed: both work, in either order
    both = got["both"]
    for chain in (both["connect"], both["dbapi2_connect"]):
        layers = [m for m in chain
                  if m in ("walpatch.hooks", "opentelemetry.instrumentation.dbapi")]
        # walpatch always sits innermost, beneath any wrapt wrapper already there: tools that
        # uninstrument with `connect = connect.__wrapped__` then remove themselves, not it.
        # (dbapi2.connect is wrapped by walpatch only, whatever the order.)
        if "opentelemetry.instrumentation.dbapi" in layers:
            assert layers == ["opentelemetry.instrumentation.dbapi", "walpatch.hooks"], chain
        else:
            assert layers == ["walpatch.hooks"], chain
    assert_walpatch_guards(both, dbs["both"])
    assert_otel_traces(both, walpatch_active=True)
    assert both["count"] == 4
    assert headers["both"] == WAL

    # 2. one uninstalled: the other is intact
    after = got["after"]
    if removed == "otel":
        assert_no_otel(after)
        assert_walpatch_guards(after, dbs["after"])
        assert headers["after"] == WAL
    else:
        assert after["walpatch_installed"] is False and after["guarded"] is False, after
        assert_otel_traces(after, walpatch_active=False)
        assert after["cursor_downgrade"] == {"outcome": "passed", "value": "delete"}
        assert headers["after"] == ROLLBACK  # walpatch really is out of the way
    assert after["count"] == 4

    # 3. installed again: both work again
    again = got["again"]
    assert_walpatch_guards(again, dbs["again"])
    assert_otel_traces(again, walpatch_active=True)
    assert headers["again"] == WAL

    # 4. both uninstalled: sqlite3 behaves as if neither had been there
    none = got["none"]
    assert none["walpatch_installed"] is False and none["guarded"] is False, none
    assert none["plain"] is True, none
    assert_no_otel(none)
    assert none["cursor_downgrade"] == {"outcome": "passed", "value": "delete"}
    assert headers["none"] == ROLLBACK
    print(f"{order}, then uninstall {removed}: connect chains "
          + "; ".join(f"{p}={got[p]['connect']}" for p in PHASES))
