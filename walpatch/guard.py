"""Carry out the decision table for one journal-mode request: the I/O edge of policy.py.

Called only for statements that ``sqlscan`` found to be journal-mode requests; everything
else never reaches this module. The statement itself runs through ``call`` (the original,
unpatched sqlite3 method bound to the caller's connection or cursor), so the application's
cursor, its rows and its exception are the ones sqlite3 would have produced.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
import os
import random
import sys
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable, List, NamedTuple, Optional, Tuple, Type

from . import attached, events, ondisk, policy, runtime, sqliteinfo
from . import classify as _c
from .config import Config
from .sqlscan import Attach, Detach, Plan, Request, Single, ascii_lower

Call = Callable[..., Any]  # call() runs the statement; call(sql) runs sql in its place

_random = random.Random()


class Kit(NamedTuple):
    """What the guard needs from one DB-API module (sqlite3, pysqlite3, sqlean)."""

    error: Type[Exception]  # the module's Error base class
    programming_error: Type[Exception]
    #: errors about how sqlite3 was called (wrong parameters, closed cursor...): the request
    #: never reached SQLite, so they are passed through untouched and recorded nowhere
    usage_errors: Tuple[Type[Exception], ...]
    refused: Type[Exception]  # its WalDowngradeRefused class
    raw_cursor: Callable[[Any], Any]  # the module's own Connection.cursor (unguarded)


class Target(NamedTuple):
    schema: str
    path: str


# --- reading the connection's own facts (through an unguarded cursor, rows as tuples) ---
#
# Nothing here changes connection state another thread could observe (issue 10 item 8): the
# caller's text_factory is never swapped. Values are decoded by their type instead; where the
# text_factory is an arbitrary callable (its results cannot be inverted), text is read as
# blobs through SQLite's table-valued pragmas (see _database_list).

#: text factories whose results can be decoded exactly
_PLAIN_TEXT_FACTORIES = (str, bytes, bytearray)


class _Opaque(Exception):
    """A value came back through a text_factory whose result cannot be decoded."""


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return os.fsdecode(bytes(value))  # surrogateescape: round-trips with os.fsencode
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    raise _Opaque(type(value).__name__)


def _plain_text_factory(conn: Any) -> bool:
    return getattr(conn, "text_factory", str) in _PLAIN_TEXT_FACTORIES


def _query(kit: Kit, conn: Any, sql: str) -> List[Tuple[str, ...]]:
    """A pragma's rows as tuples of str, whatever the caller's row_factory, without touching
    its text_factory. Under a text_factory that is an arbitrary callable, text values are
    whatever it made of them (str as returned, anything else as ""): callers that need the
    exact text use _database_list, and journal modes are compared case-insensitively."""
    rows = _fetch(kit, conn, sql)
    out: List[Tuple[str, ...]] = []
    for row in rows:
        values = []
        for v in row:
            try:
                values.append(_text(v))
            except _Opaque:
                values.append("")
        out.append(tuple(values))
    return out


def _fetch(kit: Kit, conn: Any, sql: str) -> List[Tuple[Any, ...]]:
    cur = kit.raw_cursor(conn)
    cur.row_factory = None
    try:
        return list(cur.execute(sql).fetchall())
    finally:
        cur.close()


_DECODE_ERROR = "could not decode to utf-8"


def _database_list(kit: Kit, conn: Any) -> List[Tuple[str, str]]:
    """(schema, file) of every database of the connection, main first, text exact.

    ``PRAGMA database_list`` needs no lock; it is read directly when the text_factory is
    str/bytes/bytearray. A file name that is not UTF-8 (str factory: sqlite3 cannot decode
    it) or an arbitrary text_factory falls back to ``pragma_database_list`` with CAST AS
    BLOB, which is exact but loads the schema first (a brief shared lock, kept while the
    connection stays in WAL mode, like any first query of the application).
    """
    if _plain_text_factory(conn):
        try:
            return [(_text(r[1]), _text(r[2])) for r in _fetch(kit, conn, "PRAGMA database_list")]
        except _Opaque:
            pass  # the text_factory changed under us (another thread): read as blobs
        except kit.error as exc:
            if _DECODE_ERROR not in str(exc).lower():
                raise
    rows = _fetch(kit, conn, "SELECT CAST(name AS BLOB), CAST(file AS BLOB) "
                             "FROM pragma_database_list ORDER BY seq")
    return [(_text(name), _text(path)) for name, path in rows]


def _targets(kit: Kit, conn: Any, schema: Optional[str], config: Config) -> List[Target]:
    """File-backed databases the request applies to (all attached ones when no schema)."""
    wanted = ascii_lower(schema) if schema is not None else None
    out: List[Target] = []
    for index, (name, path) in enumerate(_database_list(kit, conn)):
        if wanted is not None and ascii_lower(name) != wanted:
            continue
        if not path:  # :memory:, temp, or an anonymous database: nothing on disk to protect
            continue
        if index == 0 and _file_never_changes(conn, path):
            continue
        if _is_excluded(path, config):
            continue
        out.append(Target(name, path))
    return out


def _file_never_changes(conn: Any, path: str) -> Optional[str]:
    """Why the connection's main database cannot change the file ``path`` (vfs=memdb keeps the
    database in memory, immutable=1 promises that nothing changes it), or None. Only the main
    database's URI is known (what connect() was given); attached ones are checked as files."""
    database = getattr(conn, "_walpatch_database", None)
    params = _uri_params(database)
    if not params:
        return None
    query = _database_text(database).split("?", 1)[1].split("#", 1)[0]
    if "?" + query in path:  # uri=False: SQLite took the whole text as a file name
        return None
    if params.get("vfs") == "memdb":
        return "vfs=memdb"
    if params.get("immutable") in _TRUE_WORDS:
        return "immutable=1"
    return None


_TRUE_WORDS = ("1", "true", "yes", "on")


def _matches_any(path: str, globs: Tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(path, g) for g in globs)


def _is_excluded(path: str, config: Config) -> bool:
    if config.include_paths and not _matches_any(path, config.include_paths):
        return True
    return _matches_any(path, config.exclude_paths)


def _allowed_because(path: str, config: Config) -> Optional[str]:
    if runtime.downgrade_allowed_in_context():
        return "walpatch.allow_downgrade()"
    if config.allow_downgrade:
        return "WALPATCH_ALLOW_DOWNGRADE"
    if _matches_any(path, config.allow_downgrade_paths):
        return "WALPATCH_ALLOW_DOWNGRADE_PATHS"
    return None


_MODES = ("delete", "truncate", "persist", "memory", "wal", "off")


def _current_mode(kit: Kit, conn: Any, schema: str) -> Optional[str]:
    """The journal mode the connection reports for ``schema``; None when unknown (an error,
    or a text_factory that made something else of the answer)."""
    try:
        rows = _query(kit, conn, f"PRAGMA {_quote(schema)}.journal_mode")
    except kit.error:
        return None
    mode = ascii_lower(rows[0][0]) if rows else None
    return mode if mode in _MODES else None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- connect-time facts used to explain a silent refusal ---

_NO_SHM_VFS = ("unix-none", "unix-dotfile")


def _database_text(database: Any) -> str:
    """What connect() was given (str, bytes or path-like), as text; "" when unknown."""
    try:
        return _text(os.fspath(database)) if database is not None else ""
    except (TypeError, _Opaque):
        return ""


def _uri_params(database: Any) -> dict:
    text = _database_text(database)
    if not text.startswith("file:") or "?" not in text:
        return {}
    from urllib.parse import parse_qsl

    return dict(parse_qsl(text.split("?", 1)[1].split("#", 1)[0]))


def _vfs_without_shm(database: Any) -> Optional[str]:
    params = _uri_params(database)
    if params.get("vfs") in _NO_SHM_VFS:
        return f"vfs={params['vfs']}"
    if params.get("nolock") in ("1", "true", "yes", "on"):
        return "nolock=1"
    return None


def _read_only(database: Any, path: str) -> Optional[str]:
    params = _uri_params(database)
    if params.get("mode") == "ro":
        return "mode=ro"
    if params.get("immutable") in ("1", "true", "yes", "on"):
        return "immutable=1"
    if not os.access(path, os.W_OK):
        return "the file is not writable by this process"
    if not os.access(os.path.dirname(path) or ".", os.W_OK):
        return "its directory is not writable, so no -wal/-shm file can be created"
    return None


# --- the entry points -------------------------------------------------------------------

def run_statement(kit: Kit, conn: Any, request: Request, call: Call, can_retry: bool) -> Any:
    """Guard one journal-mode request; ``call()`` runs the statement for real."""
    config = runtime.config
    if config is None:
        return call()
    if config.observe:
        return _run_observed(kit, conn, request, call, config)
    try:
        targets = _targets(kit, conn, request.schema, config)
    except kit.programming_error:
        return call()  # closed connection, wrong thread...: sqlite3 raises its own error
    except kit.error as exc:
        try:
            return _run_unlisted(kit, conn, request, call, can_retry, config, exc)
        except sqliteinfo.Kept as kept:  # on_refusal=keep
            return sqliteinfo.keep(kit, conn, request, call, kept)
    if not targets:
        return call()
    if request.is_wal:
        avoided = sqliteinfo.before_wal_request(kit, request, targets, call, config)
        if avoided is not sqliteinfo.PROCEED:
            return avoided
        return _guard_wal(kit, conn, request, targets, call, config, can_retry)
    try:
        _check_downgrade(kit, request, targets, config, keepable=True)
    except sqliteinfo.Kept as kept:  # on_refusal=keep: the mode that stays, as the row
        return sqliteinfo.keep(kit, conn, request, call, kept)
    result = call()
    for t in targets:
        runtime.record(t.path, None)
    return result


def _run_observed(kit: Kit, conn: Any, request: Request, call: Call, config: Config) -> Any:
    """Observe mode: the statement runs exactly once, as without walpatch; walpatch's own
    checks only log (their errors included) and never retry, undo, refuse or annotate.

    A WAL request is not verified afterwards: the switch commits only when the caller has
    consumed its cursor, so there is no moment to look at it without changing the outcome.
    """
    try:
        if not _plain_text_factory(conn):
            # The exact database list would be read as blobs, which loads the schema: I/O the
            # caller's statement would otherwise do itself (a fault could then land on
            # walpatch's read instead of the caller's), so observe mode does not look.
            raise _Opaque("the connection's text_factory is neither str, bytes nor bytearray, "
                          "and reading the database list exactly would load the schema")
        targets = _targets(kit, conn, request.schema, config)
        if targets and not request.is_wal:
            _check_downgrade(kit, request, targets, config)  # logs "would refuse"
        elif targets:  # the WAL-reset warning, and "would avoid" (never avoids in observe)
            sqliteinfo.before_wal_request(kit, request, targets, call, config)
    except Exception as exc:  # noqa: BLE001 - observe mode: walpatch's own errors are logged
        targets = []
        events.emit("observe-check-failed", logging.WARNING,
                    f"walpatch (observe mode): could not check journal_mode={request.mode} "
                    f"({type(exc).__name__}: {exc}); the statement runs unchecked",
                    dedupe_key="observe-check", request=request.mode, outcome="observed")
    if not request.is_wal:
        result = call()
        for t in targets:
            runtime.record(t.path, None)
        return result
    if targets:
        events.count("wal_requests")
    try:
        return call()
    except kit.usage_errors:
        raise
    except kit.error as exc:
        if targets:
            try:
                category = _shm_as_transient(exc, _c.classify(exc, config.unsupported_markers))
                if _c.is_retryable(category):
                    events.count("observed_would_retry")
                _record_wal_error(kit, request, targets, exc, config, 1, note=False,
                                  category=category, mark=False)
            except Exception:  # noqa: BLE001 - never let the log replace the caller's error
                pass
        raise


def _run_unlisted(
    kit: Kit, conn: Any, request: Request, call: Call, can_retry: bool, config: Config,
    exc: BaseException,
) -> Any:
    """``PRAGMA database_list`` failed (an application authorizer that denies walpatch's
    pragmas): use what can still be known. The main database's file is what connect() was
    given; any other database of this connection is a file this process has open, so a
    downgrade is refused only when that file or another one open here is WAL on disk."""
    main = _main_file(conn)
    touches_main = request.schema is None or ascii_lower(request.schema) == "main"
    known = [Target("main", main)] if main and touches_main and not _is_excluded(
        main, config) else []
    if request.is_wal:
        if not known:
            return call()
        return _guard_wal(kit, conn, request, known, call, config, can_retry)
    others = request.schema is None or not touches_main
    if others:
        wal = ondisk.wal_files_open(exclude=main)
        if wal is None or any(not _is_excluded(p, config) for p in wal):
            what = ("this process's open files could not be listed" if wal is None else
                    f"{', '.join(p for p in wal if not _is_excluded(p, config))} is WAL on disk")
            schema = request.schema or "main"
            return _refuse_or_observe(
                kit, config, request, Target(schema, main or "?"), policy.Decision(
                    policy.REFUSE, f"the attached databases could not be listed "
                    f"({type(exc).__name__}: {exc}) and {what}"), call, keepable=True)
    if known:
        _check_downgrade(kit, request, known, config, keepable=True)
    result = call()
    for t in known:
        runtime.record(t.path, None)
    return result


def _main_file(conn: Any) -> Optional[str]:
    """The main database's file from what connect() was given, or None (in memory, temp,
    a URI naming no file, unknown)."""
    text = _database_text(getattr(conn, "_walpatch_database", None))
    if text in ("", ":memory:"):
        return None
    if text.startswith("file:"):
        from urllib.parse import unquote

        params = _uri_params(text)
        if params.get("mode") == "memory" or params.get("vfs") == "memdb" or params.get(
                "immutable") in _TRUE_WORDS:
            return None
        rest = text[5:].split("?", 1)[0].split("#", 1)[0]
        if rest.startswith("//"):
            rest = rest[2:]
            rest = rest[rest.find("/"):] if "/" in rest else ""
        text = os.fsdecode(unquote(rest, encoding="utf-8", errors="surrogateescape"))
        if text in ("", ":memory:"):
            return None
    return os.path.abspath(text)


def run_script(
    kit: Kit, conn: Any, plan: Plan, sql: str, run_script_text: Callable[[str], Any],
    run_single: Callable[[str], Any],
) -> Any:
    """Guard ``executescript``.

    A script made only of journal-mode pragmas is run statement by statement with the full
    guard (retries included), after ``executescript('')`` has done its implicit COMMIT exactly
    as the whole script would have. A mixed script cannot be retried (its other statements
    may not be idempotent): its downgrades are checked before anything runs, against the
    files each one will reach (``_check_script``: the script's own ATTACH/DETACH replayed),
    and its WAL requests are checked afterwards and their failures recorded.
    """
    config = runtime.config
    if config is None:
        return run_script_text(sql)
    if plan.only_journal_pragmas:  # (no ATTACH/DETACH in it: each request lists afresh)
        result = run_script_text("")
        for request in plan.requests:
            def _one(stmt: str = request.statement) -> Any:
                return run_single(stmt)

            run_statement(kit, conn, request, _one, can_retry=True)
        return result
    try:
        wal_targets = _check_script(kit, conn, plan, config)
    except _PassThrough:
        return run_script_text(sql)
    try:
        result = run_script_text(sql)
    except kit.usage_errors:
        raise
    except kit.error as exc:
        # The error may come from another statement after the WAL request succeeded: record
        # a failure only for files that are not in WAL now.
        observed = _observe_after_script(kit, conn, wal_targets)
        for request, observations in observed:
            _record_wal_result(conn, [o for o in observations if o.is_wal], attempts=1)
            failed = [o.target for o in observations if not o.is_wal]
            if failed:
                _record_wal_error(kit, request, failed, exc, config, attempts=1, note=False)
        raise
    for _request, observations in _observe_after_script(kit, conn, wal_targets):
        _record_wal_result(conn, observations, attempts=1)
    return result


def _downgrade_allowed_everywhere(config: Config) -> Optional[str]:
    """An opt-out that covers every file (not a path glob, which an unknown file cannot
    match)."""
    if runtime.downgrade_allowed_in_context():
        return "walpatch.allow_downgrade()"
    if config.allow_downgrade:
        return "WALPATCH_ALLOW_DOWNGRADE"
    return None


def _check_script(
    kit: Kit, conn: Any, plan: Plan, config: Config,
) -> List[Tuple[Request, List[Target]]]:
    """Check a mixed script's downgrades before any of it runs (all or nothing), knowing at
    each one which files it reaches: the databases attached now, then the script's own
    ATTACH/DETACH statements replayed in order (attached.py). Refuses (raises) where a
    downgrade may reach a WAL file, a file it cannot check, or a file that an earlier WAL
    request of the same script may have switched. Returns the WAL requests' targets."""
    try:
        rows: Optional[List[Tuple[str, str]]] = [
            (name, path) for name, path in _database_list(kit, conn)]
        if rows and rows[0][1] and _file_never_changes(conn, rows[0][1]):
            rows[0] = (rows[0][0], "")  # vfs=memdb / immutable=1: main changes no file
        listing_error = ""
    except kit.programming_error:
        raise _PassThrough from None
    except kit.error as exc:
        rows, listing_error = None, f"the attached databases could not be listed ({exc})"
    try:
        cwd: Optional[str] = os.getcwd()
    except OSError:
        cwd = None
    smap = attached.ScriptMap(rows or [])
    wal_targets: List[Tuple[Request, List[Target]]] = []
    wal_paths: set = set()
    wal_anywhere = False  # an earlier WAL request may have reached a file not known here
    for step in plan.steps or plan.requests:
        if isinstance(step, Attach):
            smap.attach(step, cwd)
            continue
        if isinstance(step, Detach):
            smap.detach(step)
            continue
        request = step
        found = smap.candidates(request.schema)
        known = [Target(c.schema, c.path) for c in found
                 if c.path is not None and not _is_excluded(c.path, config)]
        unknown = [c for c in found if c.path is None]
        if request.is_wal:
            wal_targets.append((request, known))
            wal_paths.update(t.path for t in known)
            wal_anywhere = wal_anywhere or bool(unknown) or rows is None
            continue
        why = ""
        where = Target(request.schema or "main", "?")
        if rows is None:
            why = listing_error
        elif unknown:
            where = Target(unknown[0].schema, "?")
            why = (f"the script runs an {unknown[0].why}, so which file this statement "
                   "reaches cannot be known before it runs; walpatch fails closed")
        else:
            earlier = [t for t in known if t.path in wal_paths or wal_anywhere]
            if earlier:
                where = earlier[0]
                why = ("an earlier statement of the same script asks for WAL on this file, and "
                       "a script's downgrades are checked before it runs; run the two apart")
        if why:
            if _downgrade_allowed_everywhere(config):
                events.count("downgrades_allowed")
                continue
            _refuse_or_observe(kit, config, request, where,
                               policy.Decision(policy.REFUSE, why), None)
            continue
        if known:
            _check_downgrade(kit, request, known, config)
    return wal_targets


class _PassThrough(Exception):
    """The connection cannot even be asked (closed, wrong thread): let sqlite3 say so."""


def _observe_after_script(
    kit: Kit, conn: Any, wal_targets: List[Tuple[Request, List[Target]]],
) -> List[Tuple[Request, List["_Observation"]]]:
    """After the script: is each file a WAL request reached in WAL now? A header that says
    WAL settles it without asking the connection (a read of walpatch's own after the caller's
    statement opens the WAL and keeps its lock: issue 10 item 16). Otherwise (an empty new
    database, a header not yet WAL) the connection is asked where the schema still names that
    file, and the header alone decides where the script detached it."""
    if not wal_targets:
        return []
    now: Optional[dict] = None
    out = []
    for request, targets in wal_targets:
        observations = []
        for t in targets:
            disk = ondisk.read_disk_state(t.path)
            if disk.mode == ondisk.WAL:
                observations.append(_Observation(t, "wal", disk))
                continue
            if now is None:
                try:
                    now = {ascii_lower(name): path for name, path in _database_list(kit, conn)}
                except kit.error:
                    now = {}
            if now.get(ascii_lower(t.schema)) == t.path:
                mode = _current_mode(kit, conn, t.schema)
            else:
                mode = disk.mode
            observations.append(_Observation(t, mode, disk))
        out.append((request, observations))
    return out


def _check_downgrade(kit: Kit, request: Request, targets: List[Target], config: Config,
                     keepable: bool = False) -> None:
    events.count("downgrade_requests")
    for target in targets:
        disk = ondisk.read_disk_state(target.path)
        events.count("disk_checks")
        if disk.mode == ondisk.UNKNOWN:
            events.count("disk_check_failures")
        decision = policy.decide_downgrade(
            disk, runtime.history_for(target.path), _allowed_because(target.path, config)
        )
        if decision.refuse:
            _refuse_or_observe(kit, config, request, target, decision, None, disk, keepable)
        elif "allowed on purpose" in decision.reason:
            events.count("downgrades_allowed")
            events.emit(
                "downgrade-allowed", logging.WARNING,
                f"walpatch: letting journal_mode={request.mode} through on {target.path} "
                f"({decision.reason})",
                dedupe_key=target.path, file=target.path, schema=target.schema,
                request=request.mode, disk=disk.mode, outcome="allowed")
        else:
            events.count("downgrades_passed")
            events.emit(
                "downgrade-passed", logging.INFO,
                f"walpatch: journal_mode={request.mode} on {target.path} passes: "
                f"{decision.reason}",
                file=target.path, schema=target.schema, request=request.mode, disk=disk.mode,
                outcome="passed")


def _refuse_or_observe(
    kit: Kit, config: Config, request: Request, target: Target, decision: policy.Decision,
    call: Optional[Call], disk: Optional[ondisk.DiskState] = None, keepable: bool = False,
) -> Any:
    """Refuse (raise), or in observe mode log and run ``call``. ``keepable``: the entry point
    can hand back a row, so ``on_refusal=keep`` raises sqliteinfo.Kept for the caller of this
    function to answer with the mode that stays in effect (sqliteinfo.keep)."""
    cause = decision.cause
    code_name = _c.error_code(cause)[1] if cause is not None else None
    fields = dict(
        file=target.path, schema=target.schema, request=request.mode,
        disk=disk.mode if disk else None, error=code_name, reason=decision.reason,
    )
    if config.observe:
        events.count("observed_would_refuse")
        events.emit(
            "downgrade-would-refuse", logging.WARNING,
            f"walpatch (observe mode): would refuse journal_mode={request.mode} on "
            f"{target.path}: {decision.reason}",
            dedupe_key=target.path, outcome="observed", **fields)
        return call() if call is not None else None
    events.count("downgrades_refused")
    if keepable and getattr(config, "on_refusal", sqliteinfo.RAISE) == sqliteinfo.KEEP:
        raise sqliteinfo.Kept(
            kit.refused(target.path, target.schema, request.mode, decision.reason, cause),
            cause, target, fields)
    events.emit(
        "downgrade-refused", logging.WARNING,
        f"walpatch: refused journal_mode={request.mode} on {target.path}: {decision.reason}",
        dedupe_key=target.path, outcome="refused", **fields)
    raise kit.refused(target.path, target.schema, request.mode, decision.reason, cause) from cause


def _note(exc: BaseException, text: str) -> None:
    if sys.version_info >= (3, 11):
        exc.add_note(text)
    else:  # shown by nothing before 3.11, but inspectable
        notes = getattr(exc, "__notes__", None)
        try:
            if isinstance(notes, list):
                notes.append(text)
            else:
                exc.__notes__ = [text]  # type: ignore[attr-defined]
        except AttributeError:
            pass


def _kept_error(exc: BaseException) -> Tuple[Optional[BaseException], Optional[Any]]:
    """What the history may keep of a failed WAL request's error, for chaining a later
    refusal: a copy without traceback (type, message, codes, notes), and a weak reference to
    the error itself. Never the error: its traceback holds the frames it passed through, and
    walpatch's hold the caller's cursor; a live cursor keeps its prepared statement, so the
    application's ``close()`` would leave the connection open (``sqlite3_close_v2``), its
    transaction neither rolled back nor its locks released (a -journal left behind, other
    processes locked out) for as long as the history entry lives."""
    copied: Optional[BaseException] = None
    try:
        clone = copy.copy(exc)
        if clone is not exc and clone.__traceback__ is None:
            copied = clone
    except Exception:  # noqa: BLE001 - an error class that cannot be copied: keep no copy
        pass
    try:
        original: Optional[Any] = weakref.ref(exc)
    except TypeError:
        original = None
    return copied, original


def _record_wal_error(
    kit: Kit, request: Request, targets: List[Target], exc: BaseException, config: Config,
    attempts: int, note: bool, category: Optional[str] = None, mark: bool = True,
) -> None:
    """Record and report a failed WAL request; ``mark`` puts the attempt count (and, with
    ``note``, a note) on the exception (never in observe mode: the error stays as it was)."""
    category = category or _c.classify(exc, config.unsupported_markers)
    code, name = _c.error_code(exc)
    outcome = policy.outcome_for_category(category)
    # No str(exc) here: this text ends up in WalDowngradeRefused's message, which must not
    # contain the phrases legacy fallbacks match on ("disk i/o error", "locked").
    detail = f"{name or type(exc).__name__} ({category})"
    counter = "wal_unsupported" if outcome == policy.WAL_UNSUPPORTED else "wal_failed"
    events.count(counter)
    if mark:
        try:
            exc.walpatch_attempts = attempts  # type: ignore[attr-defined]
        except AttributeError:
            pass
    if note and mark:
        _note(exc, f"walpatch: PRAGMA journal_mode=WAL failed after {attempts} attempt(s); "
                   f"error class: {category}")
    kept, original = _kept_error(exc)
    for target in targets:
        runtime.record(target.path, policy.History(outcome, category, kept, detail, original))
    for target in targets:
        events.emit(
            "wal-unsupported" if outcome == policy.WAL_UNSUPPORTED else "wal-failed",
            logging.WARNING,
            f"walpatch: journal_mode=WAL on {target.path} failed after {attempts} attempt(s) "
            f"with {name or type(exc).__name__} ({category})"
            + ("; WAL looks unsupported here, a fallback may leave WAL if the file is not WAL "
               "on disk" if outcome == policy.WAL_UNSUPPORTED else
               "; downgrades of this file are refused until WAL succeeds"),
            dedupe_key=target.path, file=target.path, schema=target.schema, request="wal",
            error=name, code=code, category=category, attempts=attempts, outcome=outcome)


class _Observation(NamedTuple):
    target: Target
    mode: Optional[str]  # what the connection reports now
    disk: Optional[ondisk.DiskState]  # None when the header is not to be trusted yet

    @property
    def is_wal(self) -> bool:
        if self.mode is None:  # the connection's answer is unknown: the disk decides
            return self.disk is not None and self.disk.mode == ondisk.WAL
        return self.mode == "wal" and (
            self.disk is None or self.disk.mode in (ondisk.WAL, ondisk.EMPTY))

    @property
    def stale(self) -> bool:
        """The connection reports WAL but the header on disk does not (design.md §3: seen
        after a failed sync); a fresh read and another attempt fix it."""
        return self.mode == "wal" and not self.is_wal


def _observe(kit: Kit, conn: Any, targets: List[Target], check_disk: bool) -> List[_Observation]:
    return [
        _Observation(t, _current_mode(kit, conn, t.schema),
                     ondisk.read_disk_state(t.path) if check_disk else None)
        for t in targets
    ]


def _record_wal_result(conn: Any, observations: List[_Observation], attempts: int) -> None:
    """Record and report, per file, whether a completed WAL request really took effect."""
    for obs in observations:
        target = obs.target
        if obs.is_wal:
            runtime.record(target.path, policy.History(policy.WAL_OK))
            events.count("wal_ok")
            if attempts > 1:
                events.count("wal_recovered")
                events.emit(
                    "wal-recovered", logging.WARNING,
                    f"walpatch: journal_mode=WAL on {target.path} succeeded after {attempts} "
                    "attempts (transient errors retried)",
                    dedupe_key=target.path, file=target.path, schema=target.schema,
                    request="wal", attempts=attempts, outcome="ok")
            else:
                events.emit(
                    "wal-ok", logging.DEBUG, f"walpatch: journal_mode=WAL on {target.path} ok",
                    file=target.path, schema=target.schema, request="wal", outcome="ok")
            continue
        if obs.stale and obs.disk is not None:
            why = policy.SilentRefusal(
                f"the connection reports WAL but on disk {obs.disk.detail}", False)
        else:
            database = getattr(conn, "_walpatch_database", None)
            why = policy.explain_silent_refusal(
                obs.mode or "?", bool(getattr(conn, "in_transaction", False)),
                _vfs_without_shm(database), _read_only(database, target.path))
        outcome = policy.WAL_UNSUPPORTED if why.permanent else policy.WAL_FAILED
        runtime.record(target.path, policy.History(
            outcome, _c.WAL_UNSUPPORTED if why.permanent else _c.STATE, None, why.reason))
        events.count("wal_silently_refused")
        events.emit(
            "wal-silently-refused", logging.WARNING,
            f"walpatch: journal_mode=WAL on {target.path} was not applied: {why.reason}",
            dedupe_key=target.path, file=target.path, schema=target.schema, request="wal",
            returned=obs.mode, disk=obs.disk.mode if obs.disk else None, reason=why.reason,
            outcome=outcome)


def _verify_wal(
    kit: Kit, conn: Any, request: Request, targets: List[Target], config: Config, attempts: int,
    check_disk: bool = True,
) -> None:
    """After a WAL request ran to completion: is each file really in WAL now?"""
    _record_wal_result(conn, _observe(kit, conn, targets, check_disk), attempts)


def _wait_before_retry(
    kit: Kit, conn: Any, targets: List[Target], config: Config, attempts: int, started: float,
    what: str, category: str, error_name: Optional[str],
) -> bool:
    """Back off before another attempt; False when the budget is spent (or in observe mode)."""
    delay = policy.retry_delay(attempts, time.monotonic() - started, config, _random.random())
    if delay is None:
        return False
    if config.observe:
        events.count("observed_would_retry")
        return False
    events.count("wal_retries")
    for target in targets:
        events.emit(
            "wal-retry", logging.WARNING,
            f"walpatch: journal_mode=WAL on {target.path} failed: {what}; retrying in "
            f"{delay:.3f}s (attempt {attempts} of {config.retry_attempts})",
            dedupe_key=target.path, file=target.path, schema=target.schema, request="wal",
            error=error_name, category=category, attempts=attempts, outcome="retry")
    time.sleep(delay)
    # A failed switch can leave the connection believing it is in WAL while the header says
    # otherwise; any read makes it look at the file again, so the next attempt really writes.
    try:
        _query(kit, conn, "PRAGMA schema_version")
    except kit.error:
        pass
    return True


# --- shared memory: permanence is judged by persistence (design.md section 8) ---------------

_SHM_CODES = frozenset({_c.SQLITE_IOERR_SHMOPEN, _c.SQLITE_IOERR_SHMMAP})
#: a shared-memory error counts as "WAL cannot work here" only after this many attempts in a
#: row failed with it (a filesystem without shared mmap fails every time; one mmap() ENOMEM
#: does not). Fewer attempts in the retry budget: never permanent (fail closed).
MIN_SHM_ATTEMPTS = 3


def _is_shm_error(exc: BaseException) -> bool:
    return _c.error_code(exc)[0] in _SHM_CODES


def _shm_as_transient(exc: BaseException, category: str) -> str:
    """A single IOERR_SHMMAP/SHMOPEN proves nothing (mmap ENOMEM/EAGAIN are transient, and
    Python does not expose the errno): transient I/O until it has persisted."""
    if category == _c.WAL_UNSUPPORTED and _is_shm_error(exc):
        return _c.TRANSIENT_IO
    return category


def _guard_wal(
    kit: Kit, conn: Any, request: Request, targets: List[Target], call: Call, config: Config,
    can_retry: bool,
) -> Any:
    events.count("wal_requests")
    if not can_retry:
        # executemany: its parameters may be a one-shot iterator, so one attempt only.
        try:
            result = call()
        except kit.usage_errors:
            raise
        except kit.error as exc:
            category = _shm_as_transient(exc, _c.classify(exc, config.unsupported_markers))
            _record_wal_error(kit, request, targets, exc, config, 1, note=True,
                              category=category)
            raise
        _verify_wal(kit, conn, request, targets, config, 1, check_disk=False)
        return result
    started = time.monotonic()
    attempts = 0
    io_seen = False
    shm_streak = 0  # attempts in a row that failed with a shared-memory error
    last_error: Optional[BaseException] = None
    try:
        while True:
            attempts += 1
            try:
                # Run the request to completion so that the journal-mode change commits (and
                # any error of that commit surfaces) here, inside the retry loop.
                call().fetchall()
            except kit.usage_errors:
                raise
            except kit.error as exc:
                last_error = exc
                category = _c.classify(exc, config.unsupported_markers, after_io_error=io_seen)
                shm = category == _c.WAL_UNSUPPORTED and _is_shm_error(exc)
                shm_streak = shm_streak + 1 if shm else 0
                if shm:  # retried like transient I/O; permanent only if it persists (below)
                    category = _c.TRANSIENT_IO
                io_seen = io_seen or category == _c.TRANSIENT_IO
                # CORRUPT is retried too: a transient EIO on read surfaces as "malformed", and
                # real corruption simply fails again (and is then raised, never a downgrade
                # signal).
                retryable = _c.is_retryable(category) or category == _c.CORRUPT
                name = _c.error_code(exc)[1] or type(exc).__name__
                if retryable and _wait_before_retry(
                        kit, conn, targets, config, attempts, started, f"{name} ({category})",
                        category, name):
                    continue
                if shm and shm_streak >= MIN_SHM_ATTEMPTS:
                    category = _c.WAL_UNSUPPORTED  # it repeated through the whole retry budget
                _record_wal_error(kit, request, targets, exc, config, attempts, note=True,
                                  category=category)
                raise
            shm_streak = 0
            observations = _observe(kit, conn, targets, check_disk=True)
            if any(o.stale for o in observations):
                if _wait_before_retry(
                        kit, conn, targets, config, attempts, started,
                        "the connection reports WAL but the header on disk does not",
                        _c.TRANSIENT_IO, None):
                    continue
                _raise_stale(kit, conn, request, observations, config, attempts, last_error)
            # Every file now WAL on disk gets the shared-memory check. (Whether this request
            # made the switch is not known: asking before it, of the connection or of the disk,
            # is a read that would meet, and take away, a fault meant for the request itself.)
            _check_shared_memory(kit, conn, request,
                                 [o.target for o in observations if o.is_wal], config)
            _record_wal_result(conn, observations, attempts)
            # Hand the caller a fresh result: asking for the mode the connection is now in is a
            # no-op for SQLite.
            return call()
    finally:
        # A failed attempt's error holds a traceback through this frame, whose locals hold it
        # back: a cycle that keeps the caller's cursor (and its statement) alive until the
        # garbage collector runs, on every way out of here, the raised ones included. A live
        # statement makes the app's close() leave the connection open, its transaction and
        # locks with it (a -journal left behind); on 3.8-3.10 it makes the app's next COMMIT
        # fail with "SQL statements in progress". Break the cycle now.
        last_error = None


def _raise_stale(
    kit: Kit, conn: Any, request: Request, observations: List[_Observation], config: Config,
    attempts: int, last_error: Optional[BaseException],
) -> None:
    """The retries ran out and SQLite answers 'wal' while the header on disk says otherwise
    (design.md section 4): WAL failed, not permanently. Raise the last error, as for any
    request that still fails; without one, an OperationalError that says what happened."""
    _record_wal_result(conn, [o for o in observations if not o.stale], attempts)
    stale = [o for o in observations if o.stale]
    error = last_error
    if error is None:
        details = "; ".join(f"{o.target.path}: {o.disk.detail if o.disk else '?'}"
                            for o in stale)
        error = _operational_error(kit)(
            "journal_mode=WAL did not take effect: the connection reports WAL but the file on "
            f"disk is not in WAL mode ({details})")
    _record_wal_error(kit, request, [o.target for o in stale], error, config, attempts,
                      note=True, category=_c.TRANSIENT_IO)
    try:
        raise error
    finally:
        error = last_error = None  # no cycle through this frame (see _guard_wal)


def _operational_error(kit: Kit) -> Type[Exception]:
    """The module's OperationalError (WalDowngradeRefused derives from it)."""
    for cls in kit.refused.__mro__:
        if cls.__name__ == "OperationalError" and issubclass(cls, kit.error):
            return cls
    return kit.error


def _check_shared_memory(
    kit: Kit, conn: Any, request: Request, targets: List[Target], config: Config,
) -> None:
    """After a switch into WAL: can WAL work on this filesystem? On one without shared mmap
    (FUSE with direct_io, some virtiofs/9p setups) SQLite answers 'wal' and writes the
    header, and then every statement fails with IOERR_SHMMAP, for every process: the file is
    bricked. A read shows it. That read is made on a short-lived connection of the same
    SQLite library (safe: SQLite defers closing descriptors that carry locks, design.md
    section 5), so the caller's connection keeps exactly the locks its own statement left
    (in WAL mode a connection that has read keeps a shared lock: issue 10 item 16).

    The error must persist across bounded, jittered retries before WAL is judged unusable
    (one mmap() ENOMEM is transient, issue 10 item 2). Then the file, which this request
    took out of a rollback mode, is put back into rollback mode (exclusive locking mode
    needs no shared memory) and the error is raised, classified "WAL unsupported here", so
    the application's own fallback may run.
    """
    for target in targets:
        key = _inode(target.path)
        if key is not None and _shm_known_ok(key):
            continue  # its -shm was mapped in this process before: the filesystem can do it
        error, mapped = _persistent_shm_error(kit, conn, target, config)
        if error is not None:
            try:
                _undo_unusable_wal(kit, conn, request, targets, config, error)
            finally:
                error = None  # no cycle through this frame (see _guard_wal)
        if mapped and key is not None:
            _shm_ok(key)


#: (st_dev, st_ino) of files whose -shm this process has mapped: shared memory works there, so
#: later requests skip the check. Bounded, least recently used first out.
_shm_mapped: "OrderedDict[Tuple[int, int], bool]" = OrderedDict()
_shm_lock = threading.Lock()
MAX_SHM_KNOWN = 1024


def _inode(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _shm_known_ok(key: Tuple[int, int]) -> bool:
    with _shm_lock:
        if key in _shm_mapped:
            _shm_mapped.move_to_end(key)
            return True
        return False


def _shm_ok(key: Tuple[int, int]) -> None:
    with _shm_lock:
        _shm_mapped[key] = True
        _shm_mapped.move_to_end(key)
        while len(_shm_mapped) > MAX_SHM_KNOWN:
            _shm_mapped.popitem(last=False)


def _persistent_shm_error(
    kit: Kit, conn: Any, target: Target, config: Config,
) -> Tuple[Optional[BaseException], bool]:
    """(the shared-memory error, if it persisted through every attempt of the retry
    budget and at least MIN_SHM_ATTEMPTS; whether a read succeeded)."""
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        error = _probe_read(kit, conn, target.path)
        if error is None:
            return None, True
        if not _is_shm_error(error):
            return None, False  # another problem: the application's next statement meets it
        delay = policy.retry_delay(attempts, time.monotonic() - started, config,
                                   _random.random())
        if delay is None:
            return (error if attempts >= MIN_SHM_ATTEMPTS else None), False
        events.emit(
            "wal-check-retry", logging.INFO,
            f"walpatch: reading {target.path} after its switch to WAL failed with "
            f"{_c.error_code(error)[1]}; checking again in {delay:.3f}s",
            file=target.path, schema=target.schema, request="wal",
            error=_c.error_code(error)[1], attempts=attempts, outcome="retry")
        time.sleep(delay)


def _probe_read(kit: Kit, conn: Any, path: str) -> Optional[BaseException]:
    """One read of ``path`` on a fresh connection of the caller's SQLite library (never
    creating anything: mode=rw), with the VFS the caller named; the error, or None."""
    from urllib.parse import quote

    cls = getattr(kit.raw_cursor, "__objclass__", None)
    if not isinstance(cls, type):
        return None
    params = _uri_params(getattr(conn, "_walpatch_database", None))
    uri = "file:" + quote(os.fsencode(path), safe="/") + "?mode=rw"
    if params.get("vfs"):
        uri += "&vfs=" + quote(params["vfs"], safe="")
    try:
        probe = cls(uri, uri=True, timeout=0.2, check_same_thread=False,
                    isolation_level=None)
    except kit.error as exc:
        return exc
    try:
        _fetch(kit, probe, "PRAGMA schema_version")
        return None
    except kit.error as exc:
        return exc
    finally:
        try:
            probe.close()
        except kit.error:
            pass


def _undo_unusable_wal(
    kit: Kit, conn: Any, request: Request, targets: List[Target], config: Config,
    error: BaseException,
) -> None:
    reverted: List[str] = []
    for target in targets:
        if _revert_without_shared_memory(kit, conn, target.schema):
            reverted.append(target.path)
    _record_wal_error(kit, request, targets, error, config, attempts=1, note=False,
                      category=_c.WAL_UNSUPPORTED)
    for target in targets:
        undone = target.path in reverted
        events.emit(
            "wal-unusable", logging.ERROR,
            f"walpatch: {target.path} entered WAL but its -shm cannot be mapped here "
            f"({_c.error_code(error)[1] or error}): WAL cannot work on this filesystem; "
            + ("walpatch put the file back in rollback-journal mode (DELETE)"
               if undone else "the file could NOT be put back (another connection has it "
               "open?); run PRAGMA locking_mode=EXCLUSIVE then PRAGMA journal_mode=DELETE "
               "alone on it to recover"),
            file=target.path, schema=target.schema, request="wal",
            error=_c.error_code(error)[1], outcome="reverted" if undone else "unusable")
    _note(error, "walpatch: WAL cannot work here (no shared memory); "
          + ("the file was put back in its previous journal mode" if reverted else
             "the file could not be put back"))
    try:
        raise error
    finally:
        del error  # no cycle through this frame (see _guard_wal)


def _revert_without_shared_memory(kit: Kit, conn: Any, schema: str, mode: str = "delete") -> bool:
    """Leave WAL through exclusive locking mode, which keeps the WAL index in heap memory."""
    prefix = f"PRAGMA {_quote(schema)}."
    rows: List[Tuple[str, ...]] = []
    try:
        _query(kit, conn, prefix + "locking_mode=EXCLUSIVE")
        try:
            # The first attempt still meets the shared-memory error (seen on SQLite 3.40.1);
            # it takes the exclusive lock, and the next one goes through the heap-memory index.
            for _ in range(3):
                try:
                    rows = _query(kit, conn, f"{prefix}journal_mode={mode}")
                    break
                except kit.error:
                    continue
        finally:
            _query(kit, conn, prefix + "locking_mode=NORMAL")
            try:
                _query(kit, conn, "PRAGMA schema_version")  # releases the exclusive lock
            except kit.error:
                pass
    except kit.error:
        return False
    return bool(rows) and ascii_lower(rows[0][0]) == mode


def sqlite3_rejects(
    kit: Kit, conn: Any, sql: str, single: Single, args: Tuple[Any, ...], many: bool,
) -> bool:
    """Would sqlite3 itself refuse ``execute(sql, *args)`` (or ``executemany``) before
    running anything? Then the guard stays out of the way and sqlite3 raises its own error
    (issue 10 item 12): several statements ("You can only execute one statement at a
    time"), wrong bindings, bad parameter types. Which tails each CPython accepts differs
    (3.8 rejects a trailing form feed, 3.10+ a lone '-'), so sqlite3 is asked, not
    imitated: the same text with EXPLAIN before the request runs nothing (EXPLAIN only lists
    the program) and passes the same checks, with the same parameters. Only done when the
    text has more than white space and comments after its statement, or parameters other
    than an empty tuple/list/dict.
    """
    if runtime.config is None:
        return False
    first_set = many and bool(args) and type(args[0]) in (tuple, list) and bool(args[0])
    if single.clean:
        if (many and not first_set) or not args:
            return False
        if len(args) == 1 and type(args[0]) in (tuple, list, dict) and not args[0]:
            return False
    probe = sql[:single.start] + "EXPLAIN " + sql[single.start:]
    try:
        cur = kit.raw_cursor(conn)
    except kit.usage_errors:
        return True
    except Exception:  # noqa: BLE001 - cannot tell: guard as usual (fail closed)
        return False
    try:
        if many:
            # Only the first parameter set, and only from a list or tuple (the caller's
            # iterator may be one-shot); else only the checks made when the statement is
            # prepared. Not the "executemany() can only execute DML statements" of 3.8-3.10:
            # it comes *after* the statement ran (a downgrade is done by then), so it must be
            # guarded like any other request (below).
            cur.executemany(probe, args[0][:1] if first_set else [])
        else:
            cur.execute(probe, *args)
    except kit.usage_errors as exc:
        return "can only execute DML" not in str(exc)
    except kit.error:
        return False  # an error of SQLite's (locked, unknown database...): guard as usual
    except Exception:  # noqa: BLE001 - Warning, ValueError, TypeError: raised before running
        return True
    finally:
        try:
            cur.close()
        except Exception:  # noqa: BLE001
            pass
    return False
