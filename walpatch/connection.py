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
"""
from __future__ import annotations

import sys
import threading
from types import ModuleType
from typing import Any, Dict, Tuple

from . import events, guard
from .errors import refusal_class_for
from .sqlscan import scan

_CONNECTION_EXECUTES_IN_C = sys.version_info >= (3, 11)

_lock = threading.Lock()
_connection_classes: Dict[Tuple[int, type], type] = {}
_cursor_classes: Dict[type, type] = {}
_kits: Dict[int, guard.Kit] = {}

GUARDED_MARK = "_walpatch_guarded"


def kit_for(module: ModuleType) -> guard.Kit:
    kit = _kits.get(id(module))
    if kit is None:
        kit = guard.Kit(
            error=module.Error,
            programming_error=module.ProgrammingError,
            refused=refusal_class_for(module),
            raw_cursor=module.Connection.cursor,
        )
        _kits[id(module)] = kit
    return kit


def _make_cursor_class(base: Any, kit: guard.Kit) -> type:
    base_execute = base.execute
    base_executemany = base.executemany
    base_executescript = base.executescript

    def execute(self: Any, sql: Any, *args: Any) -> Any:
        plan = scan(sql)
        if plan is None:
            return base_execute(self, sql, *args)
        return guard.run_statement(
            kit, self.connection, plan.requests[0],
            lambda: base_execute(self, sql, *args), can_retry=True)

    def executemany(self: Any, sql: Any, *args: Any) -> Any:
        plan = scan(sql)
        if plan is None:
            return base_executemany(self, sql, *args)
        return guard.run_statement(
            kit, self.connection, plan.requests[0],
            lambda: base_executemany(self, sql, *args), can_retry=False)

    def executescript(self: Any, sql: Any, *args: Any) -> Any:
        plan = scan(sql)
        if plan is None or args:
            return base_executescript(self, sql, *args)
        return guard.run_script(
            kit, self.connection, plan, sql,
            lambda text: base_executescript(self, text),
            lambda text: base_execute(self, text))

    namespace = {
        "__slots__": (),
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        GUARDED_MARK: True,
        "execute": execute,
        "executemany": executemany,
        "executescript": executescript,
    }
    return type(base.__name__, (base,), namespace)


def guarded_cursor_class(base: type, kit: guard.Kit) -> type:
    if getattr(base, GUARDED_MARK, False):
        return base
    with _lock:
        cls = _cursor_classes.get(base)
        if cls is None:
            cls = _cursor_classes[base] = _make_cursor_class(base, kit)
        return cls


def _make_connection_class(base: Any, module: ModuleType, kit: guard.Kit) -> type:
    base_init = base.__init__
    base_cursor = base.cursor
    default_cursor = module.Cursor
    base_execute = base.execute
    base_executemany = base.executemany
    base_executescript = base.executescript

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base_init(self, *args, **kwargs)
        self._walpatch_database = args[0] if args else kwargs.get("database")
        events.count("connections")

    def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
        factory = args[0] if args else kwargs.get("factory", default_cursor)
        if isinstance(factory, type) and issubclass(factory, default_cursor):
            guarded = guarded_cursor_class(factory, kit)
            if args:
                args = (guarded,) + args[1:]
            else:
                kwargs["factory"] = guarded
        # A factory that is a plain function cannot be subclassed: its cursors are not guarded
        # (README "Limits"); Connection.execute* on 3.11+ still are.
        return base_cursor(self, *args, **kwargs)

    namespace: Dict[str, Any] = {
        "__slots__": ("_walpatch_database",),
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        GUARDED_MARK: True,
        "__init__": __init__,
        "cursor": cursor,
    }

    if _CONNECTION_EXECUTES_IN_C:
        def execute(self: Any, sql: Any, *args: Any) -> Any:
            plan = scan(sql)
            if plan is None:
                return base_execute(self, sql, *args)
            return guard.run_statement(
                kit, self, plan.requests[0], lambda: base_execute(self, sql, *args),
                can_retry=True)

        def executemany(self: Any, sql: Any, *args: Any) -> Any:
            plan = scan(sql)
            if plan is None:
                return base_executemany(self, sql, *args)
            return guard.run_statement(
                kit, self, plan.requests[0], lambda: base_executemany(self, sql, *args),
                can_retry=False)

        def executescript(self: Any, sql: Any, *args: Any) -> Any:
            plan = scan(sql)
            if plan is None or args:
                return base_executescript(self, sql, *args)
            return guard.run_script(
                kit, self, plan, sql, lambda text: base_executescript(self, text),
                lambda text: base_execute(self, text))

        namespace.update(execute=execute, executemany=executemany, executescript=executescript)

    return type(base.__name__, (base,), namespace)


def guarded_connection_class(base: Any, module: ModuleType) -> Any:
    """The guarded subclass for connection class ``base`` (cached); ``base`` itself when it
    cannot be guarded (not a Connection subclass, or already guarded)."""
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
            cls = _connection_classes[key] = _make_connection_class(base, module, kit)
        return cls


def is_guarded(conn: Any) -> bool:
    return bool(getattr(type(conn), GUARDED_MARK, False))

