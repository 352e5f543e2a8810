"""Real syscall faults through Debian's libfiu, for ``walpatch demo`` (and tests).

libfiu's POSIX wrappers are preloaded into a process by ``fiu-run -x``; inside that process a
fault point (``posix/io/rw/pwrite``, ...) is switched on and off through libfiu's control API,
loaded here with ctypes. Nothing is simulated: when a point is enabled, the next calls of that
libc function really fail with the chosen errno, under SQLite's unix VFS.

Two halves:

* the parent (``walpatch demo``): :func:`available` says whether libfiu is usable here and
  why not; :func:`command_prefix` is what to put in front of ``python ...``.
* the child (running under ``fiu-run -x``): :func:`enable` / :func:`disable`, or a
  :class:`Fault` used as a context manager exactly around the statement under test::

      from walpatch import faults
      with faults.Fault("pwrite", "EIO", once=True) as fault:
          conn.execute("PRAGMA journal_mode=WAL")
      fault.calls, fault.fired   # how often pwrite ran while enabled, how often it failed

Install libfiu on Debian/Ubuntu with ``apt-get install -y fiu-utils libfiu-dev``.
Importing this module loads nothing; libfiu is loaded on first use. Python 3.8 compatible.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os
import re
import shutil
import threading
from typing import Any, Dict, List, Optional, Tuple, Union

LIBFIU_SONAME = "libfiu.so.0"
INSTALL_HINT = "apt-get install -y fiu-utils libfiu-dev"
_PRELOAD_NAME = "fiu_posix_preload.so"
_DEFAULT_PLIBPATHS = ("/usr/lib/fiu", "/usr/local/lib/fiu", "/usr/lib64/fiu")

#: Short names for the libfiu POSIX points that SQLite's unix VFS goes through.
POINTS: Dict[str, str] = {
    "pread": "posix/io/rw/pread",
    "pwrite": "posix/io/rw/pwrite",
    "fdatasync": "posix/io/sync/fdatasync",
    "fsync": "posix/io/sync/fsync",
    "open": "posix/io/oc/open",
    "close": "posix/io/oc/close",
    "mmap": "posix/mm/mmap",
    "ftruncate": "posix/io/rw/ftruncate",
    "unlink": "posix/io/dir/unlink",
}


def point_name(point: str) -> str:
    """The full libfiu name for ``point`` (a short name from :data:`POINTS` or a full name)."""
    return POINTS.get(point, point)


def errno_value(err: Union[int, str]) -> int:
    """``"EIO"`` -> 5; ints pass through."""
    if isinstance(err, int):
        return err
    value = getattr(_errno, str(err).upper(), None)
    if not isinstance(value, int):
        raise ValueError(f"unknown errno name {err!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------

def _preload_dirs(fiu_run: str) -> List[str]:
    dirs: List[str] = []
    try:  # fiu-run is a shell script that names its preload directory: PLIBPATH="..."
        with open(fiu_run, "r", errors="replace") as f:
            match = re.search(r'^PLIBPATH="([^"]+)"', f.read(65536), re.M)
        if match:
            dirs.append(match.group(1))
    except OSError:
        pass
    dirs.extend(d for d in _DEFAULT_PLIBPATHS if d not in dirs)
    return dirs


def available() -> Tuple[bool, str]:
    """(True, what was found) when real faults can be injected here, else (False, why not,
    with the command that installs libfiu)."""
    fiu_run = shutil.which("fiu-run")
    if fiu_run is None:
        return False, f"fiu-run is not on PATH (install libfiu: {INSTALL_HINT})"
    preload = next((os.path.join(d, _PRELOAD_NAME) for d in _preload_dirs(fiu_run)
                    if os.path.exists(os.path.join(d, _PRELOAD_NAME))), None)
    if preload is None:
        return False, (f"libfiu's POSIX preload library {_PRELOAD_NAME} was not found "
                       f"(install libfiu: {INSTALL_HINT})")
    try:
        ctypes.CDLL(LIBFIU_SONAME)
    except OSError as exc:
        return False, f"{LIBFIU_SONAME} cannot be loaded ({exc}; install libfiu: {INSTALL_HINT})"
    return True, f"libfiu: {fiu_run} -x (preload {preload})"


def command_prefix() -> List[str]:
    """Put this before ``[python, ...]`` to run it with libfiu's POSIX wrappers preloaded and
    no fault enabled yet. ``-f ''`` turns off libfiu's remote-control FIFOs (nothing is left
    behind in /tmp)."""
    return [shutil.which("fiu-run") or "fiu-run", "-x", "-f", ""]


# ---------------------------------------------------------------------------------------------
# Child side (the process running under ``fiu-run -x``)
# ---------------------------------------------------------------------------------------------

# int cb(const char *name, int *failnum, void **failinfo, unsigned int *flags)
_EXTERNAL_CB = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int),
    ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint))

_lib: Optional[Any] = None
_lib_lock = threading.Lock()
_enabled: Dict[str, "Fault"] = {}


def libfiu() -> Any:
    """libfiu's control API in this process (ctypes), initialised once."""
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(LIBFIU_SONAME)
            lib.fiu_init.argtypes = [ctypes.c_uint]
            lib.fiu_enable_external.argtypes = [ctypes.c_char_p, ctypes.c_int,
                                                ctypes.c_void_p, ctypes.c_uint, _EXTERNAL_CB]
            lib.fiu_disable.argtypes = [ctypes.c_char_p]
            if lib.fiu_init(0) != 0:
                raise RuntimeError("fiu_init failed")
            _lib = lib
        return _lib


def under_fiu_run() -> bool:
    """True when libfiu's POSIX preload library is mapped into this process (``fiu-run -x``).
    Without it an enabled point never fires."""
    try:
        with open("/proc/self/maps") as f:  # not a database file
            return _PRELOAD_NAME in f.read()
    except OSError:
        return _PRELOAD_NAME in os.environ.get("LD_PRELOAD", "")


class Fault:
    """One fault point: while enabled, calls of the point fail with ``err``.

    ``once=True`` fails only the first call; ``once=False`` fails every call until
    :meth:`disable` (persistent). ``times``/``after`` give finer control (fail ``times`` calls
    after letting ``after`` calls through; ``times=None`` is persistent) and override ``once``.
    ``calls`` counts the calls of the point while enabled, ``fired`` the failed ones, so a
    caller can prove the fault really happened. Built on ``fiu_enable_external``: libfiu asks
    a ctypes callback on each call (any thread).
    """

    def __init__(self, point: str, err: Union[int, str] = "EIO", once: bool = True,
                 times: Optional[int] = -1, after: int = 0) -> None:
        if times == -1:
            times = 1 if once else None
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None (persistent)")
        if after < 0:
            raise ValueError("after must be >= 0")
        self.point = point_name(point)
        self.errno = errno_value(err)
        self.times = times
        self.after = after
        self.calls = 0
        self.fired = 0
        self.enabled = False
        self._lock = threading.Lock()
        self._callback = _EXTERNAL_CB(self._decide)  # kept referenced while enabled

    @property
    def once(self) -> bool:
        return self.times == 1

    def _decide(self, name: Any, failnum: Any, failinfo: Any, flags: Any) -> int:
        with self._lock:
            self.calls += 1
            if self.calls <= self.after:
                return 0
            if self.times is not None and self.fired >= self.times:
                return 0
            self.fired += 1
            return 1

    def enable(self) -> "Fault":
        if not under_fiu_run():
            raise RuntimeError("not running under `fiu-run -x`: the fault would never fire")
        lib = libfiu()
        rc = lib.fiu_enable_external(self.point.encode(), 1, ctypes.c_void_p(self.errno), 0,
                                     self._callback)
        if rc != 0:
            raise RuntimeError(f"fiu_enable_external({self.point!r}) failed: {rc}")
        self.enabled = True
        _enabled[self.point] = self
        return self

    def disable(self) -> None:
        if self.enabled:
            libfiu().fiu_disable(self.point.encode())
            self.enabled = False
            if _enabled.get(self.point) is self:
                del _enabled[self.point]

    def summary(self) -> Dict[str, Any]:
        """JSON-ready: point, errno name, times (None = persistent), after, calls, fired."""
        return {"point": self.point, "errno": _errno.errorcode.get(self.errno, self.errno),
                "times": self.times, "after": self.after, "calls": self.calls,
                "fired": self.fired}

    def __enter__(self) -> "Fault":
        return self.enable()

    def __exit__(self, *exc: Any) -> None:
        self.disable()


def enable(point: str, err: Union[int, str] = "EIO", once: bool = True) -> Fault:
    """Enable a fault now (the first call fails when ``once``, else every call until
    :func:`disable`). Returns the :class:`Fault` (its ``calls``/``fired`` counters)."""
    return Fault(point, err, once=once).enable()


def disable(point: str) -> None:
    """Disable the fault at ``point`` (short or full name); a no-op when it is not enabled."""
    fault = _enabled.get(point_name(point))
    if fault is not None:
        fault.disable()
    elif _lib is not None:
        _lib.fiu_disable(point_name(point).encode())


__all__ = [
    "POINTS", "INSTALL_HINT", "Fault", "available", "command_prefix", "enable", "disable",
    "under_fiu_run", "libfiu", "point_name", "errno_value",
]


def last_json_object(text: str) -> Optional[Dict[str, Any]]:
    """The last line of ``text`` that is a JSON object, or None (a child's result line)."""
    import json

    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None
