"""walpatch._speedups (issue 14): the C hot path behaves like the pure-Python one, makes no
bound method per call, and lets sqlite3's warnings name the caller's line.

Each behaviour is checked on both paths, in fresh interpreters (``WALPATCH_DISABLE_EXTENSIONS``
is read once per process): the pure-Python path is the control that shows what the C path
changes, or that the check can fail. Other CPythons 3.8-3.13 under ~/.pyenv get the extension
compiled in place (tests/speedups_build.py) and run the same comparison.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap
from typing import Dict, List, Optional

import pytest

from .speedups_build import CHECKOUT, build_inplace

PYENV = os.path.expanduser("~/.pyenv/versions")


def run_py(code: str, pure_python: bool, python: str = sys.executable,
           extra_env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    env["PYTHONPATH"] = CHECKOUT
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if pure_python:
        env["WALPATCH_DISABLE_EXTENSIONS"] = "1"
    env.pop("PYTHON_GIL", None)  # free-threaded builds: the modules decide, not the caller
    env.update(extra_env or {})
    return subprocess.run([python, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=CHECKOUT)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Guarded classes made directly (no connect hook, so no wrapt needed in other interpreters).
_PRELUDE = """
import json, sqlite3, sys, warnings
from walpatch import connection as wc, speedups
cls = wc.guarded_connection_class(sqlite3.Connection, sqlite3)
conn = sqlite3.connect(":memory:", factory=cls)
cur = conn.cursor()
assert wc.is_guarded(conn) and wc.is_guarded(cur)
"""

_ARGUMENT_CASES = _PRELUDE + """
class BadHash(str):
    def __hash__(self):
        raise ValueError("bad hash")

cases = {
    "c.execute()": lambda: conn.execute(),
    "c.execute(sql=)": lambda: conn.execute(sql="SELECT 1"),
    "c.execute(3 args)": lambda: conn.execute("SELECT 1", (), 3),
    "c.executemany()": lambda: conn.executemany(),
    "c.executemany(1 arg)": lambda: conn.executemany("SELECT 1"),
    "c.executemany(kw)": lambda: conn.executemany("SELECT 1", seq_of_parameters=[]),
    "k.execute()": lambda: cur.execute(),
    "k.execute(sql=)": lambda: cur.execute(sql="SELECT 1"),
    "k.execute(parameters=)": lambda: cur.execute("SELECT 1", parameters=()),
    "k.execute(foo=)": lambda: cur.execute("SELECT 1", foo=1),
    "k.execute(3 args)": lambda: cur.execute("SELECT 1", (), 3),
    "k.execute(list)": lambda: cur.execute([1]),
    "k.execute(bytes)": lambda: cur.execute(b"SELECT 1"),
    "k.execute(None)": lambda: cur.execute(None),
    "k.execute(bad hash)": lambda: cur.execute(BadHash("SELECT 1")),
    "k.execute(params)": lambda: cur.execute("SELECT ?, ?", (1, "a")).fetchall(),
    "k.execute(wrong count)": lambda: cur.execute("SELECT ?", (1, 2)),
    "k.executemany()": lambda: cur.executemany(),
    "k.executemany(1 arg)": lambda: cur.executemany("SELECT 1"),
    "k.executemany(3 args)": lambda: cur.executemany("SELECT 1", [], 3),
    "k.executemany(ok)": lambda: cur.executemany("SELECT ?", [(1,), (2,)]).rowcount,
    "k.pragma(3 args)": lambda: cur.execute("PRAGMA journal_mode=WAL", (), 3),
    "k.pragma": lambda: cur.execute("PRAGMA journal_mode=WAL").fetchall(),
    "unbound()": lambda: type(cur).execute(),
    "unbound(wrong self)": lambda: type(cur).execute(1, "SELECT 1"),
    "unbound(ok)": lambda: type(cur).execute(cur, "SELECT 5").fetchall(),
    "getattr": lambda: getattr(cur, "execute")("SELECT 6").fetchall(),
    "repr(bound)": lambda: repr(cur.execute).split(" of ")[0],
    "name": lambda: (type(cur).execute.__name__, type(cur).execute.__qualname__),
    "signature": lambda: str(__import__("inspect").signature(cur.execute)),
}
out = {}
for key, call in cases.items():
    try:
        out[key] = repr(call())
    except BaseException as exc:
        out[key] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"kind": speedups.KIND, "cases": out}))
"""


def _interpreters() -> List[str]:
    found = {}
    for path in glob.glob(os.path.join(PYENV, "3.*", "bin", "python")):
        parts = os.path.basename(os.path.dirname(os.path.dirname(path))).split(".")
        threads = len(parts) == 3 and parts[2].endswith("t")  # a free-threaded build
        if threads:
            parts[2] = parts[2][:-1]
        if len(parts) == 3 and all(p.isdigit() for p in parts) and int(parts[1]) >= 8:
            key = "%s.%s" % tuple(parts[:2]) + ("t" if threads else "")
            found[key] = max(found.get(key, ""), path)
    return [found[k] for k in sorted(found, key=lambda v: (int(v.rstrip("t").split(".")[1]), v))]


def test_the_extension_is_in_use_unless_disabled() -> None:
    code = """
    import json, walpatch
    from walpatch import speedups
    print(json.dumps({"kind": speedups.KIND, "status": walpatch.status()["speedups"],
                      "module": speedups.module is not None}))
    """
    assert last_json(run_py(code, pure_python=False)) == {
        "kind": "c", "status": "c", "module": True}
    assert last_json(run_py(code, pure_python=True)) == {
        "kind": "python", "status": "python", "module": False}


def test_cli_status_says_which() -> None:
    cli = "import sys; from walpatch.cli import main; sys.exit(main(['status']))"
    c = run_py(cli, pure_python=False)
    py = run_py(cli, pure_python=True)
    assert c.returncode == 0 and py.returncode == 0, c.stderr + py.stderr
    assert "speedups: c " in c.stdout, c.stdout
    assert "speedups: python " in py.stdout, py.stdout


@pytest.mark.parametrize("python", _interpreters() or [sys.executable])
def test_same_results_and_argument_errors_both_ways(python: str) -> None:
    """Argument errors (missing, extra, keyword), odd SQL objects, a guarded request:
    the same result or exception type and message with the C path as with pure Python."""
    build_inplace(python)
    c = last_json(run_py(_ARGUMENT_CASES, pure_python=False, python=python))
    py = last_json(run_py(_ARGUMENT_CASES, pure_python=True, python=python))
    assert (c["kind"], py["kind"]) == ("c", "python")
    assert c["cases"] == py["cases"]
    # and they are what we expect, not equal by both being broken
    assert c["cases"]["k.execute(params)"] == "[(1, 'a')]"
    assert c["cases"]["k.pragma"] == "[('memory',)]"
    assert c["cases"]["k.execute(bad hash)"] == "ValueError: bad hash"
    assert c["cases"]["k.execute()"].startswith("TypeError: ")
    assert c["cases"]["k.execute()"].endswith(
        "execute() missing 1 required positional argument: 'sql'")


def test_a_journal_mode_request_still_reaches_the_guard(tmp_path) -> None:
    """The C path hands a plan to the Python guard: a downgrade of a WAL file is refused."""
    db = str(tmp_path / "wal.db")
    code = f"""
    import json, walpatch
    walpatch.install()
    import sqlite3
    from walpatch import speedups
    c = sqlite3.connect({db!r})
    c.execute("PRAGMA journal_mode=WAL"); c.execute("CREATE TABLE IF NOT EXISTS t(x)"); c.commit()
    out = {{"kind": speedups.KIND}}
    for name, call in (("conn", lambda: c.execute("PRAGMA journal_mode=DELETE")),
                       ("cursor", lambda: c.cursor().execute("PRAGMA journal_mode=DELETE"))):
        try:
            call()
            out[name] = "not refused"
        except walpatch.WalDowngradeRefused as exc:
            out[name] = type(exc).__name__
    out["mode"] = c.execute("PRAGMA journal_mode").fetchone()[0]
    c.close()
    print(json.dumps(out))
    """
    for pure in (False, True):
        out = last_json(run_py(code, pure_python=pure))
        assert out == {"kind": "python" if pure else "c", "conn": "WalDowngradeRefused",
                       "cursor": "WalDowngradeRefused", "mode": "wal"}
        with open(db, "rb") as f:
            header = f.read(20)
        assert header[18:20] == b"\x02\x02"


_BOUND_METHODS = _PRELUDE + """
import gc, types
class Probe:
    pass
def adapt(value):
    # runs inside execute: is there a bound method of `cur` alive right now?
    found.append(sum(1 for r in gc.get_referrers(cur)
                     if isinstance(r, types.MethodType) and r.__self__ is cur))
    return 1
sqlite3.register_adapter(Probe, adapt)
found = []
cur.execute("SELECT ?", (Probe(),))          # obj.method(...): no bound method
method = cur.execute
method("SELECT ?", (Probe(),))               # control: an explicit bound method
blocks = sys.getallocatedblocks()
for i in range(100000):
    cur.execute("SELECT ?", (i,))
print(json.dumps({"kind": speedups.KIND, "found": found,
                  "flags": type(type(cur).__dict__["execute"]).__flags__,
                  "blocks_growth": sys.getallocatedblocks() - blocks}))
"""


def test_no_bound_method_per_call_and_no_growth() -> None:
    for pure in (False, True):
        out = last_json(run_py(_BOUND_METHODS, pure_python=pure))
        assert out["found"] == [0, 1], out  # the control finds the explicit one
        assert out["flags"] & (1 << 17), out  # Py_TPFLAGS_METHOD_DESCRIPTOR, like functions
        assert abs(out["blocks_growth"]) < 50, out


_WARNING_FROM_ADAPTER = _PRELUDE + """
class Old:
    pass
def adapt(value):
    # like sqlite3's default date adapters on 3.12+: warn about the caller of execute
    warnings.warn("adapter warning", DeprecationWarning, stacklevel=2)
    return 1
sqlite3.register_adapter(Old, adapt)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    line = sys._getframe().f_lineno + 1
    cur.execute("SELECT ?", (Old(),)); conn.execute("SELECT ?", (Old(),))
print(json.dumps({"kind": speedups.KIND, "line": line,
                  "where": [(w.filename, w.lineno) for w in caught]}))
"""


def test_warning_raised_inside_execute_names_the_caller() -> None:
    """With the C path the warning names the caller's line; with pure Python it names
    walpatch/connection.py (the documented known difference, and this test's control)."""
    c = last_json(run_py(_WARNING_FROM_ADAPTER, pure_python=False))
    py = last_json(run_py(_WARNING_FROM_ADAPTER, pure_python=True))
    assert c["kind"] == "c" and py["kind"] == "python"
    assert c["where"] == [["<string>", c["line"]]] * 2, c
    connection_py = os.path.join(CHECKOUT, "walpatch", "connection.py")
    assert [w[0] for w in py["where"]] == [connection_py] * 2, py


def _python(version: str) -> Optional[str]:
    paths = sorted(glob.glob(os.path.join(PYENV, version + ".*", "bin", "python")))
    return paths[-1] if paths else None


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_sqlite3_deprecation_warnings_name_the_caller(version: str) -> None:
    """sqlite3's own warnings raised in C inside execute on 3.12+: named placeholders with a
    sequence, and the default datetime adapter."""
    python = _python(version)
    if python is None:
        pytest.skip(f"CPython {version} is NOT installed under {PYENV}: NOT checked")
    build_inplace(python)
    code = _PRELUDE + """
import datetime
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    line = sys._getframe().f_lineno + 1
    cur.execute("SELECT :a", (1,)); cur.execute("SELECT ?", (datetime.date(2020, 1, 2),))
print(json.dumps({"kind": speedups.KIND, "line": line,
                  "where": [(w.filename, w.lineno, w.category.__name__) for w in caught]}))
"""
    c = last_json(run_py(code, pure_python=False, python=python))
    py = last_json(run_py(code, pure_python=True, python=python))
    assert c["kind"] == "c" and py["kind"] == "python"
    assert c["where"] == [["<string>", c["line"], "DeprecationWarning"]] * 2, c
    connection_py = os.path.join(CHECKOUT, "walpatch", "connection.py")
    assert [w[0] for w in py["where"]] == [connection_py] * 2, py


_FREE_THREADED = _PRELUDE + """
import threading
from walpatch import sqlscan
errors = []
def work(t):
    c = sqlite3.connect(":memory:", factory=cls, check_same_thread=False)
    k = c.cursor()
    try:
        for i in range(5000):
            k.execute("SELECT ?", (i,))
            c.execute(f"SELECT {t}, {i % 3000}")  # misses: scan() inserts, clears when full
            if i % 250 == 0:
                assert k.execute("PRAGMA journal_mode").fetchone() == ("memory",)
                sqlscan._CACHE.clear()
    except Exception as exc:
        errors.append(repr(exc))
    finally:
        c.close()
threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"kind": speedups.KIND, "gil": sys._is_gil_enabled(), "errors": errors}))
"""


def test_free_threaded_build_keeps_the_gil_off() -> None:
    """Py_mod_gil: importing the extension on a free-threaded build does not turn the GIL
    back on (the control is the interpreter's own state), and concurrent execute calls with
    the plan cache being filled and cleared from other threads stay correct."""
    pythons = [p for p in _interpreters() if "t/bin" in p]
    if not pythons:
        pytest.skip(f"no free-threaded CPython (3.13t+) under {PYENV}: NOT checked")
    for python in pythons:
        build_inplace(python)
        # PYTHON_GIL unset: a module without Py_mod_gil would turn the GIL on at import
        out = last_json(run_py(_FREE_THREADED, pure_python=False, python=python))
        assert out == {"kind": "c", "gil": False, "errors": []}, (python, out)
