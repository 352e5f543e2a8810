#!/usr/bin/env python
"""SQL that merely *mentions* journal_mode (issue 10 item 9): walpatch vs unpatched sqlite3.

    python benchmarks/mentions.py [--rounds N] [--quick] [--json out.json]

Two workloads, each naming a table ``journal_mode_log`` in every statement:

* ``dump_26mb``: one ``executescript`` of a 26 MB dump (CREATE TABLE, BEGIN, ~134,000
  INSERTs, COMMIT) into a new database file;
* ``insert_8kb_x2000``: 2,000 distinct INSERT statements of 8 KB each through
  ``conn.execute`` in one transaction.

Each (workload, variant) runs in a fresh child process (so peak RSS is that run's own),
reusing benchmarks/overhead.py's ``Child`` (variant setup and verification, CPU-time
measurement); rounds interleave the variants, in an order that alternates. Reported: the
median over rounds of walpatch/unpatched for CPU time and for the child's peak RSS
(Linux VmHWM, reset after the input is built and one warm-up run). "Workload peak" is
that peak minus the RSS right after the variant was set up (imports done, one connection
made): the memory the input and the workload hold at their peak. The budget of 1.1x
applies to CPU and to the workload peak. The whole process's peak is printed too: it also
holds walpatch's fixed import cost (wrapt, ~10 MiB here), which this item is not about (see
benchmarks/startup.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import overhead  # noqa: E402  (benchmarks/overhead.py: the runner reused here)

BUDGET = 1.10
WORKLOADS = ("dump_26mb", "insert_8kb_x2000")
_TEXT = "some text, with words; and -- things ''quoted'' /* not a comment */ " * 2


def make_dump(size: int) -> str:
    parts = ["CREATE TABLE journal_mode_log(id INTEGER PRIMARY KEY, msg TEXT, mode TEXT);\n",
             "BEGIN;\n"]
    total = 0
    i = 0
    while total < size:
        row = f"INSERT INTO journal_mode_log VALUES({i},'{_TEXT}{i}','wal');\n"
        parts.append(row)
        total += len(row)
        i += 1
    parts.append("COMMIT;\n")
    return "".join(parts)


def make_inserts(count: int, size: int) -> List[str]:
    pad = "x" * (size - 80)
    return [f"INSERT INTO journal_mode_log(msg, mode) VALUES('{i} {pad}', 'wal')"
            for i in range(count)]


def child(variant: str, workload: str, quick: bool) -> Dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="walpatch-mentions-")
    c = overhead.Child(variant, quick=quick, repeat=3, workdir=workdir)
    c.setup_variant()
    base = _status_kib("VmRSS")  # imports done, one connection made and closed
    n = [0]

    def fresh() -> str:
        n[0] += 1
        return c.path(f"db{n[0]}.db")

    if workload == "dump_26mb":
        dump = make_dump(2_600_000 if quick else 26_000_000)

        def run() -> Any:
            conn = c.connect(fresh())
            conn.executescript(dump)
            rows = conn.execute("SELECT count(*) FROM journal_mode_log").fetchone()[0]
            conn.close()
            return rows
    else:
        statements = make_inserts(200 if quick else 2000, 8192)

        def run() -> Any:
            conn = c.connect(fresh())
            conn.execute("CREATE TABLE journal_mode_log(id INTEGER PRIMARY KEY, msg, mode)")
            for sql in statements:
                conn.execute(sql)
            conn.commit()
            rows = conn.execute("SELECT count(*) FROM journal_mode_log").fetchone()[0]
            conn.close()
            return rows

    c.measure(run, warmup=0)  # warm-up: lazy imports, statement caches (both variants)
    gc.collect()
    peak_reset = _reset_peak()  # forget the peak of building the input
    times, result = c.measure(run, warmup=0)
    peak = _status_kib("VmHWM") if peak_reset else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
    return {"cpu_ns": min(times), "peak_kib": peak, "workload_peak_kib": peak - base,
            "rows": result, "verified": c.verified, "peak_reset": peak_reset}


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux: clear_refs 5), so that the peak measured is the
    workload's, not that of building its input."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_child(variant: str, workload: str, quick: bool) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, workload]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=overhead.child_env(variant), cwd=tempfile.gettempdir(),
                          timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(overhead.MARK)]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"child failed: {proc.stderr[-3000:]}")
    return json.loads(lines[0][len(overhead.MARK):])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "WORKLOAD"))
    args = ap.parse_args()
    if args.child:
        out = child(args.child[0], args.child[1], args.quick)
        print(overhead.MARK + json.dumps(out), flush=True)
        return 0
    report: Dict[str, Any] = {"python": sys.version.split()[0], "rounds": args.rounds,
                              "quick": args.quick, "workloads": {}}
    ok = True
    for workload in WORKLOADS:
        cpu_ratios, mem_ratios, total_ratios, runs = [], [], [], []
        for r in range(args.rounds):
            order = ("unpatched", "walpatch") if r % 2 == 0 else ("walpatch", "unpatched")
            got = {v: run_child(v, workload, args.quick) for v in order}
            assert got["unpatched"]["rows"] == got["walpatch"]["rows"]
            cpu_ratios.append(got["walpatch"]["cpu_ns"] / got["unpatched"]["cpu_ns"])
            mem_ratios.append(got["walpatch"]["workload_peak_kib"]
                              / max(1, got["unpatched"]["workload_peak_kib"]))
            total_ratios.append(got["walpatch"]["peak_kib"] / got["unpatched"]["peak_kib"])
            runs.append(got)
        cpu, mem = statistics.median(cpu_ratios), statistics.median(mem_ratios)
        within = cpu <= BUDGET and mem <= BUDGET
        ok = ok and within
        plain = statistics.median(g["unpatched"]["cpu_ns"] for g in runs) / 1e9
        wp = statistics.median(g["walpatch"]["cpu_ns"] for g in runs) / 1e9
        plain_mem = statistics.median(g["unpatched"]["workload_peak_kib"] for g in runs) / 1024
        wp_mem = statistics.median(g["walpatch"]["workload_peak_kib"] for g in runs) / 1024
        plain_total = statistics.median(g["unpatched"]["peak_kib"] for g in runs) / 1024
        wp_total = statistics.median(g["walpatch"]["peak_kib"] for g in runs) / 1024
        report["workloads"][workload] = {
            "cpu_ratio": cpu, "peak_ratio": mem, "cpu_s": [plain, wp],
            "workload_peak_mib": [plain_mem, wp_mem], "process_peak_mib": [plain_total, wp_total],
            "process_peak_ratio": statistics.median(total_ratios), "cpu_ratios": cpu_ratios,
            "peak_ratios": mem_ratios, "within_budget": within}
        print(f"{workload}: CPU {plain:.3f} s plain, {wp:.3f} s walpatch, median ratio "
              f"{cpu:.3f}x; workload peak RSS {plain_mem:.1f} MiB / {wp_mem:.1f} MiB, median "
              f"ratio {mem:.3f}x (budget {BUDGET}x: {'ok' if within else 'MISSED'}); process "
              f"peak {plain_total:.1f} / {wp_total:.1f} MiB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
