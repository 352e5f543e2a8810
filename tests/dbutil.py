"""Helpers for tests that build real databases: made and inspected in *other* processes.

The pytest process is itself protected by walpatch in these tests, so it must not open and
close database files from Python (design.md §5): headers are read and WAL files are made by
short subprocesses running plain, unpatched sqlite3.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Tuple

ROOT = Path(__file__).resolve().parent.parent


def run_py(
    code: str, *args: str, env: Any = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter without walpatch (unless the code installs it)."""
    full_env = dict(os.environ)
    full_env.pop("WALPATCH", None)
    full_env["PYTHONPATH"] = str(ROOT)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env,
        timeout=timeout,
    )


def header(path: Any) -> Tuple[int, int]:
    """Bytes 18 and 19 of the file, read by another process."""
    proc = run_py(
        "import sys; d=open(sys.argv[1],'rb').read(100); print(d[18], d[19])", str(path))
    assert proc.returncode == 0, proc.stderr
    a, b = proc.stdout.split()
    return int(a), int(b)


def make_db(path: Any, mode: str = "wal", rows: int = 3) -> None:
    """Create a database with table t(x) holding ``rows`` rows, in ``mode``, in a subprocess."""
    code = (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1])\n"
        "got = c.execute('PRAGMA journal_mode=' + sys.argv[2]).fetchone()[0]\n"
        "assert got == sys.argv[2], got\n"
        "c.execute('CREATE TABLE IF NOT EXISTS t(x)')\n"
        "c.executemany('INSERT INTO t VALUES (?)', [(i,) for i in range(int(sys.argv[3]))])\n"
        "c.commit(); c.close()\n"
    )
    proc = run_py(code, str(path), mode, str(rows))
    assert proc.returncode == 0, proc.stderr


def row_count(path: Any) -> int:
    proc = run_py(
        "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("
        "'SELECT count(*) FROM t').fetchone()[0])", str(path))
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def last_json(stdout: str) -> Any:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output: {stdout!r}")
