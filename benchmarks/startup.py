"""Interpreter start-up cost of walpatch's zero-code activation (a benchmark, not a test).

    python benchmarks/startup.py [--runs 200] [--python PY] [--workdir DIR] [--json]

Builds two virtualenvs from the same base interpreter (in --workdir, rebuilt each run):

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
import resource
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


def _one(cmd: List[str], env: Dict[str, str], cwd: str) -> Tuple[float, float]:
    """(wall ms, CPU ms = user + system) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True)
    wall = (time.perf_counter() - start) * 1000.0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1000.0
    return wall, cpu


def measure(cases: Dict[str, Tuple[List[str], Dict[str, str]]], runs: int, cwd: str
            ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    wall: Dict[str, List[float]] = {name: [] for name in cases}
    cpu: Dict[str, List[float]] = {name: [] for name in cases}
    names = list(cases)
    for name in names:  # warm the page cache and __pycache__ once
        _one(*cases[name], cwd)
    for _ in range(runs):
        random.shuffle(names)
        for name in names:
            w, c = _one(*cases[name], cwd)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def _checks(med: Dict[str, float]) -> List[Tuple[str, float, float]]:
    wrapt_cost = med["sqlite3+wrapt/not-installed"] - med["sqlite3/not-installed"]
    return [
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
        wall, cpu = measure(cases, args.runs, cwd)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    version = subprocess.run([plain, "-c", "import sys; print(sys.version.split()[0])"],
                             stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    report: Dict[str, object] = {"python": version, "runs": args.runs}
    all_ok = True
    for label, times in (("wall", wall), ("cpu", cpu)):
        med = {name: statistics.median(v) for name, v in times.items()}
        checks = _checks(med)
        report[label] = {
            "median_ms": {k: round(v, 2) for k, v in med.items()},
            "wrapt_import_ms": round(med["sqlite3+wrapt/not-installed"]
                                     - med["sqlite3/not-installed"], 2),
            "checks": [{"budget": b, "delta_ms": round(d, 2), "limit_ms": round(lim, 2),
                        "ok": d <= lim} for b, d, lim in checks],
        }
        all_ok = all_ok and all(d <= lim for _, d, lim in checks)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if all_ok else 1
    print(f"Python {version}, {args.runs} interleaved rounds; medians per process, in ms")
    print(f"  {'case':30s} {'wall':>8s} {'cpu':>8s}")
    for name in cases:
        print(f"  {name:30s} {statistics.median(wall[name]):8.2f} "
              f"{statistics.median(cpu[name]):8.2f}")
    for label in ("wall", "cpu"):
        part = report[label]
        assert isinstance(part, dict)
        print(f"{label} time: importing wrapt costs {part['wrapt_import_ms']:.2f} ms")
        for row in part["checks"]:
            mark = "ok  " if row["ok"] else "OVER"
            print(f"  [{mark}] {row['budget']}: {row['delta_ms']:+.2f} ms "
                  f"(limit {row['limit_ms']:.2f} ms)")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
