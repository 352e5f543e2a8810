#!/usr/bin/env python
"""walpatch overhead benchmark: unpatched sqlite3 vs walpatch vs a proxy-based peer.

    python benchmarks/overhead.py [--quick] [--rounds N] [--json out.json] [--markdown out.md]

Variants (each run in a fresh subprocess, so no patch leaks from one into another):

* ``unpatched``  plain ``sqlite3``; WALPATCH*/OTEL* variables are removed from its environment
                 and the child checks that ``sqlite3.connect`` is not wrapped;
* ``walpatch``   ``walpatch.install()`` with default settings (enforce mode);
* ``otel``       ``opentelemetry-instrumentation-sqlite3`` with ``NoOpTracerProvider``: the
                 ``wrapt.ObjectProxy``-based peer (skipped, with the reason printed, when the
                 package is not installed);
* ``walpatch-python`` (opt-in: ``--variants unpatched,walpatch,walpatch-python``) walpatch with
                 ``WALPATCH_DISABLE_EXTENSIONS=1``: the pure-Python hot path, for the table
                 beside the C one (``walpatch`` uses walpatch._speedups when it is built; each
                 child checks which one it got);
* ``unpatched-aa`` (full runs; ``--control``/``--no-control``) a second unpatched run, the A/A
                 control: its ratio to ``unpatched`` is the noise floor of this machine.

Each round runs every workload once per variant, the variants of a workload back to back in
an order that rotates from round to round. Inside a child a workload is set up untimed, run
once to warm up, then timed ``--repeat`` times (gc disabled while timed, as timeit does); the
child reports its fastest repetition. The figure for a variant is the median over rounds of
the per-round ratio ``variant / unpatched`` (and, for per-call loops, the median of the
per-round difference in ns per call). A separate set of children measures memory: the
statement-scan cache under unique (f-string) SQL, and resident memory (VmRSS) across many
connect/close cycles.

The budgets (issue 6) are printed next to the walpatch figures; a missed budget is reported,
not turned into a failing exit code unless ``--check-budgets`` is given. Speed is never a unit
test: tests/test_bench_smoke.py only checks that ``--quick`` produces well-formed results.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MARK = "@@walpatch-bench@@ "

VARIANTS = ("unpatched", "walpatch", "otel")
CONTROL = "unpatched-aa"
OTEL_MODULE = "opentelemetry.instrumentation.sqlite3"
OTEL_INSTALL = "pip install opentelemetry-instrumentation-sqlite3"

#: issue 14 budgets (with walpatch._speedups; issue 6's were 1.15/1.15/1.02/1.02/1.10):
#: walpatch / unpatched, median of per-round ratios, CPython 3.11
BUDGETS: Dict[str, float] = {
    "tight_conn_execute": 1.05,
    "tight_cursor_execute": 1.05,
    "realistic_wal": 1.01,
    "executemany_100k": 1.01,
    "connect_close": 1.05,
}
PURE_PYTHON = "walpatch-python"  # variant: walpatch with WALPATCH_DISABLE_EXTENSIONS=1

# Sizes per workload: (full, quick). "ops" is what a per-op figure is divided by.
SIZES: Dict[str, Tuple[int, int]] = {
    "tight_conn_execute": (200_000, 3_000),
    "tight_cursor_execute": (200_000, 3_000),
    "unique_sql": (50_000, 1_000),
    "realistic_wal": (400, 10),  # transactions of 10 inserts, 10 indexed selects, 5 updates
    "executemany_100k": (100_000, 3_000),
    "iterate_200k": (200_000, 5_000),
    "connect_close": (2_000, 50),
    "connect_wal_close": (1_000, 30),
    "jm_wal_on_wal_file": (2_000, 50),
    "jm_wal_on_memory": (5_000, 100),
    "jm_delete_on_rollback_file": (2_000, 50),
    "jm_downgrade_refused": (2_000, 50),
}

DESCRIPTIONS: Dict[str, str] = {
    "tight_conn_execute": 'conn.execute("SELECT ?", (i,)) on :memory: (per call)',
    "tight_cursor_execute": 'cur.execute("SELECT ?", (i,)) on :memory:, cursor from '
                            "conn.cursor() (per call)",
    "unique_sql": 'conn.execute(f"SELECT {i} AS id, \'user{i}\' AS owner, ...") on :memory:, '
                  "every SQL string unique, ~70 characters (scan-cache miss path; per call)",
    "realistic_wal": "file-backed WAL (synchronous=NORMAL), 10k-row indexed table; per "
                     "transaction: 10 inserts, 10 indexed selects + fetchall, 5 updates, "
                     "commit (per transaction)",
    "executemany_100k": "cur.executemany INSERT of 100k rows into a file-backed WAL table + "
                        "commit (per run)",
    "iterate_200k": "for row in cur.execute(SELECT of 200k rows) (per run)",
    "connect_close": "sqlite3.connect(file).close() on an existing WAL file (per cycle)",
    "connect_wal_close": 'connect(file); execute("PRAGMA journal_mode=WAL"); close() on a WAL '
                         "file (per cycle)",
    "jm_wal_on_wal_file": '"PRAGMA journal_mode=WAL" + fetchall on a file already in WAL: '
                          "walpatch lists databases, runs it, verifies the mode and the "
                          "on-disk header (per request)",
    "jm_wal_on_memory": '"PRAGMA journal_mode=WAL" + fetchall on :memory: (no file, so no '
                        "on-disk check) (per request)",
    "jm_delete_on_rollback_file": '"PRAGMA journal_mode=DELETE" + fetchall on a rollback-'
                                  "journal file: walpatch reads the header, lets it pass "
                                  "(per request)",
    "jm_downgrade_refused": '"PRAGMA journal_mode=DELETE" on a WAL file: walpatch reads the '
                            "header and raises WalDowngradeRefused; unpatched reference is the "
                            'raw no-op "PRAGMA journal_mode=WAL" on the same file (otel: n/a, '
                            "it would downgrade) (per request)",
}

#: workloads whose walpatch result must equal the unpatched one (same rows, same answers)
PARITY_EXEMPT = {"jm_downgrade_refused"}
#: workloads a variant does not run (and why)
NOT_RUN: Dict[Tuple[str, str], str] = {
    ("jm_downgrade_refused", "otel"): "otel does not guard: the request would downgrade the file",
}
WORKLOADS = list(SIZES)

MEMORY_SIZES = {  # (full, quick)
    "connect_close_cycles": (10_000, 300),
    "connect_wal_close_cycles": (10_000, 200),
    "unique_sql_statements": (200_000, 5_000),
}


# ---------------------------------------------------------------------------------------------
# child side: set up one variant, run workloads, print one JSON line
# ---------------------------------------------------------------------------------------------

class Child:
    def __init__(self, variant: str, quick: bool, repeat: int, workdir: str) -> None:
        self.variant = variant
        self.quick = quick
        self.repeat = repeat
        self.workdir = workdir
        self.sqlite3: Any = None
        self.refused_cls: Any = None
        self.verified: List[str] = []
        self.last_wall: List[int] = []

    # -- variant setup and verification --

    def setup_variant(self) -> None:
        base = self.variant.split("-")[0]
        if base == "walpatch":
            import walpatch

            if not walpatch.install():
                raise SystemExit("walpatch.install() returned False")
        elif base == "otel":
            from opentelemetry.instrumentation.sqlite3 import SQLite3Instrumentor
            from opentelemetry.trace import NoOpTracerProvider

            SQLite3Instrumentor().instrument(tracer_provider=NoOpTracerProvider())
        import sqlite3

        self.sqlite3 = sqlite3
        if base == "walpatch":
            # Only after `import sqlite3`: before commit 4d35f0c, touching
            # walpatch.WalDowngradeRefused between install() and the first `import sqlite3`
            # broke the post-import hook (a circular import through walpatch.errors).
            import walpatch

            self.refused_cls = walpatch.WalDowngradeRefused
        conn = sqlite3.connect(":memory:")
        cur = conn.cursor()
        if base == "walpatch":
            from walpatch import connection as wc
            from walpatch import speedups

            ok = wc.is_guarded(conn) and wc.is_guarded(cur)
            if self.variant == PURE_PYTHON:
                ok = ok and speedups.KIND == "python"
            what = (f"connection {type(conn).__module__}.{type(conn).__qualname__} "
                    f"guarded={ok} speedups={speedups.KIND}")
        elif base == "otel":
            import wrapt

            ok = isinstance(conn, wrapt.ObjectProxy) or type(conn).__name__.startswith("Traced")
            ok = ok and type(cur).__name__ == "TracedCursorProxy"
            what = f"connection {type(conn).__name__}, cursor {type(cur).__name__}"
        else:
            ok = type(conn) is sqlite3.Connection and not getattr(
                sqlite3, "_walpatch_patched", False) and "walpatch" not in sys.modules
            what = f"connection {type(conn).__name__}, walpatch imported: " \
                   f"{'walpatch' in sys.modules}"
        conn.close()
        if not ok:
            raise SystemExit(f"variant {self.variant} is not what it claims: {what}")
        self.verified.append(what)

    def connect(self, database: str, **kw: Any) -> Any:
        return self.sqlite3.connect(database, **kw)

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def size(self, workload: str) -> int:
        full, quick = SIZES[workload]
        return quick if self.quick else full

    def measure(self, run: Callable[[], Any], setup: Optional[Callable[[], None]] = None,
                warmup: int = 1) -> Tuple[List[int], Any]:
        """Time ``run`` (after ``setup``, untimed); returns the CPU times, keeps the wall times
        in ``self.last_wall``. CPU time (this process, user + system) is what instrumentation
        adds; unlike wall time it does not count the time the process waited for a core,
        which on a shared machine is most of the noise."""
        times: List[int] = []
        wall: List[int] = []
        result = None
        cpu_clock = time.process_time_ns
        wall_clock = time.perf_counter_ns
        for k in range(warmup + self.repeat):
            if setup is not None:
                setup()
            gc.collect()
            gc.disable()
            try:
                w0 = wall_clock()
                c0 = cpu_clock()
                result = run()
                c1 = cpu_clock()
                w1 = wall_clock()
            finally:
                gc.enable()
            if k >= warmup:
                times.append(c1 - c0)
                wall.append(w1 - w0)
        self.last_wall = wall
        return times, result

    def wal_file(self, name: str, rows: int = 0) -> str:
        path = self.path(name)
        conn = self.connect(path)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        assert mode == "wal", mode
        conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        if rows:
            conn.executemany("INSERT INTO t(v) VALUES (?)", (("x%d" % i,) for i in range(rows)))
        conn.commit()
        conn.close()
        return path

    # -- workloads: each returns (timings in ns, ops per timing, result for parity) --

    def w_tight_conn_execute(self) -> Tuple[List[int], int, Any]:
        n = self.size("tight_conn_execute")
        conn = self.connect(":memory:")

        def run() -> Any:
            for i in range(n):
                conn.execute("SELECT ?", (i,))
            return conn.execute("SELECT ?", (n,)).fetchone()[0]

        times, result = self.measure(run)
        conn.close()
        return times, n, result

    def w_tight_cursor_execute(self) -> Tuple[List[int], int, Any]:
        n = self.size("tight_cursor_execute")
        conn = self.connect(":memory:")
        cur = conn.cursor()

        def run() -> Any:
            for i in range(n):
                cur.execute("SELECT ?", (i,))
            return cur.fetchone()[0]

        times, result = self.measure(run)
        conn.close()
        return times, n, result

    def w_unique_sql(self) -> Tuple[List[int], int, Any]:
        n = self.size("unique_sql")
        conn = self.connect(":memory:")
        counter = [0]

        def run() -> Any:
            base = counter[0]
            counter[0] += n
            last = None
            for i in range(base, base + n):
                last = conn.execute(
                    f"SELECT {i} AS id, 'user{i}' AS owner, {i} * 2 AS twice WHERE {i} >= 0")
            return last.fetchone()[0] - base

        times, result = self.measure(run)
        conn.close()
        return times, n, result

    def w_realistic_wal(self) -> Tuple[List[int], int, Any]:
        n = self.size("realistic_wal")
        path = self.path("realistic.db")
        conn = self.connect(path)
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        conn.execute("PRAGMA synchronous=NORMAL")
        rng = random.Random(6)
        payload = "p" * 100
        state: Dict[str, Any] = {}

        def setup() -> None:
            conn.execute("DROP TABLE IF EXISTS items")
            conn.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, k INTEGER, v TEXT, "
                         "n INTEGER)")
            conn.execute("CREATE INDEX items_k ON items(k)")
            conn.executemany("INSERT INTO items(k, v, n) VALUES (?, ?, 0)",
                             ((i % 5000, payload) for i in range(10_000)))
            conn.commit()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            state["keys"] = [rng.randrange(5000) for _ in range(n * 25)]

        def run() -> Any:
            cur = conn.cursor()
            keys = state["keys"]
            j = 0
            fetched = 0
            for t in range(n):
                for _ in range(10):
                    cur.execute("INSERT INTO items(k, v, n) VALUES (?, ?, ?)",
                                (keys[j], payload, t))
                    j += 1
                for _ in range(10):
                    cur.execute("SELECT id, v, n FROM items WHERE k = ?", (keys[j],))
                    fetched += len(cur.fetchall())
                    j += 1
                for _ in range(5):
                    cur.execute("UPDATE items SET n = n + 1 WHERE k = ?", (keys[j],))
                    j += 1
                conn.commit()
            cur.close()
            return fetched

        rng.seed(6)
        times, _ = self.measure(run, setup)
        total = conn.execute("SELECT count(*), sum(n) FROM items").fetchone()
        conn.close()
        return times, n, list(total)

    def w_executemany_100k(self) -> Tuple[List[int], int, Any]:
        n = self.size("executemany_100k")
        path = self.path("bulk.db")
        conn = self.connect(path)
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        conn.execute("PRAGMA synchronous=NORMAL")
        rows = [(i, "value %d" % i, i * 0.5) for i in range(n)]

        def setup() -> None:
            conn.execute("DROP TABLE IF EXISTS bulk")
            conn.execute("CREATE TABLE bulk(a INTEGER, b TEXT, c REAL)")
            conn.commit()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

        def run() -> Any:
            cur = conn.cursor()
            cur.executemany("INSERT INTO bulk(a, b, c) VALUES (?, ?, ?)", rows)
            conn.commit()
            cur.close()

        times, _ = self.measure(run, setup)
        result = conn.execute("SELECT count(*), sum(a) FROM bulk").fetchone()
        conn.close()
        return times, 1, list(result)

    def w_iterate_200k(self) -> Tuple[List[int], int, Any]:
        n = self.size("iterate_200k")
        path = self.wal_file("iterate.db", rows=n)
        conn = self.connect(path)

        def run() -> Any:
            cur = conn.cursor()
            count = 0
            for _row in cur.execute("SELECT id, v FROM t"):
                count += 1
            cur.close()
            return count

        times, result = self.measure(run)
        conn.close()
        return times, 1, result

    def w_connect_close(self) -> Tuple[List[int], int, Any]:
        n = self.size("connect_close")
        path = self.wal_file("connect.db", rows=10)
        connect = self.sqlite3.connect

        def run() -> Any:
            for _ in range(n):
                connect(path).close()
            return n

        times, result = self.measure(run)
        return times, n, result

    def w_connect_wal_close(self) -> Tuple[List[int], int, Any]:
        n = self.size("connect_wal_close")
        path = self.wal_file("connect_wal.db", rows=10)
        connect = self.sqlite3.connect

        def run() -> Any:
            mode = None
            for _ in range(n):
                c = connect(path)
                mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                c.close()
            return mode

        times, result = self.measure(run)
        return times, n, result

    def _pragma_loop(self, database: str, sql: str, n: int) -> Tuple[List[int], Any]:
        conn = self.connect(database)
        cur = conn.cursor()

        def run() -> Any:
            rows = None
            for _ in range(n):
                rows = cur.execute(sql).fetchall()
            return rows[0][0]

        times, result = self.measure(run)
        conn.close()
        return times, result

    def w_jm_wal_on_wal_file(self) -> Tuple[List[int], int, Any]:
        n = self.size("jm_wal_on_wal_file")
        path = self.wal_file("jm_wal.db", rows=10)
        times, result = self._pragma_loop(path, "PRAGMA journal_mode=WAL", n)
        return times, n, result

    def w_jm_wal_on_memory(self) -> Tuple[List[int], int, Any]:
        n = self.size("jm_wal_on_memory")
        times, result = self._pragma_loop(":memory:", "PRAGMA journal_mode=WAL", n)
        return times, n, result

    def w_jm_delete_on_rollback_file(self) -> Tuple[List[int], int, Any]:
        n = self.size("jm_delete_on_rollback_file")
        path = self.path("jm_rollback.db")
        conn = self.connect(path)
        conn.execute("CREATE TABLE t(x)")
        conn.commit()
        conn.close()
        times, result = self._pragma_loop(path, "PRAGMA journal_mode=DELETE", n)
        return times, n, result

    def w_jm_downgrade_refused(self) -> Tuple[List[int], int, Any]:
        n = self.size("jm_downgrade_refused")
        path = self.wal_file("jm_refused.db", rows=10)
        if self.refused_cls is None:  # the reference: the raw, no-op pragma
            times, result = self._pragma_loop(path, "PRAGMA journal_mode=WAL", n)
            return times, n, result
        conn = self.connect(path)
        cur = conn.cursor()
        refused_cls = self.refused_cls

        def run() -> Any:
            refused = 0
            for _ in range(n):
                try:
                    cur.execute("PRAGMA journal_mode=DELETE")
                except refused_cls:
                    refused += 1
            return refused

        times, result = self.measure(run)
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        conn.close()
        if result != n or mode != "wal":
            raise SystemExit(f"downgrade not refused: {result}/{n} refused, mode now {mode}")
        return times, n, result


def child_main(args: argparse.Namespace) -> int:
    workdir = tempfile.mkdtemp(prefix=f"bench-{args.variant}-", dir=args.tmpdir)
    try:
        child = Child(args.variant, args.quick, args.repeat, workdir)
        child.setup_variant()
        out: Dict[str, Any] = {"variant": args.variant, "pid": os.getpid(),
                               "verified": child.verified, "workloads": {}}
        for name in args.workloads.split(","):
            times, ops, result = getattr(child, "w_" + name)()
            out["workloads"][name] = {
                "cpu_ns": times, "wall_ns": child.last_wall, "best_cpu_ns": min(times),
                "best_wall_ns": min(child.last_wall), "ops": ops, "result": result}
        if args.variant.startswith("walpatch"):
            import walpatch

            out["walpatch_stats"] = walpatch.stats()
        print(MARK + json.dumps(out), flush=True)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- memory child -----------------------------------------------------------------------------

def rss_kib() -> int:
    with open("/proc/self/status") as f:  # not a database file
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def memory_main(args: argparse.Namespace) -> int:
    workdir = tempfile.mkdtemp(prefix=f"mem-{args.variant}-", dir=args.tmpdir)
    try:
        child = Child(args.variant, args.quick, 1, workdir)
        child.setup_variant()
        sqlite3 = child.sqlite3
        q = 1 if args.quick else 0
        out: Dict[str, Any] = {"variant": args.variant, "verified": child.verified}
        walpatch_mod = sys.modules.get("walpatch") if args.variant.startswith("walpatch") \
            else None

        def classes() -> Optional[int]:
            if walpatch_mod is None:
                return None
            from walpatch import connection as wc

            return len(wc._connection_classes) + len(wc._cursor_classes)

        def kept() -> Optional[int]:
            if walpatch_mod is None:
                return None
            from walpatch import ondisk

            return ondisk.kept_descriptor_count()

        def cycles(label: str, total: int, body: Callable[[], None]) -> None:
            warm = max(total // 10, 100)
            for _ in range(warm):
                body()
            gc.collect()
            series = [rss_kib()]
            step = max(total // 5, 1)
            before_classes = classes()
            done = 0
            while done < total:
                for _ in range(min(step, total - done)):
                    body()
                done += min(step, total - done)
                gc.collect()
                series.append(rss_kib())
            out[label] = {
                "cycles": total, "warmup_cycles": warm, "rss_kib_series": series,
                "rss_growth_kib": series[-1] - series[0],
                "guarded_classes_before": before_classes, "guarded_classes_after": classes(),
                "kept_descriptors": kept(),
            }

        path = child.wal_file("mem.db", rows=10)
        cycles("connect_close", MEMORY_SIZES["connect_close_cycles"][q],
               lambda: sqlite3.connect(path).close())

        def wal_cycle() -> None:
            c = sqlite3.connect(path)
            c.execute("PRAGMA journal_mode=WAL").fetchall()
            c.close()

        cycles("connect_wal_close", MEMORY_SIZES["connect_wal_close_cycles"][q], wal_cycle)

        n = MEMORY_SIZES["unique_sql_statements"][q]
        conn = sqlite3.connect(":memory:")
        scan_mod = None
        if walpatch_mod is not None:
            from walpatch import sqlscan as scan_mod  # type: ignore[no-redef]
        max_cache = 0
        gc.collect()
        rss0 = rss_kib()
        for i in range(n):
            conn.execute(f"SELECT {i} AS v{i % 7}")
            if scan_mod is not None:
                max_cache = max(max_cache, scan_mod.cache_size())
        if scan_mod is not None:
            max_cache = max(max_cache, scan_mod.cache_size())
        gc.collect()
        conn.close()
        out["unique_sql"] = {
            "statements": n, "rss_growth_kib": rss_kib() - rss0,
            "scan_cache_max": max_cache if scan_mod is not None else None,
            "scan_cache_limit": scan_mod.CACHE_MAX_ENTRIES if scan_mod is not None else None,
            "scan_cache_bounded": (max_cache <= scan_mod.CACHE_MAX_ENTRIES)
            if scan_mod is not None else None,
        }
        print(MARK + json.dumps(out), flush=True)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------

#: the directory the children import walpatch from (the work tree, or an exported --git-ref)
_walpatch_root = REPO
#: --compare NAME=DIR: extra walpatch variants imported from a scratch copy
_variant_roots: Dict[str, str] = {}


def child_env(variant: Optional[str] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("WALPATCH") or k.startswith("OTEL_"))}
    if variant == PURE_PYTHON:
        env["WALPATCH_DISABLE_EXTENSIONS"] = "1"
    root = _variant_roots.get(variant or "", _walpatch_root)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONHASHSEED", None)
    return env


def run_child(argv: List[str], timeout: float) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__)] + argv
    variant = argv[argv.index("--variant") + 1]
    # cwd: the temporary directory, so that the work tree is not importable by accident
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=child_env(variant), timeout=timeout, universal_newlines=True,
                          cwd=tempfile.gettempdir())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(
            f"benchmark child failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return json.loads(lines[0][len(MARK):])


def available_variants(wanted: List[str]) -> Tuple[List[str], Dict[str, str]]:
    import importlib.util

    skipped: Dict[str, str] = {}
    out = []
    for v in wanted:
        if v == "otel":
            try:
                found = importlib.util.find_spec(OTEL_MODULE) is not None
            except ImportError:
                found = False
            if not found:
                skipped[v] = f"{OTEL_MODULE} is not installed ({OTEL_INSTALL})"
                continue
        out.append(v)
    return out, skipped


def machine_info() -> Dict[str, Any]:
    import sqlite3

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: Dict[str, Optional[str]] = {}
    for dist in ("wrapt", "opentelemetry-instrumentation-sqlite3", "opentelemetry-api"):
        try:
            from importlib import metadata  # 3.8+

            versions[dist] = metadata.version(dist)
        except Exception:
            versions[dist] = None
    version = subprocess.run(
        [sys.executable, "-c", "import walpatch; print(walpatch.__version__, walpatch.__file__)"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True,
        env=child_env(), cwd=tempfile.gettempdir()).stdout.split()
    versions["walpatch"] = version[0] if version else None
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "executable": sys.executable, "sqlite": sqlite3.sqlite_version,
        "versions": versions, "walpatch_file": version[1] if len(version) > 1 else None,
    }


def git(*argv: str) -> Optional[str]:
    try:
        proc = subprocess.run(["git", "-C", REPO] + list(argv), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def source_info(ref: Optional[str], tmp: str) -> Dict[str, Any]:
    """Where the children take walpatch from; exports ``ref`` (git archive) when given."""
    global _walpatch_root
    if ref is None:
        dirty = git("status", "--porcelain", "--", "walpatch")
        return {"source": "work tree", "commit": git("rev-parse", "--short", "HEAD"),
                "walpatch_uncommitted_changes": bool(dirty) if dirty is not None else None}
    commit = git("rev-parse", "--short", ref + "^{commit}")
    if commit is None:
        raise SystemExit(f"--git-ref {ref!r}: not a commit of {REPO}")
    dest = os.path.join(tmp, "src-" + commit)
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", REPO, "archive", commit, "walpatch"],
                             stdout=subprocess.PIPE, check=True).stdout
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest)
    _walpatch_root = dest
    return {"source": f"git archive of {ref}", "commit": commit,
            "walpatch_uncommitted_changes": False}




def summarize(workloads: List[str], variants: List[str],
              rounds: List[Dict[str, Dict[str, Any]]], clock: str = "cpu") -> Dict[str, Any]:
    """rounds[r][variant][workload] -> child workload record; figures on ``clock``."""
    key = f"best_{clock}_ns"
    other = "best_wall_ns" if clock == "cpu" else "best_cpu_ns"
    out: Dict[str, Any] = {}
    for w in workloads:
        entry: Dict[str, Any] = {"description": DESCRIPTIONS[w], "budget": BUDGETS.get(w),
                                 "variants": {}}
        base = [r["unpatched"][w] for r in rounds]
        ops = base[0]["ops"]
        entry["ops_per_run"] = ops
        for v in variants:
            if (w, v) in NOT_RUN:
                entry["variants"][v] = {"not_run": NOT_RUN[(w, v)]}
                continue
            recs = [r[v][w] for r in rounds]
            per_op = [rec[key] / rec["ops"] for rec in recs]
            ratios = [rec[key] / b[key] for rec, b in zip(recs, base)]
            added = [(rec[key] - b[key]) / rec["ops"] for rec, b in zip(recs, base)]
            other_ratios = [rec[other] / b[other] for rec, b in zip(recs, base)]
            entry["variants"][v] = {
                "ns_per_op_median": statistics.median(per_op),
                "ns_per_op_rounds": per_op,
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "ratio_rounds": ratios,
                "added_ns_per_op_median": statistics.median(added),
                "results": [rec["result"] for rec in recs],
                ("wall" if clock == "cpu" else "cpu") + "_ratio_median":
                    statistics.median(other_ratios),
            }
        budget = BUDGETS.get(w)
        wp = entry["variants"].get("walpatch")
        if budget is not None and wp and "ratio_median" in wp:
            entry["budget_met"] = wp["ratio_median"] <= budget
        out[w] = entry
    return out


def check_parity(summary: Dict[str, Any], variants: List[str]) -> List[str]:
    problems = []
    for w, entry in summary.items():
        if w in PARITY_EXEMPT:
            continue
        ref = entry["variants"]["unpatched"]["results"]
        for v in variants:
            rec = entry["variants"].get(v, {})
            if "results" in rec and rec["results"] != ref:
                problems.append(f"{w}: {v} returned {rec['results']!r}, unpatched {ref!r}")
    return problems


def fmt_ns(ns: float) -> str:
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} us"
    return f"{ns:.0f} ns"


def render_markdown(report: Dict[str, Any]) -> str:
    m = report["machine"]
    src = report["walpatch_source"]
    variants = report["variants_run"]
    lines = [
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}  ",
        f"Python {m['python']} ({m['implementation']}), SQLite {m['sqlite']}, "
        + ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items()) if v)
        + "  ",
        f"walpatch measured: {src['source']} at commit {src['commit']}"
        + (" **with uncommitted changes in walpatch/**" if src.get(
            "walpatch_uncommitted_changes") else "")
        + (f"; load average at start {', '.join(f'{x:.2f}' for x in report['loadavg_at_start'])}"
           if report.get("loadavg_at_start") else "") + "  ",
        f"Rounds: {report['rounds']} (variants interleaved, fresh subprocess per variant per "
        f"{'round' if report['grouped'] else 'workload and round'}), best of "
        f"{report['repeat']} timed repetitions per child after 1 warm-up; "
        f"mode: {'quick' if report['quick'] else 'full'}.",
    ]
    for v, root in (report.get("compared_copies") or {}).items():
        lines.append(f"Variant `{v}`: walpatch imported from the scratch copy `{root}`.  ")
    if report["skipped_variants"]:
        for v, why in report["skipped_variants"].items():
            lines.append(f"Variant `{v}` skipped: {why}.")
    clock = report.get("clock", "cpu")
    lines += ["", f"Clock: {'process CPU time (user + system)' if clock == 'cpu' else 'wall'}"
              f". Ratios are medians over rounds of `variant / unpatched` "
              "(range over rounds in brackets); time is the median per operation.", ""]
    head = ["workload", "unpatched"]
    for v in variants[1:]:
        head += [v, f"{v} ratio"]
    head += ["walpatch added / op", "budget"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for w, e in report["workloads"].items():
        row = [f"`{w}`", fmt_ns(e["variants"]["unpatched"]["ns_per_op_median"])]
        for v in variants[1:]:
            rec = e["variants"].get(v, {})
            if "not_run" in rec:
                row += ["n/a", "n/a"]
                continue
            row += [fmt_ns(rec["ns_per_op_median"]),
                    f"{rec['ratio_median']:.3f}x [{rec['ratio_min']:.3f}-{rec['ratio_max']:.3f}]"]
        wp = e["variants"].get("walpatch", {})
        row.append(f"{wp['added_ns_per_op_median']:+.0f} ns" if "added_ns_per_op_median" in wp
                   else "")
        if e.get("budget") is not None and "budget_met" in e:
            row.append(f"<= {e['budget']:.2f}x: {'met' if e['budget_met'] else '**MISSED**'}")
        else:
            row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Workloads:", ""]
    for w, e in report["workloads"].items():
        lines.append(f"- `{w}`: {e['description']}; {e['ops_per_run']} op(s) per timed run.")
    mem = report.get("memory") or {}
    if mem:
        lines += ["", "Memory (one child per variant; RSS = VmRSS from /proc/self/status, "
                  "sampled after a warm-up and then every fifth of the cycles, after "
                  "gc.collect()):", "",
                  "| variant | check | cycles / statements | RSS series (KiB) | RSS growth | "
                  "walpatch caches |", "|---|---|---|---|---|---|"]
        for v, rec in mem.items():
            for label in ("connect_close", "connect_wal_close"):
                c = rec[label]
                caches = ""
                if c["guarded_classes_before"] is not None:
                    caches = (f"guarded classes {c['guarded_classes_before']} -> "
                              f"{c['guarded_classes_after']}, kept fds {c['kept_descriptors']}")
                lines.append(f"| {v} | {label} | {c['cycles']} | "
                             f"{', '.join(str(x) for x in c['rss_kib_series'])} | "
                             f"{c['rss_growth_kib']:+d} KiB | {caches} |")
            u = rec["unique_sql"]
            caches = ""
            if u["scan_cache_max"] is not None:
                caches = (f"scan cache max {u['scan_cache_max']} entries (limit "
                          f"{u['scan_cache_limit']}): "
                          f"{'bounded' if u['scan_cache_bounded'] else '**UNBOUNDED**'}")
            lines.append(f"| {v} | unique f-string SQL | {u['statements']} | - | "
                         f"{u['rss_growth_kib']:+d} KiB | {caches} |")
    missed = [w for w, e in report["workloads"].items() if e.get("budget_met") is False]
    lines += ["", "Budgets (walpatch, CPython 3.11): " + (
        "all met." if not missed else "missed: " + ", ".join(f"`{w}`" for w in missed) + ".")]
    if report.get("parity_problems"):
        lines += ["", "PARITY PROBLEMS: " + "; ".join(report["parity_problems"])]
    return "\n".join(lines) + "\n"


def parent_main(args: argparse.Namespace) -> int:
    wanted = args.variants.split(",") if args.variants else list(VARIANTS)
    control = args.control if args.control is not None else not args.quick
    if control and CONTROL not in wanted:
        wanted.append(CONTROL)
    for spec in args.compare or []:
        name, _, root = spec.partition("=")
        if not name.startswith("walpatch-") or not os.path.isdir(os.path.join(root, "walpatch")):
            raise SystemExit(f"--compare {spec!r}: want walpatch-NAME=DIR with DIR/walpatch/")
        _variant_roots[name] = os.path.abspath(root)
        wanted.append(name)
    variants, skipped = available_variants(wanted)
    if "unpatched" not in variants:
        variants.insert(0, "unpatched")
    for v, why in skipped.items():
        print(f"variant {v} skipped: {why}", file=sys.stderr, flush=True)
    workloads = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    for w in workloads:
        if w not in SIZES:
            raise SystemExit(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    rounds_n = args.rounds or (2 if args.quick else 7)
    repeat = args.repeat or (2 if args.quick else 3)
    grouped = args.quick if args.grouped is None else args.grouped
    timeout = 120 if args.quick else 900
    started = time.time()
    rounds: List[Dict[str, Dict[str, Any]]] = []
    verified: Dict[str, List[str]] = {}
    with tempfile.TemporaryDirectory(prefix="walpatch-bench-") as tmp:
        source = source_info(args.git_ref, tmp)
        try:
            load: Optional[List[float]] = list(os.getloadavg())
        except OSError:
            load = None
        report: Dict[str, Any] = {
            "command": "python benchmarks/overhead.py " + " ".join(args.argv_shown),
            "machine": machine_info(), "walpatch_source": source, "loadavg_at_start": load,
            "compared_copies": dict(_variant_roots),
            "quick": args.quick, "rounds": rounds_n, "repeat": repeat, "grouped": grouped,
            "variants_run": variants, "skipped_variants": skipped, "budgets": BUDGETS,
        }
        base_argv = ["--tmpdir", tmp, "--repeat", str(repeat)] + (["--quick"] if args.quick
                                                                  else [])
        for r in range(rounds_n):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            rec: Dict[str, Dict[str, Any]] = {v: {} for v in variants}
            groups = [workloads] if grouped else [[w] for w in workloads]
            for group in groups:
                for v in order:
                    todo = [w for w in group if (w, v) not in NOT_RUN]
                    if not todo:
                        continue
                    res = run_child(["--child", "--variant", v, "--workloads", ",".join(todo)]
                                    + base_argv, timeout)
                    rec[v].update(res["workloads"])
                    verified.setdefault(v, res["verified"])
            rounds.append(rec)
            print(f"round {r + 1}/{rounds_n} done ({time.time() - started:.0f} s)",
                  file=sys.stderr, flush=True)
        memory: Dict[str, Any] = {}
        if not args.no_memory:
            for v in [x for x in variants if x != CONTROL]:
                memory[v] = run_child(["--memory", "--variant", v] + base_argv, timeout)
        report["memory"] = memory
    report["verified"] = verified
    report["clock"] = args.clock
    report["workloads"] = summarize(workloads, variants, rounds, args.clock)
    report["parity_problems"] = check_parity(report["workloads"], variants)
    report["elapsed_s"] = round(time.time() - started, 1)
    md = render_markdown(report)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    if report["parity_problems"]:
        return 3
    if args.check_budgets and any(e.get("budget_met") is False
                                  for e in report["workloads"].values()):
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, 2 rounds (smoke test)")
    p.add_argument("--rounds", type=int, help="rounds (default 7, quick 2)")
    p.add_argument("--repeat", type=int, help="timed repetitions per child (default 3, quick 2)")
    p.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS + (CONTROL,))}")
    p.add_argument("--workloads", help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--control", dest="control", action="store_true", default=None,
                   help=f"add the A/A control variant {CONTROL} (default in full runs)")
    p.add_argument("--no-control", dest="control", action="store_false")
    p.add_argument("--grouped", dest="grouped", action="store_true", default=None,
                   help="one child per variant and round running every workload "
                        "(default with --quick; else one child per workload)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory children")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="figures from process CPU time (default: robust on a shared machine) "
                        "or wall-clock time; the other one's ratio is kept in the JSON")
    p.add_argument("--json", help="write the full results as JSON here")
    p.add_argument("--markdown", help="write the results table as Markdown here")
    p.add_argument("--git-ref", help="measure walpatch as committed at this git ref (exported "
                   "with git archive) instead of the work tree")
    p.add_argument("--compare", action="append", metavar="walpatch-NAME=DIR",
                   help="add a walpatch variant imported from DIR (a scratch copy with a "
                        "candidate change), interleaved with the others; repeatable")
    p.add_argument("--check-budgets", action="store_true",
                   help="exit 1 when a walpatch budget is missed")
    # child-side options
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--tmpdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.memory:
        return memory_main(args)
    args.argv_shown = [a for a in argv]
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
