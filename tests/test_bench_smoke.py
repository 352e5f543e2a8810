"""The overhead benchmark runs and reports well-formed results; walpatch's caches stay bounded.

* ``benchmarks/overhead.py --quick`` in a real subprocess: every variant (unpatched, walpatch,
  and the opentelemetry no-op peer when that package is installed) gives a finite time and
  ratio for every workload, the same answers as unpatched sqlite3, and a memory section.
  Timing budgets are deliberately NOT asserted here: speed is never a timed unit test
  (docs/benchmarks.md holds the measured figures).
* The statement-scan cache stays bounded when every SQL string is unique (f-string SQL).
* 2,000 connect/close cycles under walpatch leave the guarded-class caches, the descriptor
  and history tables, the open descriptors and the traced Python memory where they were.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import sqlite3
import subprocess
import sys
import tracemalloc
import warnings

import pytest

import walpatch
from walpatch import connection as wconnection
from walpatch import events, ondisk, runtime, sqlscan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks", "overhead.py")


def _load_bench():
    spec = importlib.util.spec_from_file_location("walpatch_bench_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _otel_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.instrumentation.sqlite3") is not None
    except ImportError:
        return False


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_benchmark_gives_well_formed_results_for_every_variant(tmp_path):
    bench = _load_bench()
    out_json = tmp_path / "out.json"
    out_md = tmp_path / "out.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    proc = subprocess.run(
        [sys.executable, BENCH, "--quick", "--json", str(out_json), "--markdown", str(out_md)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=55,
        cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())

    expected = ["unpatched", "walpatch"]
    if _otel_installed():
        expected.append("otel")
    else:
        # Only this variant may be missing, and the run must say why.
        print("otel variant not measured: opentelemetry-instrumentation-sqlite3 is not "
              "installed (pip install opentelemetry-instrumentation-sqlite3)")
        assert "otel" in report["skipped_variants"]
        assert "pip install opentelemetry-instrumentation-sqlite3" in \
            report["skipped_variants"]["otel"]
        assert "variant otel skipped" in proc.stderr
    assert report["variants_run"] == expected
    assert report["quick"] is True
    rounds = report["rounds"]
    assert rounds >= 2

    # Each variant is what it claims to be (checked inside its own child).
    assert report["verified"]["walpatch"] == [
        v for v in report["verified"]["walpatch"] if "guarded=True" in v]
    assert "walpatch imported: False" in report["verified"]["unpatched"][0]
    if "otel" in expected:
        assert "TracedConnectionProxy" in report["verified"]["otel"][0]

    assert set(report["workloads"]) == set(bench.WORKLOADS)
    for name, entry in report["workloads"].items():
        assert entry["description"] and entry["ops_per_run"] >= 1
        for variant in expected:
            rec = entry["variants"][variant]
            if "not_run" in rec:
                assert (name, variant) in bench.NOT_RUN, (name, variant)
                continue
            assert _finite_positive(rec["ns_per_op_median"]), (name, variant, rec)
            assert _finite_positive(rec["ratio_median"]), (name, variant, rec)
            assert rec["ratio_min"] <= rec["ratio_median"] <= rec["ratio_max"]
            assert len(rec["ratio_rounds"]) == rounds == len(rec["results"])
            assert all(_finite_positive(x) for x in rec["ns_per_op_rounds"])
            assert math.isfinite(rec["added_ns_per_op_median"])
            if variant == "unpatched":
                assert rec["ratio_rounds"] == [1.0] * rounds
        if name in bench.BUDGETS:
            assert entry["budget"] == bench.BUDGETS[name]
            assert isinstance(entry["budget_met"], bool)  # reported, never asserted here
    # Same answers (rows, counts, modes) with and without instrumentation.
    assert report["parity_problems"] == []
    assert report["workloads"]["jm_downgrade_refused"]["variants"]["walpatch"]["results"] == [
        bench.SIZES["jm_downgrade_refused"][1]] * rounds
    assert report["workloads"]["jm_wal_on_wal_file"]["variants"]["walpatch"]["results"] == [
        "wal"] * rounds

    mem = report["memory"]
    assert set(mem) == set(expected)
    for rec in mem.values():
        for label in ("connect_close", "connect_wal_close"):
            series = rec[label]["rss_kib_series"]
            assert len(series) >= 2 and all(isinstance(x, int) and x > 0 for x in series)
            assert rec[label]["rss_growth_kib"] == series[-1] - series[0]
        assert rec["unique_sql"]["statements"] > 0
    wp = mem["walpatch"]
    assert wp["unique_sql"]["scan_cache_bounded"] is True
    assert 0 < wp["unique_sql"]["scan_cache_max"] <= sqlscan.CACHE_MAX_ENTRIES
    assert wp["connect_close"]["guarded_classes_before"] == \
        wp["connect_close"]["guarded_classes_after"]

    md = out_md.read_text()
    assert "| workload | unpatched | walpatch |" in md
    assert "Python " + report["machine"]["python"] in md
    for name in bench.WORKLOADS:
        assert f"`{name}`" in md
    assert md.strip() == proc.stdout[proc.stdout.index("Command: "):].strip()


@pytest.fixture
def installed():
    was_installed = walpatch.is_installed()
    assert walpatch.install()
    yield
    if not was_installed:
        walpatch.uninstall()


def test_scan_cache_stays_bounded_with_50k_unique_sql_strings(installed):
    conn = sqlite3.connect(":memory:")
    assert wconnection.is_guarded(conn)
    limit = sqlscan.CACHE_MAX_ENTRIES
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        largest = 0
        for i in range(50_000):
            row = conn.execute(f"SELECT {i} AS v WHERE {i} >= 0").fetchone()
            size = sqlscan.cache_size()
            assert size <= limit, f"scan cache holds {size} entries after {i + 1} statements"
            largest = max(largest, size)
        assert row == (49_999,)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The cache was really in use (filled up to its limit, then cleared), and bounded.
    assert largest >= limit - 1
    # An unbounded cache of these 50k strings would hold several MiB.
    assert growth < 1024 * 1024, f"traced memory grew by {growth} bytes"

    # Statements longer than the key limit are scanned but never stored.
    long_max = getattr(sqlscan, "CACHE_MAX_SQL_LENGTH", None)
    if long_max is not None:
        size = sqlscan.cache_size()
        pad = " " * long_max
        for i in range(200):
            conn.execute(f"SELECT {i}{pad}").fetchone()
        assert sqlscan.cache_size() <= size
    # A journal-mode request is still recognised after all that churn.
    assert sqlscan.scan("PRAGMA journal_mode=DELETE") is not None
    conn.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _live_guarded_connections() -> int:
    return sum(1 for o in gc.get_objects()
               if isinstance(o, sqlite3.Connection) and wconnection.is_guarded(o))


class _AppConnection(sqlite3.Connection):
    """An application's own connection class, passed as factory= (guarded once, cached)."""


def _cache_sizes():
    return {
        "connection_classes": len(wconnection._connection_classes),
        "cursor_classes": len(getattr(wconnection, "_cursor_classes", {})),
        "cursor_guards": len(getattr(wconnection, "_cursor_guards", {})),
        "kits": len(getattr(wconnection, "_kits", {})),
        "kept_descriptors": ondisk.kept_descriptor_count(),
        "descriptor_table": len(getattr(ondisk, "_fd_by_inode", {})),
        "history": len(getattr(runtime, "_history", {})),
    }


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_2000_connect_close_cycles_do_not_grow_caches_or_leak(installed, tmp_path):
    path = str(tmp_path / "cycles.db")
    setup = sqlite3.connect(path)
    assert setup.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    setup.execute("CREATE TABLE t(x)")
    setup.execute("INSERT INTO t VALUES (1)")
    setup.commit()
    setup.close()

    def cycle(i: int) -> None:
        # The four ways code opens a connection: default, factory= keyword and positional,
        # and the dbapi2 module; each one also asks for WAL, the legacy per-connection habit.
        if i % 4 == 0:
            conn = sqlite3.connect(path)
        elif i % 4 == 1:
            conn = sqlite3.connect(path, factory=_AppConnection)
        elif i % 4 == 2:
            if sys.version_info >= (3, 15):  # keyword-only from 3.15
                conn = sqlite3.connect(path, timeout=5.0, detect_types=0, isolation_level="",
                                       check_same_thread=True, factory=_AppConnection)
            else:
                with warnings.catch_warnings():  # 3.13 deprecates positional connect arguments
                    warnings.simplefilter("ignore", DeprecationWarning)
                    conn = sqlite3.connect(path, 5.0, 0, "", True, _AppConnection)
        else:
            conn = sqlite3.dbapi2.connect(path)
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
        assert conn.cursor().execute("SELECT count(*) FROM t").fetchone() == (1,)
        conn.close()

    for i in range(200):  # warm-up: every class and table entry is made here
        cycle(i)
    gc.collect()
    caches = _cache_sizes()
    fds = _open_fds()
    live = _live_guarded_connections()
    counted = events.snapshot()["connections"]
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(2_000):
            cycle(i)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert events.snapshot()["connections"] - counted == 2_000  # all of them were guarded
    assert _cache_sizes() == caches
    assert _open_fds() == fds, "descriptors leaked"
    assert _live_guarded_connections() == live
    # A leaked connection, cursor or closure per cycle would be hundreds of KiB by now.
    assert growth < 64 * 1024, f"traced memory grew by {growth} bytes over 2,000 cycles"
    # The file is still in WAL on disk: header bytes 18/19 = 2/2, read by another process
    # (this one is protected: it never opens and closes a database file itself).
    header = subprocess.run(
        [sys.executable, "-c", "import sys; d = open(sys.argv[1], 'rb').read(100); "
         "print(d[:16] == b'SQLite format 3\\x00', d[18], d[19])", path],
        stdout=subprocess.PIPE, universal_newlines=True, check=True, timeout=30).stdout.split()
    assert header == ["True", "2", "2"]
