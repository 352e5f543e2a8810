#!/usr/bin/env python
"""A leak check of walpatch's execute hot path: N rounds of calls through the guarded
methods (every branch of walpatch/_speedups.c), with resident memory, allocated blocks and,
on a debug build of CPython, ``sys.gettotalrefcount()`` sampled every tenth of the run.

    python benchmarks/speedups_leakcheck.py [--rounds 1000000]

Uses the guarded classes directly (no connect hook, so it also runs on an interpreter
without wrapt, such as Debian's python3.11-dbg). Each round makes these calls:
``conn.execute("SELECT ?", (i,))``, ``cur.execute("SELECT 1")``, an ``executemany`` INSERT
(rolled back every 1000 rounds), a unique SQL text (scan-cache miss), an unhashable SQL
(TypeError in the lookup) and a call with no SQL (argument error, handed to the Python
override); every 100th round a journal-mode query (a plan: the Python guard).

Prints one JSON line; exit status 1 when the samples after the first grow by more than the
tolerances (RSS 512 KiB, 2000 blocks, 2000 references), which would be a leak of at least
one object per few hundred calls.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from typing import Any, Dict, List


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=1_000_000)
    args = p.parse_args()

    from walpatch import connection as wc
    from walpatch import speedups

    cls = wc.guarded_connection_class(sqlite3.Connection, sqlite3)
    conn = sqlite3.connect(":memory:", factory=cls)
    cur = conn.cursor()
    conn.execute("CREATE TABLE t(x)")
    totalrefcount = getattr(sys, "gettotalrefcount", None)
    samples: List[Dict[str, Any]] = []
    step = max(args.rounds // 10, 1)
    calls = 0
    for i in range(args.rounds):
        conn.execute("SELECT ?", (i,))
        cur.execute("SELECT 1")
        cur.executemany("INSERT INTO t VALUES (?)", ((i,), (i,)))
        cur.execute(f"SELECT {i % 5000}")
        try:
            cur.execute([i])  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
        try:
            cur.execute()  # type: ignore[call-arg]
        except TypeError:
            pass
        calls += 6
        if i % 100 == 0:
            cur.execute("PRAGMA journal_mode").fetchall()
            calls += 1
        if i % 1000 == 999:
            conn.rollback()
        if i % step == 0:
            samples.append({"round": i, "rss_kib": rss_kib(), "blocks": sys.getallocatedblocks(),
                            "refs": totalrefcount() if totalrefcount else None})
    conn.close()
    base = samples[1] if len(samples) > 1 else samples[0]
    last = samples[-1]
    growth = {"rss_kib": last["rss_kib"] - base["rss_kib"],
              "blocks": last["blocks"] - base["blocks"],
              "refs": (last["refs"] - base["refs"]) if totalrefcount else None}
    ok = (growth["rss_kib"] <= 512 and growth["blocks"] <= 2000
          and (growth["refs"] is None or growth["refs"] <= 2000))
    print(json.dumps({"python": sys.version.split()[0], "debug_build": bool(totalrefcount),
                      "speedups": speedups.KIND, "rounds": args.rounds, "calls": calls,
                      "growth_after_first_tenth": growth, "ok": ok, "samples": samples}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
