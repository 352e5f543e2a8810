"""Carry out the decision table for one journal-mode request: the I/O edge of policy.py.

Called only for statements that ``sqlscan`` found to be journal-mode requests; everything
else never reaches this module. The statement itself runs through ``call`` (the original,
unpatched sqlite3 method bound to the caller's connection or cursor), so the application's
cursor, its rows and its exception are the ones sqlite3 would have produced.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import random
import sys
import time
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

def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return os.fsdecode(bytes(value))
    return "" if value is None else str(value)


def _query(kit: Kit, conn: Any, sql: str) -> List[Tuple[str, ...]]:
    """A pragma's rows as tuples of str, whatever the caller's row_factory and text_factory.

    (The table-valued ``pragma_database_list`` would allow CAST AS BLOB, but it reads the
    schema and so needs a lock that a plain PRAGMA does not: it would fail under contention.)
    """
    saved = conn.text_factory
    if saved is str:
        rows = _fetch(kit, conn, sql)
    else:
        # The caller's text_factory may make anything of text (bytes, upper-cased paths...):
        # read with plain str for the moment of this query.
        conn.text_factory = str
        try:
            rows = _fetch(kit, conn, sql)
        finally:
            conn.text_factory = saved
    return [tuple(_text(v) for v in row) for row in rows]


def _fetch(kit: Kit, conn: Any, sql: str) -> List[Tuple[Any, ...]]:
    cur = kit.raw_cursor(conn)
    cur.row_factory = None
    try:
        return list(cur.execute(sql).fetchall())
    finally:
        cur.close()


def _targets(kit: Kit, conn: Any, schema: Optional[str], config: Config) -> List[Target]:
    """File-backed databases the request applies to (all attached ones when no schema)."""
    rows = _query(kit, conn, "PRAGMA database_list")
    wanted = ascii_lower(schema) if schema is not None else None
    out: List[Target] = []
    for row in rows:
        name, path = row[1], row[2]
        if wanted is not None and ascii_lower(name) != wanted:
            continue
        if not path:  # :memory:, temp, or an anonymous database: nothing on disk to protect
            continue
        if _is_excluded(path, config):
            continue
        out.append(Target(name, path))
    return out


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


def _current_mode(kit: Kit, conn: Any, schema: str) -> Optional[str]:
    try:
        rows = _query(kit, conn, f"PRAGMA {_quote(schema)}.journal_mode")
    except kit.error:
        return None
    return ascii_lower(rows[0][0]) if rows else None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- connect-time facts used to explain a silent refusal ---

_NO_SHM_VFS = ("unix-none", "unix-dotfile")


def _uri_params(database: Any) -> dict:
    text = _text(database) if database is not None else ""
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
    try:
        targets = _targets(kit, conn, request.schema, config)
    except kit.programming_error:
        return call()  # closed connection, wrong thread...: sqlite3 raises its own error
    except kit.error as exc:
        if request.is_wal:
            return call()
        # Cannot even list the databases: fail closed for a downgrade.
        schema = request.schema or "main"
        try:
            return _refuse_or_observe(
                kit, config, request, Target(schema, "?"), policy.Decision(
                    policy.REFUSE, f"the attached databases could not be listed ({exc})"), call,
                keepable=True)
        except sqliteinfo.Kept as kept:
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
            (r[1], r[2]) for r in _query(kit, conn, "PRAGMA database_list")]
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
    """After the script: is each file a WAL request reached in WAL now? Asked through the
    connection where the schema still names that file, from the header alone where the
    script detached it (or attached another file under its name)."""
    if not wal_targets:
        return []
    try:
        now = {ascii_lower(r[1]): r[2] for r in _query(kit, conn, "PRAGMA database_list")}
    except kit.error:
        now = {}
    out = []
    for request, targets in wal_targets:
        observations = []
        for t in targets:
            disk = ondisk.read_disk_state(t.path)
            if now.get(ascii_lower(t.schema)) == t.path:
                mode = _current_mode(kit, conn, t.schema)
            else:
                mode = "wal" if disk.mode == ondisk.WAL else disk.mode
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


def _record_wal_error(
    kit: Kit, request: Request, targets: List[Target], exc: BaseException, config: Config,
    attempts: int, note: bool, category: Optional[str] = None,
) -> None:
    category = category or _c.classify(exc, config.unsupported_markers)
    code, name = _c.error_code(exc)
    outcome = policy.outcome_for_category(category)
    # No str(exc) here: this text ends up in WalDowngradeRefused's message, which must not
    # contain the phrases legacy fallbacks match on ("disk i/o error", "locked").
    detail = f"{name or type(exc).__name__} ({category})"
    for target in targets:
        runtime.record(target.path, policy.History(outcome, category, exc, detail))
    counter = "wal_unsupported" if outcome == policy.WAL_UNSUPPORTED else "wal_failed"
    events.count(counter)
    try:
        exc.walpatch_attempts = attempts  # type: ignore[attr-defined]
    except AttributeError:
        pass
    if note:
        _note(exc, f"walpatch: PRAGMA journal_mode=WAL failed after {attempts} attempt(s); "
                   f"error class: {category}")
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
            _record_wal_error(kit, request, targets, exc, config, 1, note=True)
            raise
        _verify_wal(kit, conn, request, targets, config, 1, check_disk=False)
        return result
    started = time.monotonic()
    attempts = 0
    io_seen = False
    while True:
        attempts += 1
        try:
            # Run the request to completion so that the journal-mode change commits (and any
            # error of that commit surfaces) here, inside the retry loop.
            call().fetchall()
        except kit.usage_errors:
            raise
        except kit.error as exc:
            category = _c.classify(exc, config.unsupported_markers, after_io_error=io_seen)
            io_seen = io_seen or category == _c.TRANSIENT_IO
            # CORRUPT is retried too: a transient EIO on read surfaces as "malformed", and
            # real corruption simply fails again (and is then raised, never a downgrade signal).
            retryable = _c.is_retryable(category) or category == _c.CORRUPT
            name = _c.error_code(exc)[1] or type(exc).__name__
            if retryable and _wait_before_retry(
                    kit, conn, targets, config, attempts, started, f"{name} ({category})",
                    category, name):
                continue
            _record_wal_error(kit, request, targets, exc, config, attempts, note=True,
                              category=category)
            raise
        observations = _observe(kit, conn, targets, check_disk=True)
        if any(o.stale for o in observations) and _wait_before_retry(
                kit, conn, targets, config, attempts, started,
                "the connection reports WAL but the header on disk does not", _c.TRANSIENT_IO,
                None):
            continue
        _check_shared_memory(kit, conn, request, targets, config)
        _record_wal_result(conn, observations, attempts)
        # Hand the caller a fresh result: asking for the mode the connection is now in is a
        # no-op for SQLite.
        return call()


def _check_shared_memory(
    kit: Kit, conn: Any, request: Request, targets: List[Target], config: Config,
) -> None:
    """After a switch into WAL: can this connection use it? On a filesystem without shared
    mmap (FUSE with direct_io, some virtiofs/9p setups) SQLite answers 'wal' and writes the
    header, and then every statement fails with IOERR_SHMMAP, for every process: the file is
    bricked. The first read shows it. A file this request took out of a rollback mode is put
    back into rollback mode (exclusive locking mode needs no shared memory), and the error is
    raised, classified "WAL unsupported here", so the application's own fallback may run.

    Only a switch this request made can get here: a request for WAL on a file that is WAL on
    disk already reads it first, so without shared memory it fails by itself (IOERR_SHMMAP)
    and is raised before this check. So going back to DELETE undoes this request only.
    """
    try:
        _query(kit, conn, "PRAGMA schema_version")
        return
    except kit.error as exc:
        if _c.classify(exc, config.unsupported_markers) != _c.WAL_UNSUPPORTED:
            return  # another problem: the application's next statement will meet it
        error = exc
    reverted: List[str] = []
    for target in targets:
        if not config.observe and _revert_without_shared_memory(kit, conn, target.schema):
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
    raise error


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
    if single.clean:
        if many or not args:
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
            # No parameter set (the caller's iterator may be one-shot): only the checks made
            # when the statement is prepared. Not the "executemany() can only execute DML
            # statements" of 3.8-3.10: it comes *after* the statement ran (a downgrade is
            # done by then), so it must be guarded like any other request.
            cur.executemany(probe, [])
        else:
            cur.execute(probe, *args)
    except kit.usage_errors:
        return True
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
