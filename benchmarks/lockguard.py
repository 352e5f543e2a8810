#!/usr/bin/env python
"""Cost of the lock guard (issue 12) on file operations that have nothing to do with SQLite.

    python benchmarks/lockguard.py [--rounds 30] [--number 3000] [--json]

In one process, walpatch installed, a guarded connection to a WAL database kept open (so the
set of live files is not empty and every open() is checked). Each round runs every workload
once with ``lock_guard=off`` (the original ``open``: nothing wrapped) and once with
``lock_guard=protect``, in an order that alternates from round to round; the figure is the
median over rounds of the per-round ratio protect / off (process CPU time of timeit's number
of calls, gc off).

Workloads, each on an unrelated small file (13 bytes):

* ``open_read_text``:   ``with open(p) as f: f.read()``                 budget 1.10
* ``open_read_binary``: ``with open(p, "rb") as f: f.read()``           budget 1.10
* ``open_read_new_name``: the same, binary, every call a name not seen in the last second
  (the identity memo misses: one ``stat`` per call; the worst case, reported, no budget)
* ``os_open_close``:    ``os.close(os.open(p, os.O_RDONLY))`` (``os.close`` does an ``fstat``
  while a guarded connection is open; reported, no budget)
* ``idle_open_read_binary``: the binary workload after the connection closed (the guard is
  armed but nothing is live: one truthiness test; reported, no budget)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import timeit
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import walpatch  # noqa: E402
from walpatch import lockguard  # noqa: E402

BUDGETS = {"open_read_text": 1.10, "open_read_binary": 1.10}


def workloads(workdir: str) -> Dict[str, Callable[[], None]]:
    path = os.path.join(workdir, "small.txt")
    with open(path, "w") as f:
        f.write("hello, world\n")
    names = []
    for i in range(64):
        link = os.path.join(workdir, f"alias-{i}.txt")
        os.link(path, link)
        names.append(link)
    counter = [0]

    def text() -> None:
        with open(path) as f:
            f.read()

    def binary() -> None:
        with open(path, "rb") as f:
            f.read()

    def new_name() -> None:
        counter[0] += 1
        lockguard._memo.clear()  # as if every name were new: the memo cannot help
        with open(names[counter[0] % 64], "rb") as f:
            f.read()

    def os_open_close() -> None:
        os.close(os.open(path, os.O_RDONLY))

    return {"open_read_text": text, "open_read_binary": binary,
            "open_read_new_name": new_name, "os_open_close": os_open_close}


def timed(fn: Callable[[], None], number: int) -> float:
    fn()
    gc.disable()
    try:
        # process CPU time, as benchmarks/overhead.py: less disturbed by other processes
        return timeit.timeit(fn, number=number, timer=time.process_time) / number * 1e9
    finally:
        gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--number", type=int, default=3000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="walpatch-lockguard-bench-")
    db = os.path.join(workdir, "live.db")
    walpatch.install(lock_guard="protect")
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t(x)")
    conn.commit()
    conn.execute("SELECT count(*) FROM t").fetchone()
    loads = workloads(workdir)
    ratios: Dict[str, List[float]] = {name: [] for name in loads}
    times: Dict[str, Dict[str, List[float]]] = {n: {"off": [], "protect": []} for n in loads}
    for rnd in range(args.rounds):
        for name, fn in loads.items():
            order = ("off", "protect") if rnd % 2 == 0 else ("protect", "off")
            got = {}
            for mode in order:
                walpatch.install(lock_guard=mode)
                assert (open is lockguard._OPEN) == (mode == "protect")
                got[mode] = timed(fn, args.number if name != "open_read_new_name"
                                  else args.number // 3)
                times[name][mode].append(got[mode])
            ratios[name].append(got["protect"] / got["off"])
    assert lockguard._live, "the guarded connection must be live during the measurement"

    # idle: the guard is armed but no guarded connection is open any more
    conn.close()
    idle: List[float] = []
    idle_times: Dict[str, List[float]] = {"off": [], "protect": []}
    binary = loads["open_read_binary"]
    for rnd in range(args.rounds):
        got = {}
        for mode in (("off", "protect") if rnd % 2 == 0 else ("protect", "off")):
            walpatch.install(lock_guard=mode)
            got[mode] = timed(binary, args.number)
            idle_times[mode].append(got[mode])
        idle.append(got["protect"] / got["off"])
    ratios["idle_open_read_binary"] = idle
    times["idle_open_read_binary"] = idle_times
    walpatch.uninstall()

    report = {}
    for name, values in ratios.items():
        report[name] = {
            "ratio": round(statistics.median(values), 3),
            "off_ns": round(statistics.median(times[name]["off"])),
            "protect_ns": round(statistics.median(times[name]["protect"])),
            "budget": BUDGETS.get(name),
        }
    meta = {"python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version,
            "rounds": args.rounds, "number": args.number}
    if args.json:
        print(json.dumps({"meta": meta, "results": report}, indent=2))
        return
    print(f"lock guard cost, CPython {meta['python']}, SQLite {meta['sqlite']}, "
          f"{args.rounds} interleaved rounds x {args.number} calls (median of per-round ratios)")
    for name, r in report.items():
        verdict = ""
        if r["budget"]:
            verdict = "  budget %.2fx %s" % (r["budget"], "met" if r["ratio"] <= r["budget"]
                                              else "MISSED")
        print(f"  {name:24s} off {r['off_ns']:7d} ns  protect {r['protect_ns']:7d} ns  "
              f"ratio {r['ratio']:.3f}x{verdict}")


if __name__ == "__main__":
    main()
