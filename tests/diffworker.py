"""Child side of the differential harness (tests/test_differential.py, docs/differential.md).

Run as ``python tests/diffworker.py [--walpatch] [--sabotage NAME]``: reads one generated
program per line (JSON) on stdin, runs it in a directory of its own, and writes one JSON result
line per program on stdout. The same worker runs without walpatch (plain sqlite3) and with it
(``WALPATCH=1`` through the installed ``walpatch.pth``, then ``walpatch.install(**settings)``
per program for its mode): a whole batch of programs costs one pair of interpreter starts.

A program is Python source made by tests/diffprog.py: ``setup`` (plain, unguarded
``sqlite3.Connection`` objects and raw file writes) and ``steps``, each a snippet that sets
``_r``. Each step's outcome is recorded: the rows and their Python types, or the exception's
type, message and SQLite error name (for a refusal also its attributes), warnings,
``in_transaction`` of every connection, and the header bytes 18/19 of every file in the
directory afterwards. At the end every connection is closed and every file is described
(header, size), then each SQLite file is summarised (tables and row counts) through an
unguarded connection. Nothing here imports hypothesis or pytest.

Header bytes are read lock-safely in this (possibly protected) process: through a descriptor
SQLite already holds (``/proc/self/fd``, ``os.pread``); only a file that no descriptor of this
process has open is opened and closed, and closing that descriptor cannot drop a lock of ours
(design.md section 5). Snapshots run between steps in the main thread, never while a step's
threads run.

``--sabotage`` breaks the walpatch side on purpose, for the harness's control tests:
``swallow-refusal`` makes the downgrade check a no-op (missed downgrades),
``text-factory`` leaves ``text_factory`` as ``str`` after the guard's own queries.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Dict

WALPATCH = "--walpatch" in sys.argv
SABOTAGE = sys.argv[sys.argv.index("--sabotage") + 1] if "--sabotage" in sys.argv else None

import sqlite3  # noqa: E402  (after the argv check: with WALPATCH=1 the .pth hook runs now)

VIA_PTH = False
if WALPATCH:
    import walpatch  # noqa: E402

    VIA_PTH = walpatch.is_installed()  # installed by walpatch.pth when sqlite3 was imported
    walpatch.install()
    if SABOTAGE == "swallow-refusal":
        from walpatch import guard as _guard

        _guard._check_downgrade = lambda *a, **k: None  # type: ignore[assignment]
    elif SABOTAGE == "text-factory":
        from walpatch import guard as _guard

        _orig_fetch = _guard._fetch  # every query of the guard's goes through _fetch

        def _leaky_fetch(kit: Any, conn: Any, sql: str) -> Any:
            rows = _orig_fetch(kit, conn, sql)
            conn.text_factory = str  # forgets to put the caller's factory back
            return rows

        _guard._fetch = _leaky_fetch  # type: ignore[assignment]
    elif SABOTAGE:
        raise SystemExit(f"unknown sabotage {SABOTAGE!r}")

MAGIC = b"SQLite format 3\x00"
SETTINGS = dict(retry_initial_delay=0.001, retry_max_delay=0.01, retry_total_timeout=0.5)


# --- encoding what a step produced -----------------------------------------------------------

def enc_value(v: Any) -> Any:
    t = type(v).__name__
    if isinstance(v, (bytes, bytearray, memoryview)):
        return [t, bytes(v).hex()]
    if v is None or isinstance(v, (bool, int, str)):
        return [t, v]
    if isinstance(v, float):
        return [t, repr(v)]
    return [t, repr(v)[:200]]


def enc_row(row: Any) -> Any:
    if isinstance(row, dict):
        return ["dict", sorted([str(k), enc_value(v)] for k, v in row.items())]
    if isinstance(row, (tuple, list)) or type(row).__name__ == "Row":
        return [type(row).__name__, [enc_value(v) for v in row]]
    return enc_value(row)


def enc_exc(e: BaseException) -> Dict[str, Any]:
    t = type(e)
    out: Dict[str, Any] = {
        "type": f"{t.__module__}.{t.__qualname__}",
        "message": str(e)[:500],
        "errorname": getattr(e, "sqlite_errorname", None),
        "mro": [c.__name__ for c in t.__mro__ if c.__module__ in ("sqlite3", "builtins")][:3],
    }
    if t.__name__ == "WalDowngradeRefused":
        orig = getattr(e, "original_error", None)
        out["refusal"] = {
            "database": getattr(e, "database", None), "schema": getattr(e, "schema", None),
            "requested_mode": getattr(e, "requested_mode", None),
            "reason": getattr(e, "reason", None),
            "original_error": type(orig).__name__ if orig is not None else None,
        }
    return out


def enc_result(r: Any) -> Dict[str, Any]:
    if isinstance(r, sqlite3.Cursor):
        try:
            rows = r.fetchall()
        except Exception as e:  # noqa: BLE001 - fetching is part of the outcome
            return {"kind": "cursor", "fetch_error": enc_exc(e)}
        desc = [d[0] for d in r.description] if r.description else None
        return {"kind": "cursor", "rows": [enc_row(x) for x in rows], "description": desc,
                "rowcount": r.rowcount}
    if isinstance(r, sqlite3.Connection):
        return {"kind": "connection", "isinstance_connection": True}
    if isinstance(r, dict):
        return {"kind": "value", "value": json.loads(json.dumps(r, sort_keys=True, default=repr))}
    if isinstance(r, (list, tuple)):
        return {"kind": "value", "value": [enc_row(x) for x in r]}
    return {"kind": "value", "value": enc_value(r)}


# --- files ------------------------------------------------------------------------------------

def _fd_map() -> Dict[Any, int]:
    out: Dict[Any, int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            st = os.stat(os.path.join("/proc/self/fd", name))
        except OSError:
            continue
        out.setdefault((st.st_dev, st.st_ino), int(name))
    return out


def describe_file(path: str, fds: Dict[Any, int]) -> Any:
    """'missing' | 'dir' | 'empty' | 'notdb' | [b18, b19]."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    if os.path.isdir(path):
        return "dir"
    if st.st_size == 0:
        return "empty"
    fd = fds.get((st.st_dev, st.st_ino))
    try:
        if fd is not None:
            data = os.pread(fd, 100, 0)
        else:  # no descriptor of ours on this inode: closing this one drops no lock of ours
            with open(path, "rb") as f:
                data = f.read(100)
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if len(data) < 100 or data[:16] != MAGIC:
        return "notdb"
    return [data[18], data[19]]


def snapshot(directory: str) -> Dict[str, Any]:
    fds = _fd_map()
    out = {}
    for name in sorted(os.listdir(directory)):
        out[name] = describe_file(os.path.join(directory, name), fds)
    return out


def final_files(directory: str) -> Dict[str, Any]:
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        out[name] = {"state": describe_file(path, {}), "size": os.path.getsize(path)
                     if os.path.isfile(path) else None}
    return out


def digest(directory: str, files: Dict[str, Any]) -> Dict[str, Any]:
    """Tables and row counts of each SQLite file, through an unguarded connection."""
    out: Dict[str, Any] = {}
    for name, info in files.items():
        if not isinstance(info["state"], list):
            continue
        try:
            c = sqlite3.Connection(os.path.join(directory, name), timeout=0.1)
            try:
                tables = [r[0] for r in c.execute(
                    "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
                out[name] = {t: c.execute('SELECT count(*) FROM "%s"' % t.replace('"', '""'))
                             .fetchone()[0] for t in tables}
            finally:
                c.close()
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": [type(e).__name__, str(e)]}
    return out


# --- running one program --------------------------------------------------------------------

def run_program(prog: Dict[str, Any], base: str) -> Dict[str, Any]:
    directory = os.path.join(base, prog["id"])
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    old_cwd = os.getcwd()
    os.chdir(directory)
    ns: Dict[str, Any] = {"__name__": "__diffprog__", "D": directory}
    result: Dict[str, Any] = {"id": prog["id"], "steps": []}
    try:
        exec(compile(prog["prelude"], "<prelude>", "exec"), ns)
        exec(compile(prog["setup"], "<setup>", "exec"), ns)
        if WALPATCH:
            walpatch.install(mode=prog.get("mode", "enforce"), **SETTINGS)
        result["initial"] = snapshot(directory)
        for i, step in enumerate(prog["steps"]):
            result["steps"].append(run_step(ns, step, i, directory))
    finally:
        for c in list(ns.get("conns", {}).values()):
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        ns.clear()
        os.chdir(old_cwd)
    result["files"] = final_files(directory)
    result["digest"] = digest(directory, result["files"])
    if not os.environ.get("WALPATCH_DIFF_KEEP"):
        shutil.rmtree(directory, ignore_errors=True)
    return result


def run_step(ns: Dict[str, Any], step: Dict[str, Any], index: int, directory: str
             ) -> Dict[str, Any]:
    ns.pop("_r", None)
    out: Dict[str, Any] = {}
    allow = step.get("allow_downgrade") and WALPATCH
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = compile(step["code"], f"<step {index}>", "exec")
            if allow:
                with walpatch.allow_downgrade():
                    exec(code, ns)
            else:
                exec(code, ns)
            r = ns.get("_r")
            out["ok"] = enc_result(r)
            if isinstance(r, sqlite3.Connection):
                ns["conns"][step["conn"]] = r
        except Exception as e:  # noqa: BLE001 - every exception is an outcome
            out["exc"] = enc_exc(e)
            if not isinstance(e, sqlite3.Error):
                out["where"] = traceback.format_exc(limit=-3)[-1500:]
    out["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    out["in_tx"] = {str(k): _in_tx(c) for k, c in sorted(ns.get("conns", {}).items())}
    out["after"] = snapshot(directory)
    return out


def _in_tx(c: Any) -> Any:
    try:
        return c.in_transaction
    except Exception as e:  # noqa: BLE001 (closed connection)
        return type(e).__name__


def main() -> None:
    base = os.environ["WALPATCH_DIFF_BASE"]
    os.makedirs(base, exist_ok=True)
    out = sys.stdout
    out.write(json.dumps({"hello": True, "walpatch": WALPATCH, "via_pth": VIA_PTH,
                          "sabotage": SABOTAGE, "pid": os.getpid(),
                          "sqlite": sqlite3.sqlite_version}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        prog = json.loads(line)
        started = time.monotonic()
        try:
            res = run_program(prog, base)
        except Exception:  # noqa: BLE001 - a harness error, reported as such
            res = {"id": prog.get("id"), "harness_error": traceback.format_exc()}
        res["seconds"] = round(time.monotonic() - started, 4)
        res["threads_left"] = threading.active_count() - 1
        if not WALPATCH:
            res["walpatch_loaded"] = "walpatch" in sys.modules
        out.write(json.dumps(res, sort_keys=True) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
