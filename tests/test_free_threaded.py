"""walpatch on a free-threaded CPython (3.13t, ``--disable-gil``): threads really run in parallel.

Runs on the free-threaded interpreter (~/.pyenv/versions/3.13.Zt, from
scripts/provision-pythons.sh) in a subprocess: from the main suite, and in the nox cell of that
interpreter (where it is the cell's own interpreter). A missing one fails with
WALPATCH_REQUIRE_ALL_PYTHONS=1.

* The GIL stays off: ``import walpatch, wrapt``, ``walpatch.install()`` and guarded connections
  must not make CPython turn the GIL back on (it does so when an extension module that does not
  declare free-threading support is imported); checked under ``-X gil=0`` as asked, and without
  it, where only the imported extensions decide.
* Stress: many threads connecting, executing, sharing connections (``check_same_thread=False``)
  and asking for WAL and for a downgrade, at the same time, on real WAL files. Every request is
  counted by the test itself; ``walpatch.stats()`` must show exactly as many (no counter lost),
  every downgrade refused, and the per-file state (walpatch's history per file, its kept
  descriptors, the header bytes 18/19, the rows, integrity) consistent.
  The control: the same program on the plain interpreter (walpatch not installed) lets the
  downgrades through, so the assertions on refusals can fail.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from .dbutil import header, make_db
from .test_cpython_suite import (
    CHECKOUT,
    find_interpreter,
    python_with_wrapt,
    skip_missing_interpreter,
)

GIL_PROBE = r'''
import json, sys
import wrapt, walpatch
assert walpatch.install()
import sqlite3
c = sqlite3.connect(":memory:")
c.execute("PRAGMA journal_mode=WAL").fetchall()
c.close()
from walpatch.connection import is_guarded
print(json.dumps({"gil_enabled": sys._is_gil_enabled(), "wrapt": wrapt.__version__,
                  "guarded": is_guarded(sqlite3.connect(":memory:")),
                  "free_threaded_build": bool(__import__("sysconfig").get_config_var(
                      "Py_GIL_DISABLED"))}))
'''

STRESS = r'''
import contextlib, json, random, sqlite3, sys, threading
paths = sys.argv[1].split(",")
threads_n, rounds = int(sys.argv[2]), int(sys.argv[3])
use_walpatch = sys.argv[4] == "1"
if use_walpatch:
    import walpatch
    assert walpatch.install()
    before = walpatch.stats()

made = {"connections": 0, "wal_requests": 0, "downgrade_requests": 0, "refused": 0,
        "downgraded": 0, "inserts": {p: 0 for p in paths}, "errors": []}
made_lock = threading.Lock()
shared = {p: sqlite3.connect(p, timeout=60, check_same_thread=False, isolation_level=None)
          for p in paths}
made["connections"] += len(paths)
# A shared connection is used by every thread, one statement sequence at a time (the sqlite3
# docs: with check_same_thread=False the application serializes use). Measured on 3.13.15t
# WITHOUT walpatch: unserialized use of one connection from several threads makes fetchone()
# return None for a PRAGMA, so that is CPython's, not walpatch's, and is not tested here.
shared_locks = {p: threading.Lock() for p in paths}
start = threading.Barrier(threads_n)


def worker(seed):
    rng = random.Random(seed)
    mine = {"connections": 0, "wal_requests": 0, "downgrade_requests": 0, "refused": 0,
            "downgraded": 0, "inserts": {p: 0 for p in paths}, "errors": []}
    start.wait()
    for _ in range(rounds):
        path = rng.choice(paths)
        try:
            if rng.random() < 0.5:
                conn, own = sqlite3.connect(path, timeout=60, isolation_level=None), True
                mine["connections"] += 1
                lock = contextlib.nullcontext()
            else:
                conn, own = shared[path], False
                lock = shared_locks[path]
            with lock:
                once(mine, conn, path, seed, rng)
            if own:
                conn.close()
        except Exception as exc:
            mine["errors"].append("%s: %s" % (type(exc).__name__, exc))
    with made_lock:
        for key in ("connections", "wal_requests", "downgrade_requests", "refused",
                    "downgraded"):
            made[key] += mine[key]
        for p in paths:
            made["inserts"][p] += mine["inserts"][p]
        made["errors"] += mine["errors"][:5]


def once(mine, conn, path, seed, rng):
    """One insert, one WAL request, one downgrade request on ``conn``."""
    target = conn if rng.random() < 0.5 else conn.cursor()
    target.execute("INSERT INTO t VALUES (?)", (seed,))
    mine["inserts"][path] += 1
    mine["wal_requests"] += 1
    got = target.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if got != "wal":
        mine["errors"].append("WAL request answered %r" % got)
    mine["downgrade_requests"] += 1
    try:
        got = target.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if type(exc).__name__ == "WalDowngradeRefused":
            mine["refused"] += 1
        else:  # a plain run: the database is busy with other connections
            mine["errors"].append("%s: %s" % (type(exc).__name__, exc))
    else:
        if got == "delete":
            mine["downgraded"] += 1
            conn.execute("PRAGMA journal_mode=WAL").fetchone()


threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for conn in shared.values():
    conn.close()
out = {"made": made, "gil_enabled": sys._is_gil_enabled()}
if use_walpatch:
    from walpatch import ondisk, policy, runtime
    after = walpatch.stats()
    out["stats"] = {k: after[k] - before.get(k, 0) for k in after}
    out["history"] = {p: (runtime.history_for(p) or policy.History("none")).outcome
                      for p in paths}
    out["history_files"] = len(runtime._history)
    out["kept_descriptors"] = ondisk.kept_descriptor_count()
    out["wal_ok_outcome"] = policy.WAL_OK
print(json.dumps(out))
'''

THREADS, ROUNDS, FILES = 16, 60, 4


@pytest.fixture(scope="module")
def free_threaded_python() -> str:
    base = find_interpreter("3.13t")
    if base is None:
        skip_missing_interpreter("3.13t", "walpatch on the free-threaded build")
    return python_with_wrapt("3.13t", base)


def _run(python: str, args: list, code: str, cwd: str) -> dict:
    env = dict(os.environ, PYTHONPATH=CHECKOUT, PYTHONDONTWRITEBYTECODE="1")
    env.pop("WALPATCH", None)
    env.pop("PYTHON_GIL", None)
    proc = subprocess.run([python, *args, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("version", ["3.13t"])
def test_gil_stays_off_with_walpatch_and_wrapt(version, free_threaded_python, tmp_path):
    forced = _run(free_threaded_python, ["-X", "gil=0"], GIL_PROBE, str(tmp_path))
    assert forced["free_threaded_build"] is True and forced["guarded"] is True
    assert forced["gil_enabled"] is False
    # Without -X gil=0 CPython re-enables the GIL when it imports an extension module that does
    # not declare free-threading support (wrapt's _wrappers, sqlite3's _sqlite3): this shows
    # that none of what walpatch imports does.
    default = _run(free_threaded_python, [], GIL_PROBE, str(tmp_path))
    assert default["guarded"] is True
    assert default["gil_enabled"] is False, default
    print(f"free-threaded CPython, wrapt {default['wrapt']}: GIL off with walpatch "
          f"(-X gil=0 and default)")


def _stress(python: str, tmp_path, use_walpatch: bool) -> tuple:
    paths = []
    for i in range(FILES):
        path = tmp_path / f"{'guarded' if use_walpatch else 'plain'}-{i}.db"
        make_db(path, "wal", rows=0)
        paths.append(str(path))
    code = STRESS
    env = dict(os.environ, PYTHONPATH=CHECKOUT, PYTHONDONTWRITEBYTECODE="1")
    env.pop("WALPATCH", None)
    proc = subprocess.run(
        [python, "-X", "gil=0", "-c", code, ",".join(paths), str(THREADS), str(ROUNDS),
         "1" if use_walpatch else "0"],
        capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), paths


def _rows(python: str, path: str) -> tuple:
    code = ("import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\n"
            "print(c.execute('SELECT count(*) FROM t').fetchone()[0], "
            "c.execute('PRAGMA integrity_check').fetchone()[0])\nc.close()\n")
    proc = subprocess.run([python, "-c", code, path], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    count, integrity = proc.stdout.split()
    return int(count), integrity


@pytest.mark.parametrize("version", ["3.13t"])
def test_threads_stress_loses_no_counter(version, free_threaded_python, tmp_path):
    out, paths = _stress(free_threaded_python, tmp_path, use_walpatch=True)
    made, stats = out["made"], out["stats"]
    assert out["gil_enabled"] is False
    assert made["errors"] == []
    assert made["wal_requests"] == made["downgrade_requests"] == THREADS * ROUNDS
    # No counter lost: walpatch counted every request the threads made, exactly once.
    assert stats["connections"] == made["connections"]
    assert stats["wal_requests"] == made["wal_requests"]
    assert stats["downgrade_requests"] == made["downgrade_requests"]
    assert stats["downgrades_refused"] == made["refused"] == made["downgrade_requests"]
    assert made["downgraded"] == 0
    assert stats["wal_ok"] + stats["wal_failed"] + stats["wal_unsupported"] \
        + stats["wal_silently_refused"] == made["wal_requests"]
    assert stats["wal_ok"] == made["wal_requests"]
    # Per-file state: no history entry (every WAL request succeeded, and the history keeps
    # failures only: issue 10 item 14); at most one kept descriptor per file; on disk WAL
    # (18/19 = 2/2), every row there, integrity ok.
    assert out["history_files"] == 0, out["history"]
    assert set(out["history"].values()) == {"none"}, out["history"]
    assert out["kept_descriptors"] <= FILES
    for path in paths:
        assert header(path) == (2, 2)
        assert _rows(free_threaded_python, path) == (made["inserts"][path], "ok")
    print(f"{THREADS} threads x {ROUNDS} rounds on {FILES} files: "
          f"{made['connections']} connections, {made['wal_requests']} WAL and "
          f"{made['downgrade_requests']} downgrade requests, all counted, all refused")


@pytest.mark.parametrize("version", ["3.13t"])
def test_threads_stress_control_without_walpatch(version, free_threaded_python, tmp_path):
    """The same program without walpatch: downgrades go through (or fail busy), none refused."""
    out, paths = _stress(free_threaded_python, tmp_path, use_walpatch=False)
    made = out["made"]
    assert made["refused"] == 0
    assert made["downgraded"] > 0
