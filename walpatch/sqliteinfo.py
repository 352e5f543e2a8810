"""Which SQLite is underneath each DB-API module, and what walpatch does about the WAL-reset bug.

The WAL-reset bug (sqlite.org/wal.html#walresetbug, documented March 2026; design.md §8): a
race between a checkpoint and a commit that resets the WAL can corrupt a WAL database or lose
committed transactions when two or more connections write and checkpoint one file. It is in
every SQLite from 3.7.0 (the first with WAL) to 3.51.2; fixed in 3.51.3 and in the backports
3.44.6 and 3.50.7. A distribution may backport the fix without changing the version number,
hence the operator's ``accept``.

Three parts, kept apart from the hot path:

* ``wal_reset_bug()``: the verdict for a version string (pure).
* ``describe_module()`` / ``collect()``: version, ``sqlite_source_id()`` and the shared library
  actually loaded, for ``walpatch status`` (not used by the guard at run time: it imports
  ctypes and reads ``/proc/self/maps``).
* the run-time hooks the guard calls: ``watch_connect`` (at connect, a dict lookup once the
  module needs no more watching), ``before_wal_request`` (the ``warn``/``avoid`` setting) and
  ``keep`` (``on_refusal=keep``). Nothing runs at import or interpreter start.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import events, runtime

AFFECTED = "affected"
FIXED = "fixed"
ACCEPTED = "accepted"
NOT_APPLICABLE = "not-applicable"  # before 3.7.0: no WAL at all
UNKNOWN = "unknown"  # a version string that cannot be read: treated like "affected"

WARN, AVOID, ACCEPT = "warn", "avoid", "accept"
RAISE, KEEP = "raise", "keep"

FIRST_AFFECTED = (3, 7, 0)
FIXED_IN = ("3.51.3", "3.50.7", "3.44.6")
_FIXED_FROM = (3, 51, 3)
#: release line -> first fixed release on that line (the backports)
_BACKPORTS = {(3, 44): (3, 44, 6), (3, 50): (3, 50, 7)}

EVENT = "sqlite-wal-reset-bug"
SILENCE = "WALPATCH_WAL_RESET_BUG=accept"


def parse_version(text: Any) -> Optional[Tuple[int, int, int]]:
    """(major, minor, patch) of "3.40.1" (extra parts such as "3.44.6.1" are ignored)."""
    parts = str(text).strip().split(".")
    if len(parts) < 2:
        return None
    try:
        numbers = [int(p) for p in parts[:3]]
    except ValueError:
        return None
    while len(numbers) < 3:
        numbers.append(0)
    return numbers[0], numbers[1], numbers[2]


def wal_reset_bug(version: Any, setting: str = WARN) -> str:
    """The WAL-reset-bug verdict for SQLite ``version`` under the ``wal_reset_bug`` setting.

    "affected" (3.7.0 to 3.51.2, except 3.44.6+ on the 3.44 line and 3.50.7+ on the 3.50
    line), "fixed", "not-applicable" (before 3.7.0 there is no WAL), "unknown" (unreadable
    version); ``accept`` turns "affected" and "unknown" into "accepted".
    """
    parsed = parse_version(version)
    if parsed is None:
        verdict = UNKNOWN
    elif parsed < FIRST_AFFECTED:
        verdict = NOT_APPLICABLE
    elif parsed >= _FIXED_FROM:
        verdict = FIXED
    else:
        backport = _BACKPORTS.get(parsed[:2])
        verdict = FIXED if backport is not None and parsed >= backport else AFFECTED
    if setting == ACCEPT and verdict in (AFFECTED, UNKNOWN):
        return ACCEPTED
    return verdict


def needs_attention(verdict: str) -> bool:
    """True for a build that may have the bug and that the operator has not accepted."""
    return verdict in (AFFECTED, UNKNOWN)


def advice(version: str, avoiding: bool = False) -> str:
    """The fix versions and what the operator can do (one sentence, no final period)."""
    return (f"SQLite {version} has the WAL-reset bug (sqlite.org/wal.html#walresetbug: a WAL "
            "database written and checkpointed by several connections can be corrupted or "
            f"lose committed transactions), fixed in {', '.join(FIXED_IN)}. Load a fixed "
            "SQLite (`walpatch status` shows the library this interpreter loads)"
            + ("" if avoiding else ", set WALPATCH_WAL_RESET_BUG=avoid to keep files that are "
               "not WAL out of WAL,")
            + f" or set {SILENCE} if this build carries the fix (silences this warning)")


def setting_now() -> str:
    config = runtime.config
    return getattr(config, "wal_reset_bug", WARN) if config is not None else WARN


# --------------------------------------------------------------------------------------------
# Which module, which SQLite (for `walpatch status`)
# --------------------------------------------------------------------------------------------

#: DB-API family -> (its DB-API module, its C extension module)
MODULES = {
    "sqlite3": ("sqlite3.dbapi2", "_sqlite3"),
    "pysqlite3": ("pysqlite3.dbapi2", "pysqlite3._sqlite3"),
    "sqlean": ("sqlean.dbapi2", "sqlean._sqlite3"),
}
MAPS = "/proc/self/maps"


def parse_maps(text: str) -> List[Tuple[int, int, str]]:
    """(start, end, path) of each file-backed mapping in a /proc/PID/maps text (pure)."""
    out: List[Tuple[int, int, str]] = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        start, _, end = parts[0].partition("-")
        try:
            out.append((int(start, 16), int(end, 16), parts[5].rstrip()))
        except ValueError:
            continue
    return out


def _mapped_file(maps: List[Tuple[int, int, str]], address: int) -> Optional[str]:
    for start, end, path in maps:
        if start <= address < end:
            return path
    return None


def source_id_of(dbapi: ModuleType) -> str:
    """``sqlite_source_id()`` through a ``:memory:`` connection made directly from the
    module's Connection class: no file, and not through the hooked ``connect``."""
    conn = dbapi.Connection(":memory:")
    try:
        return str(conn.execute("select sqlite_source_id()").fetchone()[0])
    finally:
        conn.close()


def _sourceid_in(path: str) -> Tuple[Optional[int], Optional[str]]:
    """(address, value) of ``sqlite3_sourceid`` as the already loaded object ``path`` and its
    dependencies resolve it; RTLD_NOLOAD: nothing new is ever loaded."""
    import ctypes

    lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    fn = lib.sqlite3_sourceid
    fn.restype = ctypes.c_char_p
    fn.argtypes = []
    address = ctypes.cast(fn, ctypes.c_void_p).value
    value = fn()
    return address, value.decode("utf-8", "replace") if value else None


def find_library(extension: Optional[str], source_id: str, maps_text: str
                 ) -> Tuple[Optional[str], str]:
    """(the file that holds the SQLite this module runs, how that was established).

    The extension module's own ``sqlite3_sourceid`` (as its dependencies resolve it) is
    located in the process's mappings; its answer must equal the module's
    ``sqlite_source_id()``. Otherwise every mapped ``libsqlite3*`` is asked the same.
    """
    maps = parse_maps(maps_text)
    tried: List[str] = []
    if extension:
        try:
            address, value = _sourceid_in(extension)
        except (OSError, AttributeError, ValueError) as exc:
            tried.append(f"{os.path.basename(extension)}: {exc}")
        else:
            path = _mapped_file(maps, address or 0)
            if path and value == source_id:
                how = ("statically linked into the extension module" if
                       os.path.realpath(path) == os.path.realpath(extension) else
                       "shared library the extension module links")
                return path, how
            tried.append(f"{os.path.basename(extension)} resolves another SQLite ({value})")
    seen = set()
    for _, _, path in maps:
        if path in seen or not os.path.basename(path).startswith("libsqlite3"):
            continue
        seen.add(path)
        try:
            _, value = _sourceid_in(path)
        except (OSError, AttributeError, ValueError):
            continue
        if value == source_id:
            return path, "a mapped libsqlite3 with the module's source id"
    return None, "not found (" + ("; ".join(tried) or "no libsqlite3 mapped") + ")"


def describe_module(family: str, setting: str = WARN, maps_path: str = MAPS) -> Dict[str, Any]:
    """Everything `walpatch status` shows for one DB-API family (imports it)."""
    import importlib

    dbapi_name, ext_name = MODULES[family]
    out: Dict[str, Any] = {"module": family, "version": None, "source_id": None,
                           "library": None, "library_how": None, "extension": None,
                           "wal_reset_bug": None, "fixed_in": list(FIXED_IN), "error": None}
    try:
        dbapi = importlib.import_module(dbapi_name)
        out["version"] = str(dbapi.sqlite_version)
        out["wal_reset_bug"] = wal_reset_bug(out["version"], setting)
        out["source_id"] = source_id_of(dbapi)
        ext = sys.modules.get(ext_name)
        out["extension"] = getattr(ext, "__file__", None)
    except Exception as exc:  # a broken drop-in: say so, do not fail the status command
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    try:
        with open(maps_path, "r", errors="replace") as f:  # not a database file
            maps_text = f.read()
    except OSError as exc:
        out["library_how"] = f"cannot read {maps_path}: {exc.strerror or exc}"
        return out
    try:
        out["library"], out["library_how"] = find_library(out["extension"], out["source_id"],
                                                           maps_text)
    except Exception as exc:  # ctypes missing or refusing: the rest stays true
        out["library_how"] = f"could not be established: {type(exc).__name__}: {exc}"
    return out


def installed_families() -> List[str]:
    """sqlite3, and the drop-ins that are importable in this environment."""
    import importlib.util

    out = ["sqlite3"]
    for family in ("pysqlite3", "sqlean"):
        try:
            if importlib.util.find_spec(family) is not None:
                out.append(family)
        except (ImportError, ValueError):
            continue
    return out


def collect(setting: str = WARN) -> List[Dict[str, Any]]:
    return [describe_module(family, setting) for family in installed_families()]


def collect_loaded(setting: str = WARN) -> List[Dict[str, Any]]:
    """Like collect(), for the DB-API modules this process has already imported only: what
    ``walpatch.status()`` reports inside an application, which must not import a drop-in
    (and so hook it) just because someone asked for the status."""
    return [describe_module(family, setting) for family in installed_families()
            if MODULES[family][0] in sys.modules]


def interpreter_verdict(setting: str) -> Dict[str, Any]:
    """This interpreter's sqlite3: version and verdict (for `check` and `probe`)."""
    import sqlite3

    verdict = wal_reset_bug(sqlite3.sqlite_version, setting)
    return {"module": "sqlite3", "version": sqlite3.sqlite_version, "wal_reset_bug": verdict,
            "fixed_in": list(FIXED_IN)}


def cli_line(version: str) -> str:
    """The line `check` and `probe` print when this interpreter's SQLite is affected."""
    return (f"SQLite {version} (this interpreter's sqlite3) has the WAL-reset bug; fixed in "
            f"{', '.join(FIXED_IN)} (README, \"The WAL-reset bug\"; `walpatch status`)")


# --------------------------------------------------------------------------------------------
# Run time: one warning per process and module
# --------------------------------------------------------------------------------------------

_lock = threading.Lock()
_warned: Dict[str, bool] = {}  # family -> the event was emitted in this process
_families: Dict[int, Tuple[str, str]] = {}  # id(kit.error) -> (family, sqlite version)
#: family -> the config under which connects need no more watching (event done, or unaffected)
_quiet_for: Dict[str, Any] = {}
_checked_paths: Dict[Any, None] = {}  # connect() arguments looked at
_CHECKED_MAX = 1024


def reset() -> None:
    """Forget what was warned about (tests, like events.reset())."""
    with _lock:
        _warned.clear()
        _quiet_for.clear()
        _checked_paths.clear()


def _family_of_kit(kit: Any) -> Tuple[str, str]:
    """(family, SQLite version) of the DB-API module a guard Kit was made for."""
    key = id(kit.error)
    found = _families.get(key)
    if found is None:
        family = kit.error.__module__.split(".")[0]
        dbapi = sys.modules.get(MODULES.get(family, (family,))[0]) or sys.modules.get(family)
        found = (family, str(getattr(dbapi, "sqlite_version", "?")))
        _families[key] = found
    return found


def _warn_once(family: str, version: str, path: str, how: str) -> None:
    """The sqlite-wal-reset-bug event, once per process and module (under warn/avoid)."""
    if _warned.get(family):
        return
    with _lock:
        if _warned.get(family):
            return
        _warned[family] = True
    events.count("wal_reset_bug_warnings")
    events.emit(
        EVENT, logging.WARNING,
        f"walpatch: this process uses WAL through {family} ({how}: {path}). "
        f"{advice(version, avoiding=setting_now() == AVOID)}",
        module=family, sqlite_version=version, fixed_in=list(FIXED_IN), file=path,
        setting=setting_now(), silence=SILENCE, outcome="warned")


def note_wal_use(kit: Any, path: str, how: str = "a WAL request") -> None:
    family, version = _family_of_kit(kit)
    if _warned.get(family):
        return
    if setting_now() == ACCEPT or not needs_attention(wal_reset_bug(version)):
        return
    _warn_once(family, version, path, how)


def _path_of(database: Any) -> Optional[str]:
    """The file a ``connect()`` argument names, or None for memory/temp/unreadable ones."""
    try:
        text = os.fsdecode(database) if not isinstance(database, str) else database
    except TypeError:
        return None
    if not text or text == ":memory:":
        return None
    if text.startswith("file:"):
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(text)
        if "mode=memory" in parts.query:
            return None
        text = unquote(parts.path or parts.netloc)
        if not text or text == ":memory:":
            return None
    return text


def watch_connect(dbapi: ModuleType, database: Any) -> None:
    """At each guarded connect: a connection to a file already in WAL is WAL use.

    Costs two dict lookups per connect: one once the module needs no more watching (the
    event was emitted, the SQLite is fixed, or the operator accepted it), and while it is
    watched one more for a ``database`` argument seen before; each new one is looked at once
    (its header read through SQLite's own descriptor: ondisk.py). Never raises.
    """
    config = runtime.config
    name = dbapi.__name__
    if config is None or _quiet_for.get(name) is config:
        return
    try:
        if database in _checked_paths:
            return
    except TypeError:  # an unhashable argument (bytearray): looked at below, every time
        pass
    try:
        family = name.split(".")[0]
        version = str(dbapi.sqlite_version)
        if (_warned.get(family) or getattr(config, "wal_reset_bug", WARN) == ACCEPT
                or not needs_attention(wal_reset_bug(version))):
            _quiet_for[name] = config
            return
        if len(_checked_paths) >= _CHECKED_MAX:
            _checked_paths.clear()
        try:
            _checked_paths[database] = None
        except TypeError:
            pass
        path = _path_of(database)
        if path is None:
            return
        from . import ondisk

        if ondisk.read_disk_state(os.path.abspath(path)).is_wal:
            _warn_once(family, version, os.path.abspath(path), "a connection to a WAL file")
            _quiet_for[name] = config
    except Exception:  # fail open: a warning is not worth an application's connect
        pass


# --------------------------------------------------------------------------------------------
# Run time: wal_reset_bug=avoid, and on_refusal=keep
# --------------------------------------------------------------------------------------------

#: before_wal_request's answer meaning "go on with the normal WAL guard"
PROCEED: Any = object()


def _query_sql(schema: Optional[str]) -> str:
    """``PRAGMA [schema.]journal_mode``: the query for the mode a request would leave as is
    (without a schema SQLite answers for main, like the request's own row)."""
    if schema is None:
        return "PRAGMA journal_mode"
    return 'PRAGMA "' + schema.replace('"', '""') + '".journal_mode'


def before_wal_request(kit: Any, request: Any, targets: List[Any], call: Callable[..., Any],
                       config: Any) -> Any:
    """Called by the guard for a WAL request on file-backed databases, before it runs.

    ``warn``: the once-per-process warning. ``avoid`` on an affected SQLite: a file that is
    not WAL on disk is not put into WAL; the statement runs as the query of the current mode
    (through the caller's own method, so the cursor is real), which is how SQLite answers a
    journal-mode change it cannot make. Files already WAL go on as usual. Returns PROCEED or
    the statement's result.
    """
    family, version = _family_of_kit(kit)
    setting = getattr(config, "wal_reset_bug", WARN)
    if setting == ACCEPT or not needs_attention(wal_reset_bug(version)):
        return PROCEED
    if setting != AVOID:
        _warn_once(family, version, targets[0].path, "a WAL request")
        return PROCEED
    from . import ondisk

    states = [(t, ondisk.read_disk_state(t.path)) for t in targets]
    not_wal = [(t, s) for t, s in states if not s.is_wal]
    if not not_wal:
        _warn_once(family, version, targets[0].path, "a WAL request on a file already WAL")
        return PROCEED
    for target, state in not_wal:
        fields = dict(file=target.path, schema=target.schema, request="wal", disk=state.mode,
                      module=family, sqlite_version=version, fixed_in=list(FIXED_IN))
        if config.observe:
            events.count("observed_would_avoid")
            events.emit(
                "wal-would-avoid", logging.WARNING,
                f"walpatch (observe mode): would keep {target.path} out of WAL "
                f"(WALPATCH_WAL_RESET_BUG=avoid). {advice(version, avoiding=True)}",
                dedupe_key=target.path, outcome="observed", **fields)
            continue
        events.count("wal_avoided")
        events.emit(
            "wal-avoided", logging.WARNING,
            f"walpatch: kept {target.path} out of WAL (WALPATCH_WAL_RESET_BUG=avoid; on disk "
            f"{state.detail}): journal_mode=WAL was answered with the current mode, no "
            f"error. {advice(version, avoiding=True)}",
            dedupe_key=target.path, outcome="avoided", **fields)
    if config.observe:
        return PROCEED
    return call(_query_sql(request.schema))


class Kept(Exception):
    """Raised by the guard's refusal instead of the refusal itself when ``on_refusal=keep``
    and the entry point can hand back a row; caught by the guard, which calls ``keep``."""

    def __init__(self, error: BaseException, cause: Optional[BaseException], target: Any,
                 fields: Dict[str, Any]) -> None:
        super().__init__(str(error))
        self.error = error
        self.cause = cause
        self.target = target
        self.fields = fields


def keep(kit: Any, conn: Any, request: Any, call: Callable[..., Any], kept: Kept) -> Any:
    """Answer a refused downgrade like SQLite answers a change it cannot make: the statement
    runs as the query of the mode that stays in effect (``PRAGMA [schema.]journal_mode``,
    through the caller's own method and cursor), no exception. If even that query fails, the
    refusal is raised as with ``on_refusal=raise``; nothing ever runs the downgrade."""
    target = kept.target
    try:
        # A read first: a connection that has not read since another process switched the
        # file to WAL still reports its cached mode (design.md §3).
        cur = kit.raw_cursor(conn)
        try:
            cur.execute("PRAGMA schema_version").fetchall()
        finally:
            cur.close()
    except kit.error:
        pass
    try:
        result = call(_query_sql(request.schema))
    except kit.usage_errors:
        # sqlite3's own complaint about the call (executemany of a query before 3.11): the
        # same exception the statement itself gets without walpatch; nothing was changed.
        _kept_event(request, target, kept.fields)
        raise
    except kit.error as exc:
        events.emit(
            "downgrade-refused", logging.WARNING,
            f"walpatch: refused journal_mode={request.mode} on {target.path}: "
            f"{kept.fields.get('reason')} (on_refusal=keep could not read the current mode: "
            f"{type(exc).__name__}; raised instead)",
            dedupe_key=target.path, outcome="refused", **kept.fields)
        raise kept.error from kept.cause
    _kept_event(request, target, kept.fields)
    return result


def _kept_event(request: Any, target: Any, fields: Dict[str, Any]) -> None:
    events.count("downgrades_kept")
    events.emit(
        "downgrade-refused", logging.WARNING,
        f"walpatch: refused journal_mode={request.mode} on {target.path}: "
        f"{fields.get('reason')}; answered with the mode that stays in effect, no error "
        "(WALPATCH_ON_REFUSAL=keep)",
        dedupe_key=target.path, outcome="kept", **fields)
