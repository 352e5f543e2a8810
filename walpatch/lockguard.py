"""The lock guard: the application's own open()/close() of a database file in use must not
drop SQLite's locks (design.md sections 5 and 8, issue 12).

POSIX advisory locks belong to a (process, inode) pair: closing *any* descriptor of a file
releases every lock the process holds on it. SQLite keeps its own descriptors open while a lock
needs them; nothing does that for the application's. A header sniff, ``shutil.copy`` or a
checksum of the database in the same process lets another process believe it is alone: it
checkpoints and deletes ``-wal``/``-shm`` under this process's connection (committed rows are
lost, ``integrity_check`` says ok), or takes a write lock this process holds.

While this process has a guarded connection to a file, that file and its ``-wal``, ``-shm`` and
``-journal`` are *live*, identified by ``(st_dev, st_ino)``. The guard wraps ``builtins.open``
(= ``io.open``; ``pathlib``, ``shutil``, ``os.fdopen`` go through it), ``os.open`` and
``os.close``. It is armed at the first guarded ``connect()`` (never at interpreter start):

* ``protect``: the application never gets a descriptor that can be closed. An open of a live
  file is served from a *parked* descriptor (opened once, reused after ``lseek(0)``, kept open
  with close-on-exec); the file object is built on it with ``closefd=False``, and ``os.close``
  of a parked descriptor only marks it free. So 10,000 header sniffs use one descriptor. Parked
  descriptors are really closed when the last guarded connection to the file closes.
* ``detect``: nothing changes; each such open/close is an event naming the call site and the
  locks that the close releases.

Cost when no guarded connection is open: one truthiness test per call. Otherwise the identity
of a path is memoized per path string for ``_MEMO_TTL`` seconds (a ``stat`` on a miss), except
names that end like a live file's name, which are always re-checked; ``os.close`` does an
``fstat``. Fail open: an internal error falls back to the original function (one line on
stderr, once).
"""
from __future__ import annotations

import builtins
import errno
import io
import logging
import os
import sys
import threading
import time
from stat import S_ISREG
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union
from weakref import ref

from . import events, runtime

PROTECT = "protect"
DETECT = "detect"
OFF = "off"
MODES = (PROTECT, DETECT, OFF)

SUFFIXES = ("-wal", "-shm", "-journal")
#: Seconds a path string's (st_dev, st_ino) is trusted without a new stat.
_MEMO_TTL = 1.0
_MEMO_MAX = 4096
#: Parked descriptors in the whole process; beyond this the guard passes opens through
#: (an ERROR event): it must never make the application run out of descriptors.
MAX_PARKED = 256
#: open(2) flags that decide whether a parked descriptor can be handed out again.
_STATUS_MASK = (os.O_ACCMODE | os.O_APPEND | getattr(os, "O_NONBLOCK", 0)
                | getattr(os, "O_SYNC", 0) | getattr(os, "O_DSYNC", 0)
                | getattr(os, "O_DIRECT", 0) | getattr(os, "O_NOATIME", 0))
_O_PATH = getattr(os, "O_PATH", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

Ident = Tuple[int, int]

# The originals (taken at import: walpatch's own file operations use these).
_open = builtins.open
_os_open = os.open
_os_close = os.close

_lock = threading.RLock()
_state = threading.local()  # .busy: inside the guard (an event's logging may open files)

#: Truthy while some guarded connection may be open: the only test on the fast path.
#: Keyed by a weak reference to the connection.
#: id(connection) -> (weak reference, database path until the first check resolves it
#: into a _Conn).
_live: Dict[int, Tuple[Any, Union[str, "_Conn"]]] = {}
_sweep_at = 64
#: (st_dev, st_ino) -> the live file it is (database or sidecar)
_idents: Dict[Ident, "_File"] = {}
#: path string -> (ident or None, expiry)
_memo: Dict[Any, Tuple[Optional[Ident], float]] = {}
#: names (last path components) of live files, for str.endswith
_names: Tuple[str, ...] = ()
#: parked descriptors: fd -> entry
_table: Dict[int, "_Parked"] = {}

_pending = False  # a tracked connection whose file is not resolved yet
_monotonic = time.monotonic
_stat = os.stat
_fstat = os.fstat

_mode = OFF  # the effective mode while armed
_armed = False
_fork_handler = False
_failed_once = False
_sidecars_checked = 0.0
_orphans_checked = 0.0


class _Conn:
    """One guarded connection whose database file has been identified."""

    __slots__ = ("path", "db")

    def __init__(self, path: str, db: "_Db") -> None:
        self.path = path
        self.db = db


class _Db:
    """A live database file: how many guarded connections use it, its sidecars."""

    __slots__ = ("ident", "path", "users", "sidecars")

    def __init__(self, ident: Ident, path: str) -> None:
        self.ident = ident
        self.path = path  # realpath: SQLite names the sidecars after it
        self.users = 0
        self.sidecars: Dict[Ident, str] = {}


class _File:
    __slots__ = ("db", "path")

    def __init__(self, db: _Db, path: str) -> None:
        self.db = db
        self.path = path


class _Parked:
    """A descriptor the guard keeps open. Free when os.open's holder closed it and every file
    object built on it is closed or gone."""

    __slots__ = ("fd", "ident", "key", "db", "os_held", "raws", "orphan")

    def __init__(self, fd: int, ident: Ident, key: int, db: _Db) -> None:
        self.fd = fd
        self.ident = ident
        self.key = key
        self.db = db
        self.os_held = False
        self.raws: List[Any] = []
        self.orphan = False

    def free(self) -> bool:
        if self.os_held:
            return False
        for r in self.raws:
            raw = r()
            if raw is not None and not raw.closed:
                return False
        return True


# ---------------------------------------------------------------------------------------------
# registration (called by hooks.py at connect and by the guarded class's close())

def track(conn: Any, database: Any) -> None:
    """Record a new guarded connection to ``database`` (connect()'s first argument). Runs on
    every connect(): no system call (the path is resolved on the first check), no lock (dict
    operations are atomic)."""
    global _pending
    config = runtime.config
    if config is None or config.lock_guard == OFF:
        return
    try:
        if type(database) is str and database[:1] == "/":
            path = database  # the common case, without a call
        else:
            found = _database_path(database)
            if found is None:
                return
            path = found
        try:
            conn_ref = ref(conn)
        except TypeError:
            # A factory's instance re-classed by hooks.py whose class has __slots__ without
            # __weakref__: not tracked, so the lock guard does not cover it (README Limits).
            return
        key = id(conn)
        if key in _live or len(_live) >= _sweep_at:
            _sweep()  # connections dropped without close() (an id is reused only after)
        _live[key] = (conn_ref, path)
        _pending = True
        if _table:
            with _lock:
                _close_orphans()
        if not _armed:
            arm()
    except Exception as exc:  # noqa: BLE001 - fail open
        _internal_error(exc)


def closing(base_close: Callable[..., Any]) -> Callable[..., Any]:
    """A close() override: the original close first (SQLite releases its own locks), then
    the guard forgets the connection and closes the parked descriptors nobody needs now."""

    def close(self: Any) -> Any:
        result = base_close(self)
        if _live:
            entry = _live.pop(id(self), None)
            if entry is not None and entry[1].__class__ is _Conn:
                _release(entry[1].db)
        return result

    for attr in ("__name__", "__qualname__", "__doc__"):
        try:
            setattr(close, attr, getattr(base_close, attr))
        except (AttributeError, TypeError):
            pass
    close.__wrapped__ = base_close  # type: ignore[attr-defined]
    return close


def _sweep() -> None:
    """Forget connections that were garbage-collected without close() (SQLite closed their
    descriptors in their dealloc, so their parked descriptors can be closed now)."""
    global _sweep_at
    for key, (conn_ref, info) in list(_live.items()):
        if conn_ref() is None and _live.get(key, (None,))[0] is conn_ref:
            del _live[key]
            if isinstance(info, _Conn):
                _release(info.db)
    _sweep_at = max(64, 2 * len(_live))


def _release(db: "_Db") -> None:
    """One guarded connection to ``db`` is gone; after the last, its files are not live."""
    try:
        with _lock:
            db.users -= 1
            if db.users > 0:
                return
            # only this database's entries: an inode number of a deleted sidecar may belong
            # to another live file by now
            for ident in (db.ident, *db.sidecars):
                entry = _idents.get(ident)
                if entry is not None and entry.db is db:
                    del _idents[ident]
            _rebuild_names()
            for parked in list(_table.values()):
                if parked.db is db:
                    parked.orphan = True
            _close_orphans(force=True)
    except Exception as exc:  # noqa: BLE001 - fail open
        _internal_error(exc)


def _close_orphans(force: bool = False) -> None:
    """Really close the parked descriptors of files no guarded connection uses any more,
    unless another descriptor of the file is still open in this process (SQLite's own, in
    the middle of closing, or an unguarded connection's): its locks would go with them.
    Unless ``force``d (a release), at most once a second: it reads /proc/self/fd."""
    global _orphans_checked
    ready = [p for p in _table.values() if p.orphan and p.free()]
    if not ready:
        return
    now = _monotonic()
    if not force and now - _orphans_checked < _MEMO_TTL:
        return
    _orphans_checked = now
    busy = _idents_open_elsewhere({p.ident for p in ready})
    for parked in ready:
        if parked.ident not in busy and _table.get(parked.fd) is parked:
            del _table[parked.fd]
            _really_close(parked)


def _idents_open_elsewhere(idents: Set[Ident]) -> Set[Ident]:
    """Which of ``idents`` a descriptor other than the parked ones refers to (/proc/self/fd;
    where that cannot be read, all of them: keeping a descriptor is the safe side)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return set(idents)
    found: Set[Ident] = set()
    for name in names:
        if not name.isdigit() or int(name) in _table:
            continue
        try:
            st = os.stat("/proc/self/fd/" + name)  # follows the link: opens nothing
        except OSError:
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in idents:
            found.add(ident)
    return found


def _really_close(parked: _Parked) -> None:
    try:  # the number may have been reused if someone else closed it: check it is ours
        st = os.fstat(parked.fd)
        if (st.st_dev, st.st_ino) == parked.ident:
            _os_close(parked.fd)
    except OSError:
        pass


def _database_path(database: Any) -> Optional[str]:
    """The file behind connect()'s first argument, absolute (cwd of *now*), or None."""
    if database is None:
        return None
    try:
        name = os.fsdecode(os.fspath(database))
    except TypeError:
        return None
    if name in ("", ":memory:"):
        return None
    if name.startswith("file:") and not os.path.exists(name):
        from_uri = _uri_path(name)
        if from_uri is None:
            return None
        name = from_uri
    return name if os.path.isabs(name) else os.path.join(os.getcwd(), name)


def _uri_path(uri: str) -> Optional[str]:
    from urllib.parse import unquote  # only for URIs

    rest = uri[5:]
    rest, _, query = rest.partition("?")
    rest = rest.partition("#")[0]
    if "mode=memory" in query or rest in ("", ":memory:"):
        return None
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        if authority not in ("", "localhost"):
            return None
        rest = slash + path
    return unquote(rest) or None


def _resolve() -> None:
    """Give every newly tracked connection its identity (stat of its database file).
    ``_pending`` stays set until ``_idents`` and ``_names`` know the new files: while it is,
    other threads' lock-free checks take the careful path, which waits for ``_lock``
    (cleared first, a stat of the new file during ours passed as "not live")."""
    global _pending
    _sweep()
    for key, (conn_ref, path) in list(_live.items()):
        if not isinstance(path, str):
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue  # not created yet (or gone): still pending, tried again later
        ident = (st.st_dev, st.st_ino)
        found = _idents.get(ident)
        db = found.db if found is not None and found.db.ident == ident else None
        if db is None:
            db = _Db(ident, os.path.realpath(path))
            _idents[ident] = _File(db, db.path)
            _refresh_sidecars(db)
        if _live.get(key, (None,))[0] is conn_ref:  # not closed meanwhile
            db.users += 1
            _live[key] = (conn_ref, _Conn(path, db))
    _rebuild_names()
    _pending = False
    # track() stores its entry, then sets _pending: set before the line above, its entry
    # is seen here; after it, _pending stays set. Either way it is not lost.
    if any(info.__class__ is str for _, info in list(_live.values())):
        _pending = True


def _refresh_sidecars(db: _Db) -> None:
    """-wal/-shm/-journal come and go: stat them by name (the inodes SQLite holds stay)."""
    for suffix in SUFFIXES:
        path = db.path + suffix
        try:
            st = os.stat(path)
        except OSError:
            continue
        ident = (st.st_dev, st.st_ino)
        if ident not in db.sidecars:
            if suffix == "-journal":  # a new inode every transaction: keep only the latest
                for old in [i for i, p in db.sidecars.items() if p == path]:
                    del db.sidecars[old]
                    entry = _idents.get(old)
                    if entry is not None and entry.db is db:  # not another file's by now
                        del _idents[old]
            elif len(db.sidecars) > 16:
                continue
            db.sidecars[ident] = path
            _idents[ident] = _File(db, path)


def _refresh_all() -> None:
    global _sidecars_checked
    _sidecars_checked = time.monotonic()
    seen: Set[int] = set()
    _sweep()
    for _, conn in list(_live.values()):
        if isinstance(conn, _Conn) and id(conn.db) not in seen:
            seen.add(id(conn.db))
            _refresh_sidecars(conn.db)


def _rebuild_names() -> None:
    global _names
    names: Set[str] = set()
    for _, conn in list(_live.values()):
        path = conn if isinstance(conn, str) else conn.path
        base = os.path.basename(path)
        real = os.path.basename(conn.db.path) if isinstance(conn, _Conn) else base
        for name in {base, real}:
            names.add(name)
            names.update(name + s for s in SUFFIXES)
    names_now = tuple(sorted(names))
    if names_now != _names:
        _names = names_now
        _memo.clear()  # the memo never holds a name that ends like a live file's


# ---------------------------------------------------------------------------------------------
# identification

def _live_file(path: Any, follow: bool = True) -> Optional[Tuple[Ident, _File]]:
    """The live file ``path`` names, or None. Must be called with ``_lock`` held."""
    if _pending:
        _resolve()
    if not _idents:
        return None
    name = path if isinstance(path, str) else None
    if name is None:
        try:
            name = os.fsdecode(os.fspath(path))
        except TypeError:
            return None
    now = time.monotonic()
    hit = None
    if follow and not name.endswith(_names):
        try:
            hit = _memo.get(path)
        except TypeError:
            hit = None
    if hit is not None and hit[1] >= now:
        ident = hit[0]
    else:
        if name.endswith(_names) or now - _sidecars_checked > _MEMO_TTL:
            _refresh_all()
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except (OSError, ValueError, TypeError):
            return None
        ident = (st.st_dev, st.st_ino) if S_ISREG(st.st_mode) else None
        if follow and not name.endswith(_names):
            try:
                if len(_memo) >= _MEMO_MAX:
                    _memo.clear()
                _memo[path] = (ident, now + _MEMO_TTL)
            except TypeError:
                pass
    if ident is None:
        return None
    found = _idents.get(ident)
    return (ident, found) if found is not None else None


def _live_fd(fd: int) -> Optional[Tuple[Ident, _File]]:
    if _pending:
        _resolve()
    if not _idents:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if not S_ISREG(st.st_mode):
        return None
    ident = (st.st_dev, st.st_ino)
    found = _idents.get(ident)
    if found is None and time.monotonic() - _sidecars_checked > _MEMO_TTL:
        _refresh_all()
        found = _idents.get(ident)
    return (ident, found) if found is not None else None


# ---------------------------------------------------------------------------------------------
# the wrappers

class _AppError(Exception):
    """An error of the original function, to be raised to the application unchanged."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def guarded_open(*args: Any, **kwargs: Any) -> Any:
    # *args/**kwargs: a wrong call raises the original's own TypeError, word for word.
    if _live:
        file = args[0] if args else kwargs.get("file")
        try:  # the hot path, inline: a path string seen less than _MEMO_TTL ago, not live
            hit = _memo.get(file)
        except TypeError:
            hit = None
        if (hit is None or hit[1] < _monotonic() or hit[0] in _idents or _pending) \
                and _needs_check(file) and _armed and not getattr(_state, "busy", False):
            try:
                try:
                    bound = _open_arguments(*args, **kwargs)
                except TypeError:
                    result = None  # the original raises its own error
                else:
                    result = _guard_open(*bound)
            except _AppError as exc:
                raise exc.error from None
            except Exception as exc:  # noqa: BLE001 - fail open
                _internal_error(exc)
            else:
                if result is not None:
                    return result
    return _open(*args, **kwargs)


def _needs_check(file: Any) -> bool:
    """False when ``file`` is certainly not a live file: its identity, memoized less than
    _MEMO_TTL ago or found now with one stat, is not live. True sends the call down the
    careful path (live, unknown, a name that ends like a live file's, or sidecars to re-stat).
    """
    try:
        hit = _memo.get(file)
        now = _monotonic()
        if hit is not None and hit[1] >= now:
            return hit[0] in _idents or _pending
        if (_pending or type(file) is not str or file.endswith(_names)
                or now - _sidecars_checked > _MEMO_TTL):
            return True
        try:
            st = _stat(file)
        except (OSError, ValueError):
            return False  # open() raises (or creates a new file, which is not live)
        ident = (st.st_dev, st.st_ino) if S_ISREG(st.st_mode) else None
        if len(_memo) >= _MEMO_MAX:
            _memo.clear()
        _memo[file] = (ident, now + _MEMO_TTL)
        return ident in _idents
    except Exception:  # noqa: BLE001 - unhashable, or anything odd: the careful path decides
        return True


def _open_arguments(file: Any, mode: str = "r", buffering: int = -1, encoding: Any = None,
                    errors: Any = None, newline: Any = None, closefd: bool = True,
                    opener: Any = None) -> Tuple[Any, ...]:
    return file, mode, buffering, encoding, errors, newline, closefd, opener


def _os_open_arguments(path: Any, flags: int, mode: int = 0o777, *,
                       dir_fd: Any = None) -> Tuple[Any, ...]:
    return path, flags, mode, dir_fd


def guarded_os_open(*args: Any, **kwargs: Any) -> int:
    if _live and _armed and _needs_check(args[0] if args else kwargs.get("path")) \
            and not getattr(_state, "busy", False):
        try:
            try:
                bound = _os_open_arguments(*args, **kwargs)
            except TypeError:
                fd = None  # the original raises its own error
            else:
                fd = _guard_os_open(*bound)
        except _AppError as exc:
            raise exc.error from None
        except Exception as exc:  # noqa: BLE001 - fail open
            _internal_error(exc)
        else:
            if fd is not None:
                return fd
    return _os_open(*args, **kwargs)


def guarded_os_close(*args: Any, **kwargs: Any) -> None:
    if (_live or _table) and _armed and len(args) == 1 and not kwargs \
            and _close_needs_check(args[0]) and not getattr(_state, "busy", False):
        try:
            handled = _guard_close(args[0])
        except _AppError as exc:
            raise exc.error from None
        except Exception as exc:  # noqa: BLE001 - fail open
            _internal_error(exc)
        else:
            if handled:
                return None
    return _os_close(*args, **kwargs)


def _same_file(fd: int, ident: Ident) -> bool:
    try:
        st = _fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ident


def _close_needs_check(fd: Any) -> bool:
    """False when ``fd`` is certainly not a descriptor of a live file (one fstat)."""
    if type(fd) is not int or fd in _table or _pending or not _live:
        return True
    try:
        st = _fstat(fd)
    except OSError:
        return False  # the original raises its own error
    return ((st.st_dev, st.st_ino) in _idents
            or _monotonic() - _sidecars_checked > _MEMO_TTL)


def _flags_for(mode: Any) -> Optional[int]:
    """open(2) flags for an open() mode string, as FileIO computes them; None if unusual
    (then the original open() runs and raises its own error)."""
    if not isinstance(mode, str) or len(set(mode)) != len(mode) or set(mode) - set("rwxabt+"):
        return None
    kinds = [c for c in mode if c in "rwxa"]
    if len(kinds) != 1:
        return None
    kind = kinds[0]
    plus = "+" in mode
    flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
             "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
             "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND}[kind]
    if plus:
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags | _O_CLOEXEC


def _guard_open(file: Any, mode: Any, buffering: Any, encoding: Any, errors: Any,
                newline: Any, closefd: Any, opener: Any) -> Any:
    if isinstance(file, int) and not isinstance(file, bool):
        return _guard_fdopen(file, mode, buffering, encoding, errors, newline, closefd)
    if not closefd:
        return None  # the original raises "Cannot use closefd=False with file name"
    flags = _flags_for(mode)
    if flags is None:
        return None
    with _lock:
        _state.busy = True
        try:
            found = _live_file(file)
            if found is None:
                return None
            ident, live = found
            writing = flags & os.O_ACCMODE != os.O_RDONLY
            site = _caller()
            if _mode != PROTECT:
                _event(DETECT, "open", live, site, writing)
                return None
            fd, parked = _acquire(os.fspath(file), flags, 0o666, None, ident, live, opener)
            if parked is None:
                _event("limit", "open", live, site, writing)
                return _wrap_fd(fd, file, mode, buffering, encoding, errors, newline, True)
            _event("parked", "open", live, site, writing)
        finally:
            _state.busy = False
    try:
        f = _open(fd, mode, buffering, encoding, errors, newline, False, None)
    except BaseException as exc:
        parked.os_held = False  # back to the pool, free
        raise _AppError(exc) from None
    raw = getattr(getattr(f, "buffer", f), "raw", getattr(f, "buffer", f))
    try:
        raw.name = os.fspath(file)  # what open() names it
    except (AttributeError, TypeError):
        pass
    parked.raws = [r for r in parked.raws if r() is not None and not r().closed]
    parked.raws.append(ref(raw))
    parked.os_held = False
    return f


def _wrap_fd(fd: int, file: Any, mode: Any, buffering: Any, encoding: Any, errors: Any,
             newline: Any, closefd: bool) -> Any:
    try:
        f = _open(fd, mode, buffering, encoding, errors, newline, closefd, None)
    except BaseException as exc:
        _os_close(fd)
        raise _AppError(exc) from None
    raw = getattr(getattr(f, "buffer", f), "raw", getattr(f, "buffer", f))
    try:
        raw.name = os.fspath(file)  # what open() names it
    except (AttributeError, TypeError):
        pass
    return f


def _guard_fdopen(fd: int, mode: Any, buffering: Any, encoding: Any, errors: Any,
                  newline: Any, closefd: Any) -> Any:
    """open(fd) / os.fdopen(fd): the file object's close() would close the descriptor."""
    if not closefd:
        return None
    with _lock:
        _state.busy = True
        try:
            parked = _table.get(fd)
            if parked is None:
                found = _live_fd(fd)
                if found is None:
                    return None
                ident, live = found
                site = _caller()
                if _mode != PROTECT:
                    _event(DETECT, "fdopen", live, site, False)
                    return None
                parked = _park_foreign(fd, ident, live)
                if parked is None:
                    _event("limit", "fdopen", live, site, False)
                    return None
                _event("parked", "fdopen", live, site, False)
        finally:
            _state.busy = False
    try:
        f = _open(fd, mode, buffering, encoding, errors, newline, False, None)
    except BaseException as exc:
        raise _AppError(exc) from None
    raw = getattr(getattr(f, "buffer", f), "raw", getattr(f, "buffer", f))
    parked.raws.append(ref(raw))
    parked.os_held = False  # the file object holds it now
    return f


def _guard_os_open(path: Any, flags: Any, mode: Any, dir_fd: Any) -> Optional[int]:
    if type(flags) is not int or dir_fd is not None or (_O_PATH and flags & _O_PATH):
        return None  # O_PATH descriptors hold no locks; dir_fd: not guarded (documented)
    with _lock:
        _state.busy = True
        try:
            found = _live_file(path, follow=not flags & getattr(os, "O_NOFOLLOW", 0))
            if found is None:
                return None
            ident, live = found
            writing = flags & os.O_ACCMODE != os.O_RDONLY
            site = _caller()
            if _mode != PROTECT:
                _event(DETECT, "os.open", live, site, writing)
                return None
            fd, parked = _acquire(path, flags, mode, None, ident, live, None)
            _event("parked" if parked is not None else "limit", "os.open", live, site, writing)
            return fd
        finally:
            _state.busy = False


def _guard_close(fd: Any) -> bool:
    if type(fd) is not int:
        return False
    with _lock:
        _state.busy = True
        try:
            parked = _table.get(fd)
            if parked is not None and not _same_file(fd, parked.ident):
                del _table[fd]  # closed behind the guard's back and the number reused
                parked = None
            if parked is not None:
                if parked.orphan:  # no guarded connection left: really close it, unless
                    parked.os_held = False  # another descriptor of the file is open
                    if parked.free() and not _idents_open_elsewhere({parked.ident}):
                        del _table[fd]
                        return False
                    return True
                if parked.free():  # closed already, from the application's point of view
                    raise _AppError(OSError(errno.EBADF, os.strerror(errno.EBADF)))
                parked.os_held = False
                if parked.free():
                    os.set_inheritable(fd, False)  # "closed": must not reach an exec'd child
                return True
            if not _live:
                _close_orphans()  # of connections dropped without close()
                return False
            found = _live_fd(fd)
            if found is None:
                return False
            ident, live = found
            site = _caller()
            if _mode != PROTECT:
                _event(DETECT, "os.close", live, site, False)
                return False
            parked = _park_foreign(fd, ident, live)
            _event("parked" if parked is not None else "limit", "os.close", live, site, False)
            return parked is not None
        finally:
            _state.busy = False


def _acquire(path: Any, flags: int, mode: int, dir_fd: Any, ident: Ident, live: _File,
             opener: Any) -> Tuple[int, Optional[_Parked]]:
    """A descriptor of the live file for ``flags``: a free parked one (rewound, truncated
    for O_TRUNC) or a new one, which is parked. (fd, None) when the limit is reached."""
    key = flags & _STATUS_MASK
    if not flags & os.O_EXCL and opener is None:  # an opener is always called: it may differ
        for parked in _table.values():
            if parked.ident == ident and parked.key == key and not parked.orphan \
                    and parked.free():
                try:
                    os.set_inheritable(parked.fd, False)  # as a new descriptor is
                    os.lseek(parked.fd, 0, os.SEEK_SET)
                    if flags & os.O_TRUNC:
                        os.ftruncate(parked.fd, 0)
                except OSError as exc:
                    raise _AppError(exc) from None
                parked.raws = []
                parked.os_held = True
                events.count("lock_guard_reused")
                return parked.fd, parked
    try:
        if opener is not None:
            fd = opener(path, flags)
        else:
            fd = _os_open(path, flags | _O_CLOEXEC, mode)
    except BaseException as exc:
        raise _AppError(exc) from None
    if len(_table) >= MAX_PARKED:
        return fd, None
    parked = _Parked(fd, ident, key, live.db)
    parked.os_held = True
    _table[fd] = parked
    return fd, parked


def _park_foreign(fd: int, ident: Ident, live: _File) -> Optional[_Parked]:
    """Keep a descriptor the guard did not open (from C code, or opened before the
    connection): from now on it is parked like ours."""
    if len(_table) >= MAX_PARKED:
        return None
    try:
        import fcntl

        key = fcntl.fcntl(fd, fcntl.F_GETFL) & _STATUS_MASK
        os.set_inheritable(fd, False)
    except (OSError, ImportError):
        key = -1
    parked = _Parked(fd, ident, key, live.db)
    _table[fd] = parked
    return parked


# ---------------------------------------------------------------------------------------------
# events

_STDLIB = tuple({os.path.dirname(os.__file__) + os.sep})
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller() -> str:
    """file:line of the application's call: the first frame outside walpatch and the
    standard library (shutil, pathlib, ...), else the nearest outside walpatch."""
    frame: Any = sys._getframe(1)
    nearest = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_HERE):
            if nearest is None:
                nearest = f"{filename}:{frame.f_lineno}"
            if not filename.startswith(_STDLIB) or "site-packages" in filename:
                return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return nearest or "?"


def _locks_on(ident: Ident) -> str:
    """What this process holds on the inode, from /proc/locks (Linux), e.g. "2 READ"."""
    pid = str(os.getpid())
    counts: Dict[str, int] = {}
    try:
        with _open("/proc/locks", "rb") as f:
            lines = f.read().decode("ascii", "replace").splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        parts = line.split()
        if "->" in parts:
            continue
        if len(parts) >= 6 and parts[1] in ("POSIX", "OFDLCK") and parts[4] == pid:
            dev_ino = parts[5].split(":")
            if len(dev_ino) == 3 and int(dev_ino[2]) == ident[1]:
                counts[parts[3]] = counts.get(parts[3], 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"


def _event(action: str, op: str, live: _File, site: str, writing: bool) -> None:
    if writing:
        events.count("lock_guard_writes")
    events.count({"parked": "lock_guard_parked", DETECT: "lock_guard_detected"}.get(
        action, "lock_guard_unprotected"))
    key = f"{site}|{op}|{action}"
    if (key, live.path) in _seen:
        return  # once per call site (still counted)
    _seen.add((key, live.path))
    ident = next((i for i, f in _idents.items() if f is live), None)
    held = _locks_on(ident) if ident else "unknown"
    what = "the database" if live.path == live.db.path else "a sidecar of the database"
    if action == "parked":
        text = (f"walpatch: {op} of {live.path} ({what} {live.db.path}, in use by SQLite in "
                f"this process) at {site}: served from a parked descriptor, so closing it does "
                f"not release this process's locks ({held})")
    elif action == DETECT:
        text = (f"walpatch: {op} of {live.path} ({what} {live.db.path}, in use by SQLite in "
                f"this process) at {site}: closing this descriptor releases every lock this "
                f"process holds on the file ({held}); lock_guard=protect would keep them")
    else:
        text = (f"walpatch: {op} of {live.path} at {site}: {MAX_PARKED} descriptors are "
                "parked already; this one is NOT protected, its close releases SQLite's locks")
    level = logging.ERROR if writing or action == "limit" else logging.WARNING
    if writing:
        text += "; the application WRITES to a database file SQLite has open"
    events.emit("lock-guard", level, text, dedupe_key=key, file=live.path,
                database=live.db.path, caller=site, action=action, operation=op,
                locks=held, writing=writing or None)


_seen: Set[Tuple[str, str]] = set()


def _internal_error(exc: BaseException) -> None:
    global _failed_once
    if not _failed_once:
        _failed_once = True
        try:
            sys.stderr.write(f"walpatch: lock guard internal error, passing through: {exc!r}\n")
        except Exception:  # noqa: BLE001
            pass
    events.count("lock_guard_errors")


# ---------------------------------------------------------------------------------------------
# arming

def _effective_mode() -> str:
    config = runtime.config
    if config is None:
        return OFF
    mode = config.lock_guard
    if mode == PROTECT and config.observe:
        return DETECT  # observe mode changes nothing
    return mode


def _like(function: Any, original: Any) -> Any:
    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        try:
            setattr(function, attr, getattr(original, attr))
        except (AttributeError, TypeError):
            pass
    function.__wrapped__ = original
    return function


def _patch_pathlib_accessor(current: Any, new: Any) -> None:
    """Python 3.10's pathlib took ``io.open`` into ``_NormalAccessor.open`` at import, so
    Path.open/read_bytes/read_text never look up the wrapped one: swap it there too (only
    when it is ``current``; other versions have no such attribute or look io.open up)."""
    pathlib = sys.modules.get("pathlib")
    accessor: Any = getattr(pathlib, "_NormalAccessor", None) if pathlib else None
    if accessor is None:
        return
    held = accessor.__dict__.get("open")
    if getattr(held, "__func__", held) is current:
        accessor.open = staticmethod(new)


def arm() -> None:
    """Install the wrappers (at the first tracked connection), or apply a new mode."""
    global _armed, _mode, _fork_handler
    with _lock:
        mode = _effective_mode()
        if mode == OFF:
            disarm()
            return
        _mode = mode
        if not _armed:
            builtins.open = io.open = _OPEN  # type: ignore[assignment]
            os.open = _OS_OPEN  # type: ignore[assignment]
            os.close = _OS_CLOSE  # type: ignore[assignment]
            _patch_pathlib_accessor(_open, _OPEN)
            _armed = True
        if not _fork_handler and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _fork_handler = True


def disarm() -> None:
    """Put the originals back where they are still ours. Parked descriptors stay parked and
    are closed with their last connection (closing them now would drop its locks)."""
    global _armed
    with _lock:
        if builtins.open is _OPEN:
            builtins.open = _open
        if io.open is _OPEN:
            io.open = _open
        if os.open is _OS_OPEN:
            os.open = _os_open
        if os.close is _OS_CLOSE:
            os.close = _os_close
        _patch_pathlib_accessor(_OPEN, _open)
        _armed = False


def apply() -> None:
    """install() with new settings: re-arm with the new mode if the guard is in use."""
    if _live and _effective_mode() != OFF:
        arm()
    else:
        disarm()


def _after_fork_in_child() -> None:
    # The child holds no POSIX locks (they are not inherited): its free parked descriptors
    # can be closed, and the parent's connections are not the child's to guard.
    global _lock
    _lock = threading.RLock()
    for parked in list(_table.values()):
        if parked.free():
            try:
                _os_close(parked.fd)
            except OSError:
                pass
    _table.clear()
    _live.clear()
    _idents.clear()
    _memo.clear()


def parked_descriptors() -> List[int]:
    """The descriptors the guard keeps open now (for tests and `status`)."""
    with _lock:
        return sorted(_table)


_OPEN = _like(guarded_open, _open)
_OS_OPEN = _like(guarded_os_open, _os_open)
_OS_CLOSE = _like(guarded_os_close, _os_close)
