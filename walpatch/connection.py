"""Guarded Connection and Cursor subclasses, injected through ``connect(factory=...)``.

Why subclasses and not a proxy (design.md §1): a subclass is still a real
``sqlite3.Connection`` for C-level type checks (``backup``, ``sqlite3.Cursor(conn)``,
pickling errors, context managers). One guarded subclass is made per caller class and cached,
so ``isinstance(conn, MyConnection)`` keeps holding.

The hot path is each override's first two lines: a memoized ``scan`` (one dict lookup) and a
call of the original C method. Everything else happens only for journal-mode requests.

CPython 3.11+ creates the cursor of ``Connection.execute*`` in C, without calling an
overridden ``cursor()``, so the connection's three ``execute*`` methods are guarded there;
3.8-3.10 route them through ``self.cursor()``, so only the cursor guards them (never twice).
Which of the two a DB-API module does is *measured* once per module (``_routes_through_cursor``)
rather than read from the Python version: the drop-ins (pysqlite3, sqlean) carry their own,
older copy of the C code, which calls ``self.cursor()`` on every Python version.
"""
from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import Any, Dict, Tuple

from . import events, guard, lockguard, speedups
from .errors import refusal_class_for
from .sqlscan import _CACHE as _PLANS
from .sqlscan import scan

_NO_ARG: Any = object()  # "no parameters given", distinct from any value a caller can pass

_routes_cache: Dict[int, Dict[str, bool]] = {}


def _routes_through_cursor(module: ModuleType) -> Dict[str, bool]:
    """For each of execute/executemany/executescript: does ``module.Connection``'s method
    create its cursor through ``self.cursor()``? Measured on a ``:memory:`` connection made
    directly from the class (no file, not through the hooked ``connect``)."""
    routes = _routes_cache.get(id(module))
    if routes is not None:
        return routes
    seen = []
    connection_cls = module.Connection

    def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(True)
        return connection_cls.cursor(self, *args, **kwargs)

    probe_cls = type("WalpatchRouteProbe", (connection_cls,), {"cursor": cursor})
    routes = {}
    conn = probe_cls(":memory:")
    try:
        for name, args in (("execute", ("SELECT 1",)), ("executemany", ("SELECT 1", [])),
                           ("executescript", ("SELECT 1;",))):
            del seen[:]
            try:
                getattr(conn, name)(*args)
            except Exception:  # noqa: BLE001 - only whether cursor() was called matters
                pass
            routes[name] = bool(seen)
    finally:
        conn.close()
    _routes_cache[id(module)] = routes
    return routes

_lock = threading.RLock()  # guarded_cursor_class may run inside guarded_connection_class
_connection_classes: Dict[Tuple[int, type], type] = {}
_cursor_classes: Dict[type, type] = {}
_cursor_guards: Dict[int, type] = {}
_kits: Dict[int, guard.Kit] = {}

GUARDED_MARK = "_walpatch_guarded"


def kit_for(module: ModuleType) -> guard.Kit:
    kit = _kits.get(id(module))
    if kit is None:
        kit = guard.Kit(
            error=module.Error,
            programming_error=module.ProgrammingError,
            usage_errors=(module.ProgrammingError, module.InterfaceError),
            refused=refusal_class_for(module),
            raw_cursor=module.Connection.cursor,
        )
        _kits[id(module)] = kit
    return kit


def _like(function: Any, original: Any) -> Any:
    """Give an override the name, qualified name and docstring of the method it stands in
    for, and ``__wrapped__`` so that ``inspect.signature`` reports the original's signature."""
    for attr in ("__name__", "__qualname__", "__doc__"):
        try:
            setattr(function, attr, getattr(original, attr))
        except (AttributeError, TypeError):
            pass
    function.__wrapped__ = original
    return function


# The slow paths live outside the overrides: a lambda inside an override would make Python
# create closure cells for its variables on *every* call, fast path included.
def _guarded(kit: guard.Kit, conn: Any, plan: Any, method: Any, target: Any, sql: str,
             args: Tuple[Any, ...], can_retry: bool) -> Any:
    """execute/executemany of a text holding a request: guarded only when sqlite3 would run
    it (``plan.single``); what sqlite3 rejects before running anything, sqlite3 rejects."""
    single = plan.single
    if single is None or guard.sqlite3_rejects(kit, conn, sql, single, args, not can_retry):
        return method(target, sql, *args)
    # call() runs the statement; call(text) runs text in its place through the same method
    # and cursor (the guard's answer for on_refusal=keep and wal_reset_bug=avoid).
    return guard.run_statement(
        kit, conn, single.request, lambda text=sql: method(target, text, *args),
        can_retry=can_retry)


def _guarded_script(kit: guard.Kit, conn: Any, plan: Any, script_method: Any, target: Any,
                    sql: str, cursor_for_one: Any) -> Any:
    """The script's requests run one by one on a cursor of their own (``cursor_for_one``):
    the caller's cursor must end as executescript leaves it (no rows), not holding a
    pragma's answer."""
    return guard.run_script(
        kit, conn, plan, sql, lambda text: script_method(target, text),
        lambda text: cursor_for_one(conn).execute(text))


def _execute_methods(base: Any, kit: guard.Kit, on_cursor: bool) -> Dict[str, Any]:
    """execute/executemany/executescript overrides of ``base`` (a Cursor or Connection class).

    The hot path (every execute): one dict lookup, one call of the C method. Positional-only
    parameters with a sentinel rather than *args: packing and unpacking an args tuple costs
    about as much again as the rest of the override (measured with callgrind). ``sql`` is
    positional-only like the C methods': ``execute(sql=...)`` raises TypeError with walpatch
    as without it (the messages of such argument errors differ in wording).
    """
    base_execute = base.execute
    base_executemany = base.executemany
    base_executescript = base.executescript
    conn_of = _connection_of_cursor if on_cursor else _itself  # slow path only

    def execute(self: Any, sql: Any, parameters: Any = _NO_ARG, /, *extra: Any) -> Any:
        try:
            plan = _PLANS[sql]
        except (KeyError, TypeError):
            plan = scan(sql)
        if plan is None:
            if parameters is _NO_ARG:
                return base_execute(self, sql)
            if extra:  # too many arguments: let sqlite3 raise its own TypeError
                return base_execute(self, sql, parameters, *extra)
            return base_execute(self, sql, parameters)
        args = () if parameters is _NO_ARG else (parameters, *extra)
        return _guarded(kit, conn_of(self), plan, base_execute, self, sql, args, True)

    def executemany(self: Any, sql: Any, /, *args: Any) -> Any:
        try:
            plan = _PLANS[sql]
        except (KeyError, TypeError):
            plan = scan(sql)
        if plan is None:
            return base_executemany(self, sql, *args)
        return _guarded(kit, conn_of(self), plan, base_executemany, self, sql, args, False)

    def executescript(self: Any, sql: Any, /, *args: Any) -> Any:
        plan = scan(sql)
        if plan is None or args:
            return base_executescript(self, sql, *args)
        return _guarded_script(kit, conn_of(self), plan, base_executescript, self, sql,
                               kit.raw_cursor)

    return {
        "execute": _compiled(execute, base_execute),
        "executemany": _compiled(executemany, base_executemany),
        "executescript": _like(executescript, base_executescript),
    }


def _compiled(override: Any, base_method: Any) -> Any:
    """``override`` (a pure-Python execute/executemany above), or, when walpatch._speedups is
    in use, the same in C: a ``GuardedMethod`` that does the fast path itself (lookup in
    ``_PLANS``, ``scan`` on a miss, ``base_method`` when the plan is None) and calls
    ``override`` for everything else (a plan, argument errors). See walpatch/_speedups.c."""
    if speedups.module is None:
        return _like(override, base_method)
    _like(override, base_method)  # its TypeErrors name the method like the base's
    return _like(speedups.module.GuardedMethod(_PLANS, scan, base_method, override),
                 base_method)


def _connection_of_cursor(cursor: Any) -> Any:
    return cursor.connection


def _itself(conn: Any) -> Any:
    return conn


def _make_cursor_class(base: Any, kit: guard.Kit) -> type:
    namespace = {
        "__slots__": (),
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        GUARDED_MARK: True,
        **_execute_methods(base, kit, on_cursor=True),
    }
    return type(base.__name__, (base,), namespace)


def guarded_cursor_class(base: type, kit: guard.Kit) -> type:
    """The guarded subclass of cursor class ``base`` (cached); ``base`` itself when it is
    guarded already or cannot be subclassed (fail open: the cursor then works unguarded)."""
    if getattr(base, GUARDED_MARK, False):
        return base
    cls = _cursor_classes.get(base)
    if cls is not None:
        return cls
    with _lock:
        cls = _cursor_classes.get(base)
        if cls is None:
            try:
                cls = _make_cursor_class(base, kit)
            except Exception as exc:  # e.g. an __init_subclass__ that refuses subclasses
                _warn_unguardable(base, exc)
                return base
            _cursor_classes[base] = cls
        return cls


def _warn_unguardable(cls: type, exc: BaseException) -> None:
    events.emit(
        "unguardable-class", logging.WARNING,
        f"walpatch: cannot subclass {cls.__module__}.{cls.__qualname__} ({exc!r}); its "
        "objects are not guarded", dedupe_key=f"{cls.__module__}.{cls.__qualname__}",
        outcome="unguarded")


def guard_cursor_object(cur: Any, default_cursor: type, kit: guard.Kit) -> Any:
    """Guard a cursor that was made without our factory (by a cursor factory that is a
    function, or by a ``cursor()`` override that builds it itself): switch its class to the
    guarded subclass of its class, which has the same layout. Not possible for an instance of
    the C type ``sqlite3.Cursor`` itself (immutable): such a cursor stays unguarded."""
    cls = type(cur)
    if getattr(cls, GUARDED_MARK, False) or not isinstance(cur, default_cursor):
        return cur
    if not cls.__flags__ & _HEAPTYPE or cls.__flags__ & _IMMUTABLETYPE:
        return cur
    guarded = guarded_cursor_class(cls, kit)
    if guarded is not cls:
        try:
            cur.__class__ = guarded
        except TypeError:  # a layout __class__ assignment does not accept: leave it as it is
            pass
    return cur


_HEAPTYPE = 1 << 9
_IMMUTABLETYPE = 1 << 8  # 3.10+; the C types of 3.8/3.9 are not heap types anyway


def _cursor_guard_class(module: ModuleType, kit: guard.Kit) -> type:
    """A ``module.Connection`` subclass that guards ``cursor()`` and is placed *behind* the
    caller's connection class in the guarded class's MRO (bases ``(caller's class, this)``).

    So a caller's class whose own ``cursor()`` calls ``super().cursor(MyCursor)`` reaches this
    method with *its* factory, which is then swapped for the guarded subclass of MyCursor; and
    a ``cursor()`` override that takes no factory argument is called exactly as it was.
    """
    cls = _cursor_guards.get(id(module))
    if cls is not None:
        return cls
    connection_cls = module.Connection
    base_cursor = connection_cls.cursor
    default_cursor = module.Cursor

    def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
        factory = args[0] if args else kwargs.get("factory", default_cursor)
        if isinstance(factory, type) and issubclass(factory, default_cursor):
            guarded = guarded_cursor_class(factory, kit)
            if args:
                args = (guarded,) + args[1:]
            else:
                kwargs["factory"] = guarded
            return base_cursor(self, *args, **kwargs)
        # A factory that is a function: guard what it returns where its class allows it.
        return guard_cursor_object(base_cursor(self, *args, **kwargs), default_cursor, kit)

    cls = type("WalpatchCursorGuard", (connection_cls,), {
        "__slots__": (),
        "__module__": __name__,
        "__doc__": "walpatch: guards the cursors of a connection (see connection.py).",
        "cursor": _like(cursor, base_cursor),
    })
    _cursor_guards[id(module)] = cls
    return cls


def _make_connection_class(base: Any, module: ModuleType, kit: guard.Kit) -> type:
    cursor_guard = _cursor_guard_class(module, kit)
    default_cursor = module.Cursor

    namespace: Dict[str, Any] = {
        # what connect() was given (set by hooks.py), to explain a silent refusal of WAL;
        # __weakref__: the lock guard notices a connection dropped without close()
        "__slots__": ("_walpatch_database",) + (
            () if base.__weakrefoffset__ else ("__weakref__",)),
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        GUARDED_MARK: True,
        "close": lockguard.closing(base.close),  # the lock guard releases after close()
    }

    if base.cursor is not module.Connection.cursor:
        # The caller's class has its own cursor(): call it exactly as the caller did, then
        # guard a cursor it built itself (MyCursor(self)) rather than through super().cursor.
        base_cursor = base.cursor

        def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
            return guard_cursor_object(base_cursor(self, *args, **kwargs), default_cursor, kit)

        namespace["cursor"] = _like(cursor, base_cursor)

    routes = _routes_through_cursor(module)
    if not (routes["execute"] and routes["executemany"] and routes["executescript"]):
        methods = _execute_methods(base, kit, on_cursor=False)
        # Only where the C method does not already reach the guarded cursor (never twice).
        for name, function in methods.items():
            if not routes[name]:
                namespace[name] = function

    bases = (cursor_guard,) if base is module.Connection else (base, cursor_guard)
    try:
        return type(base.__name__, bases, namespace)
    except TypeError:
        # No consistent MRO with the cursor guard behind the caller's class (an unusual
        # hierarchy): guard on top only; its cursors are then guarded by guard_cursor_object.
        if "cursor" not in namespace:
            guard_cursor = cursor_guard.__dict__["cursor"]

            def top_cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
                return guard_cursor(self, *args, **kwargs)

            namespace["cursor"] = _like(top_cursor, base.cursor)
        return type(base.__name__, (base,), namespace)


def guarded_connection_class(base: Any, module: ModuleType) -> Any:
    """The guarded subclass for connection class ``base`` (cached); ``base`` itself when it
    cannot be guarded (not a Connection subclass, already guarded, or not subclassable)."""
    if not isinstance(base, type) or not issubclass(base, module.Connection):
        return base
    if getattr(base, GUARDED_MARK, False):
        return base
    key = (id(module), base)
    cls = _connection_classes.get(key)
    if cls is not None:
        return cls
    with _lock:
        cls = _connection_classes.get(key)
        if cls is None:
            kit = kit_for(module)
            try:
                cls = _make_connection_class(base, module, kit)
            except Exception as exc:  # fail open: the caller's class, unguarded
                _warn_unguardable(base, exc)
                return base
            _connection_classes[key] = cls
        return cls


def is_guarded(conn: Any) -> bool:
    return bool(getattr(type(conn), GUARDED_MARK, False))
