"""Interpreter start-up cost of walpatch's zero-code activation (a benchmark, not a test).

    python benchmarks/startup.py [--runs 200] [--python PY] [--workdir DIR] [--json]

Builds two virtualenvs from the same base interpreter (kept in --workdir and reused):

* ``plain``: wrapt installed, walpatch not installed;
* ``walpatch``: walpatch installed with pip from this checkout (a regular install, so its
  ``walpatch.pth`` is in site-packages), which pulls in the same wrapt.

and times, as wall-clock time of the whole child process, in interleaved rounds (every round
runs every case once, in a shuffled order), reporting medians:

    python -c pass                      plain | walpatch, WALPATCH unset | walpatch, WALPATCH=1
    python -c "import sqlite3"          the same three
    python -c "import sqlite3, wrapt"   plain (to price wrapt's import)

Budgets (issue 3): WALPATCH unset within 2% of not installed; WALPATCH=1 without sqlite3
within 3 ms of not installed; WALPATCH=1 with sqlite3 within the cost of importing wrapt
(plain "import sqlite3, wrapt" minus plain "import sqlite3") plus 2 ms. The report says
which hold. The environment of the children is this one minus ``PYTHON*`` and ``WALPATCH*``
variables, and the children run in an empty directory.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_ITEMS = ("walpatch", "setup.py", "setup.cfg", "pyproject.toml", "README.md")


def _run(cmd: List[str], **kw) -> None:  # type: ignore[no-untyped-def]
    subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _venv_python(home: str) -> str:
    return os.path.join(home, "Scripts" if os.name == "nt" else "bin", "python")


def build(workdir: str, base: str) -> Tuple[str, str]:
    """(plain python, walpatch python); rebuilt when the checkout's walpatch changed."""
    os.makedirs(workdir, exist_ok=True)
    src = os.path.join(workdir, "src")
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    for item in SOURCE_ITEMS:
        path = os.path.join(ROOT, item)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(src, item),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src)
    pythons = []
    for name, reqs in (("plain", ["wrapt"]), ("walpatch", [src])):
        home = os.path.join(workdir, name)
        shutil.rmtree(home, ignore_errors=True)
        _run([base, "-m", "venv", home])
        py = _venv_python(home)
        _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs])
        pythons.append(py)
    plain, patched = pythons
    # Same wrapt in both, or the comparison is unfair.
    versions = [subprocess.run([py, "-c", "import importlib.metadata as m;"
                                "print(m.version('wrapt'))"], check=True,
                               stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
                for py in pythons]
    if versions[0] != versions[1]:
        _run([plain, "-m", "pip", "install", "-q", f"wrapt=={versions[1]}"])
    return plain, patched


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and not k.startswith("WALPATCH")}
    env.update(extra)
    return env


def measure(cases: Dict[str, Tuple[List[str], Dict[str, str]]], runs: int, cwd: str
            ) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {name: [] for name in cases}
    names = list(cases)
    for name in names:  # warm the page cache and __pycache__ once
        cmd, env = cases[name]
        subprocess.run(cmd, env=env, cwd=cwd, check=True)
    for _ in range(runs):
        random.shuffle(names)
        for name in names:
            cmd, env = cases[name]
            start = time.perf_counter()
            subprocess.run(cmd, env=env, cwd=cwd, check=True)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="interleaved rounds (200)")
    parser.add_argument("--python", default=sys.executable, help="base interpreter")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "walpatch-startup-bench"))
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    plain, patched = build(args.workdir, args.python)
    off, on = clean_env(), clean_env(WALPATCH="1")
    cases = {
        "pass/not-installed": ([plain, "-c", "pass"], off),
        "pass/unset": ([patched, "-c", "pass"], off),
        "pass/WALPATCH=1": ([patched, "-c", "pass"], on),
        "sqlite3/not-installed": ([plain, "-c", "import sqlite3"], off),
        "sqlite3/unset": ([patched, "-c", "import sqlite3"], off),
        "sqlite3/WALPATCH=1": ([patched, "-c", "import sqlite3"], on),
        "sqlite3+wrapt/not-installed": ([plain, "-c", "import sqlite3, wrapt"], off),
    }
    cwd = tempfile.mkdtemp(prefix="walpatch-bench-cwd-")
    try:
        times = measure(cases, args.runs, cwd)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    wrapt_cost = med["sqlite3+wrapt/not-installed"] - med["sqlite3/not-installed"]
    checks = [
        ("WALPATCH unset, -c pass: within 2% of not installed",
         med["pass/unset"] - med["pass/not-installed"], 0.02 * med["pass/not-installed"]),
        ("WALPATCH unset, import sqlite3: within 2% of not installed",
         med["sqlite3/unset"] - med["sqlite3/not-installed"],
         0.02 * med["sqlite3/not-installed"]),
        ("WALPATCH=1, -c pass: within 3 ms of not installed",
         med["pass/WALPATCH=1"] - med["pass/not-installed"], 3.0),
        ("WALPATCH=1, import sqlite3: within wrapt's import + 2 ms",
         med["sqlite3/WALPATCH=1"] - med["sqlite3/not-installed"], wrapt_cost + 2.0),
    ]
    version = subprocess.run([plain, "-c", "import sys; print(sys.version.split()[0])"],
                             stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    report = {
        "python": version,
        "runs": args.runs,
        "median_ms": {k: round(v, 2) for k, v in med.items()},
        "wrapt_import_ms": round(wrapt_cost, 2),
        "checks": [{"budget": b, "delta_ms": round(d, 2), "limit_ms": round(lim, 2),
                    "ok": d <= lim} for b, d, lim in checks],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"Python {version}, {args.runs} interleaved rounds, median wall time per process")
        for name, value in med.items():
            q = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else [0, 0, 0]
            print(f"  {name:30s} {value:7.2f} ms   (quartiles {q[0]:.2f}..{q[2]:.2f})")
        print(f"  cost of importing wrapt (plain): {wrapt_cost:.2f} ms")
        for row in report["checks"]:
            mark = "ok  " if row["ok"] else "OVER"
            print(f"  [{mark}] {row['budget']}: {row['delta_ms']:+.2f} ms "
                  f"(limit {row['limit_ms']:.2f} ms)")
    return 0 if all(r["ok"] for r in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
