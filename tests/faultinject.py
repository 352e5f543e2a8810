"""Real syscall faults for walpatch tests, through Debian's libfiu (``fiu-utils``).

Two halves, used from two different processes:

* In the test process (pytest, a stress harness, a demo): :func:`missing_reason` says whether
  libfiu is usable here, :func:`run_script` / :func:`run_snippet` run Python under
  ``fiu-run -x`` (libfiu's POSIX wrappers preloaded, no fault enabled yet) and return a
  :class:`RunResult` with the JSON line the child printed, and :func:`header_versions` reads
  bytes 18/19 of a database file once the child has exited.
* In the child that runs under ``fiu-run -x``: :func:`inject` (or :func:`enable`) turns a
  fault point on for the next N calls, exactly around the statement under test, through
  libfiu's control API loaded with ctypes.

Example (child side)::

    import faultinject
    with faultinject.inject("pwrite", "EIO", times=1) as fault:
        conn.execute("PRAGMA journal_mode=WAL")
    print(fault.calls, fault.fired)   # how often the syscall ran, how often it failed

The module imports nothing heavy (no pytest, no sqlite3) so a child can import it cheaply.
Python 3.8 compatible.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

#: The checkout root (the directory holding ``walpatch/``): children get it on PYTHONPATH.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.join(ROOT, "tests")

LIBFIU_SONAME = "libfiu.so.0"
POSIX_PRELOAD = "/usr/lib/fiu/fiu_posix_preload.so"

# The libfiu control API (point names, errno names, the ctypes binding and the counting Fault)
# lives in the package, where ``walpatch demo`` uses it too: one wrapper, not two.
from walpatch.faults import (  # noqa: E402
    POINTS,
    errno_value,
    last_json_object,
    libfiu,
    point_name,
    under_fiu_run,
)
from walpatch.faults import Fault as _PackageFault  # noqa: E402

#: libfiu flag: disable the point after its first failure (verified on libfiu 1.1).
FIU_ONETIME = 1


# --------------------------------------------------------------------------------------------
# Test-process side
# --------------------------------------------------------------------------------------------

_missing: Optional[List[Optional[str]]] = None


def fiu_run_command() -> str:
    """``fiu-run``, or the program named by ``WALPATCH_FIU_RUN`` (a non-standard install)."""
    return os.environ.get("WALPATCH_FIU_RUN") or "fiu-run"


def missing_reason() -> Optional[str]:
    """None when real faults can be injected here, else a sentence saying what is missing.

    Needs ``fiu-run`` on PATH, its POSIX preload library, and ``libfiu.so.0`` loadable with
    ctypes (Debian: ``apt-get install -y fiu-utils libfiu-dev``). Cached.
    """
    global _missing
    if _missing is None:
        reason: Optional[str] = None
        if shutil.which(fiu_run_command()) is None:
            reason = (f"{fiu_run_command()} is not on PATH "
                      "(apt-get install -y fiu-utils libfiu-dev)")
        elif not os.path.exists(POSIX_PRELOAD):
            reason = f"{POSIX_PRELOAD} is missing (apt-get install -y fiu-utils)"
        else:
            try:
                ctypes.CDLL(LIBFIU_SONAME)
            except OSError as exc:
                reason = f"{LIBFIU_SONAME} cannot be loaded ({exc}); apt-get install -y libfiu0"
        _missing = [reason]
    return _missing[0]


def child_env(extra: Optional[Mapping[str, str]] = None, keep_walpatch_env: bool = False
              ) -> Dict[str, str]:
    """The environment for a child: the checkout root first on PYTHONPATH.

    ``WALPATCH*`` variables of the calling environment are dropped unless
    ``keep_walpatch_env`` (a child decides itself whether walpatch is on; an outer
    ``WALPATCH=1`` must not turn an unprotected control run into a protected one).
    ``extra`` is applied last.
    """
    env = {k: v for k, v in os.environ.items()
           if keep_walpatch_env or not k.startswith("WALPATCH")}
    env.pop("PYTHONHOME", None)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")
    env["PYTHONIOENCODING"] = "utf-8"
    if extra:
        env.update(extra)
    return env


class RunResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    result: Optional[Dict[str, Any]]  # the last stdout line that parses as a JSON object

    def describe(self) -> str:
        """Everything about the run, for assertion messages."""
        return (f"exit code {self.returncode}\n--- stdout ---\n{self.stdout}"
                f"--- stderr ---\n{self.stderr}")


def parse_result(stdout: str) -> Optional[Dict[str, Any]]:
    """The last line of ``stdout`` that is a JSON object, or None."""
    return last_json_object(stdout)


def run_script(
    script: str,
    args: Sequence[str] = (),
    *,
    python: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 60.0,
    cwd: Optional[str] = None,
    under_fiu: bool = True,
) -> RunResult:
    """Run ``python script args...`` under ``fiu-run -x`` and collect its :class:`RunResult`.

    ``python`` defaults to this interpreter; ``env`` adds variables to :func:`child_env`.
    ``fiu-run -f ''`` turns off libfiu's remote-control FIFOs (nothing is left in /tmp).
    ``under_fiu=False`` runs the same command without libfiu (a control run).
    """
    return _run([script, *args], python=python, env=env, timeout=timeout, cwd=cwd,
                under_fiu=under_fiu)


def run_snippet(
    code: str,
    *,
    python: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 60.0,
    cwd: Optional[str] = None,
    under_fiu: bool = True,
) -> RunResult:
    """Like :func:`run_script` for ``python -c code``. ``tests/`` is on PYTHONPATH too, so the
    snippet can ``import faultinject``."""
    extra = dict(env or {})
    extra["PYTHONPATH"] = os.pathsep.join(
        [TESTS_DIR, extra.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return _run(["-c", code], python=python, env=extra, timeout=timeout, cwd=cwd,
                under_fiu=under_fiu)


def _run(argv: List[str], python: Optional[str], env: Optional[Mapping[str, str]],
         timeout: float, cwd: Optional[str], under_fiu: bool) -> RunResult:
    extra = dict(env or {})
    full_env = child_env()
    if "PYTHONPATH" in extra:  # prepend, keep the checkout root
        full_env["PYTHONPATH"] = extra.pop("PYTHONPATH") + os.pathsep + full_env["PYTHONPATH"]
    full_env.update(extra)
    cmd = [python or sys.executable, *argv]
    if under_fiu:
        reason = missing_reason()
        if reason:
            raise RuntimeError(f"libfiu is not usable here: {reason}")
        cmd = [fiu_run_command(), "-x", "-f", "", *cmd]
    proc = subprocess.run(cmd, env=full_env, cwd=cwd or ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, universal_newlines=True)
    return RunResult(proc.returncode, proc.stdout, proc.stderr, parse_result(proc.stdout))


def header_versions(path: str) -> Optional[tuple]:
    """Bytes 18 and 19 of the database header: (1, 1) rollback journal, (2, 2) WAL.

    None for a missing, empty or non-SQLite file. This does ``open()`` / ``read()`` /
    ``close()`` on the database file, and closing any descriptor of a file drops every POSIX
    lock *this process* holds on it (design.md section 5). That is safe only because the
    calling test process holds no connection to the file (the protected process is the
    child, and it has exited or does not hold a lock we depend on). Never call this from the
    protected process itself, nor while a connection of the calling process has it open.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(100)
    except FileNotFoundError:
        return None
    if len(data) < 100 or data[:16] != b"SQLite format 3\x00":
        return None
    return (data[18], data[19])


_INSPECT = r"""
import json, os, sqlite3, sys
path = sys.argv[1]
with open(path, "rb") as f:  # this short-lived process holds no connection to the file
    data = f.read(100)
out = {"header": [data[18], data[19]] if len(data) >= 100 else None}
out["sidecars"] = [s for s in ("-wal", "-shm", "-journal") if os.path.exists(path + s)]
conn = sqlite3.connect("file:" + path.replace("%", "%25").replace("?", "%3f")
                       .replace("#", "%23") + "?mode=ro", uri=True)
out["integrity"] = conn.execute("PRAGMA integrity_check").fetchone()[0]
tables = [r[0] for r in conn.execute(
    "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
out["rows"] = {t: conn.execute('SELECT count(*) FROM "%s"' % t.replace('"', '""')).fetchone()[0]
               for t in tables}
conn.close()
print(json.dumps(out))
"""


def inspect_database(path: str, python: Optional[str] = None) -> Dict[str, Any]:
    """Header bytes 18/19, leftover sidecar files, ``integrity_check`` and the row count of
    every table, read by a short plain-Python subprocess (no walpatch, no libfiu, read-only
    URI: nothing is created or changed). Header is ``[1, 1]``, ``[2, 2]`` or None.

    The calling process opens nothing, so this is safe even in a protected process. If a
    ``-wal`` file is left behind, the read-only connection reads it, but cannot replay it
    into the main file; the header reported is the main file's.
    """
    proc = subprocess.run([python or sys.executable, "-c", _INSPECT, path],
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("WALPATCH") and k != "LD_PRELOAD"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"inspecting {path} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def header_versions_in_process(path: str) -> Optional[tuple]:
    """Bytes 18/19 of ``path`` read *inside* a process that has it open through SQLite.

    Uses ``os.pread`` on a descriptor SQLite already holds (found in ``/proc/self/fd``), so
    nothing is opened or closed and no POSIX lock can be dropped (design.md section 5).
    None when this process has no descriptor on the file. Linux only.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    for name in os.listdir("/proc/self/fd"):
        try:
            fst = os.stat(os.path.join("/proc/self/fd", name))
        except OSError:
            continue
        if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
            data = os.pread(int(name), 100, 0)
            return (data[18], data[19]) if len(data) >= 100 else None
    return None


def cached_venv(base_python: str, requirements: Sequence[str], name: str,
                cache_dir: Optional[str] = None) -> str:
    """A venv made from ``base_python`` with ``requirements`` pip-installed; returns its python.

    Kept under ``~/.cache/walpatch-test-venvs/<name>`` and reused while its recorded
    requirements match. walpatch itself is not installed: children get it from PYTHONPATH.
    Raises ``subprocess.CalledProcessError`` when the venv or pip fails (no silent skip).
    """
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "walpatch-test-venvs")
    home = os.path.join(cache, name)
    python = os.path.join(home, "bin", "python")
    stamp = os.path.join(home, "walpatch-requirements.txt")
    wanted = "\n".join(requirements) + "\n"
    try:
        with open(stamp) as f:
            if f.read() == wanted and os.path.exists(python):
                return python
    except OSError:
        pass
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(cache, exist_ok=True)
    subprocess.run([base_python, "-m", "venv", home], check=True, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT)
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *requirements], check=True, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT)
    with open(stamp, "w") as f:
        f.write(wanted)
    return python


# --------------------------------------------------------------------------------------------
# Child side (the process running under ``fiu-run -x``)
# --------------------------------------------------------------------------------------------


class Fault(_PackageFault):
    """walpatch.faults.Fault with the tests' argument order: (point, err, times, after).

    Fails the calls after the first ``after`` ones, ``times`` of them (None: every call until
    :meth:`disable`); ``calls``/``fired`` count what happened while it was enabled.
    """

    def __init__(self, point: str, err: Union[int, str] = "EIO", times: Optional[int] = 1,
                 after: int = 0) -> None:
        super().__init__(point, err, times=times, after=after)


def enable(point: str, err: Union[int, str] = "EIO", times: Optional[int] = 1,
           after: int = 0) -> Fault:
    """Enable a fault now; call ``.disable()`` when done (or use :func:`inject`)."""
    fault = Fault(point, err, times, after)
    fault.enable()
    return fault


def inject(point: str, err: Union[int, str] = "EIO", times: Optional[int] = 1,
           after: int = 0) -> Fault:
    """Context manager: the fault is on inside the ``with`` block only."""
    return Fault(point, err, times, after)


def enable_onetime(point: str, err: Union[int, str] = "EIO") -> None:
    """libfiu's own "fail once": ``fiu_enable(name, 1, errno, FIU_ONETIME)``. The point
    disables itself after its first failure (no call counting; prefer :func:`inject`)."""
    rc = libfiu().fiu_enable(point_name(point).encode(), 1,
                             ctypes.c_void_p(errno_value(err)), FIU_ONETIME)
    if rc != 0:
        raise RuntimeError(f"fiu_enable({point!r}, FIU_ONETIME) failed: {rc}")


def emit(result: Mapping[str, Any]) -> None:
    """Print ``result`` as the one JSON line :func:`parse_result` picks up."""
    sys.stdout.write(json.dumps(result, sort_keys=True, default=repr) + "\n")
    sys.stdout.flush()


__all__ = [
    "POINTS", "FIU_ONETIME", "ROOT", "RunResult", "Fault", "missing_reason", "child_env",
    "fiu_run_command",
    "run_script", "run_snippet", "parse_result", "header_versions", "inspect_database",
    "header_versions_in_process", "cached_venv", "libfiu",
    "under_fiu_run", "enable", "inject", "enable_onetime", "emit", "point_name", "errno_value",
]
