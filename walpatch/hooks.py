"""Wrap ``connect`` of sqlite3 (and of the drop-in modules pysqlite3 and sqlean) with wrapt.

The wrapper only swaps the ``factory`` argument for a guarded subclass of whatever the
caller asked for (``connection.py``); the connection is still made by the original C
function. Both ``pkg.connect`` and ``pkg.dbapi2.connect`` are wrapped, since code imports
either. Like dd-trace-py's integrations, ``patch``/``unpatch`` are symmetric and idempotent
and leave a flag on the module; if another tool wrapped ``connect`` on top of ours,
``unpatch`` cannot take ours out of the middle of the chain, so it disables it instead.
"""
from __future__ import annotations

import sys
import threading
from types import ModuleType
from typing import Any, Callable, Dict, List, Tuple

from . import importhook

#: top-level package -> its DB-API module
FAMILIES: Dict[str, str] = {
    "sqlite3": "sqlite3.dbapi2",
    "pysqlite3": "pysqlite3.dbapi2",
    "sqlean": "sqlean.dbapi2",
}
PATCH_FLAG = "_walpatch_patched"
FACTORY_POSITION = 5  # connect(database, timeout, detect_types, isolation_level,
#                       check_same_thread, factory, ...)

_lock = threading.RLock()
_active = False
# (module, attribute name, original, our wrapper)
_patched: List[Tuple[ModuleType, str, Any, Any]] = []


def is_active() -> bool:
    return _active


def _make_wrapper(dbapi: ModuleType) -> Any:
    default = dbapi.Connection
    # The guard (connection.py and what it imports) is loaded at the first connect(), not when
    # the application imports sqlite3: an application that imports sqlite3 and never
    # connects does not pay for it. Holds connection.guarded_connection_class once loaded.
    loaded: List[Callable[[Any, ModuleType], Any]] = []

    def connect_wrapper(
        wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Any:
        if not loaded:
            from .connection import guarded_connection_class

            loaded.append(guarded_connection_class)
        factory = loaded[0]
        if len(args) > FACTORY_POSITION:
            guarded = factory(args[FACTORY_POSITION], dbapi)
            args = args[:FACTORY_POSITION] + (guarded,) + args[FACTORY_POSITION + 1:]
        else:
            kwargs["factory"] = factory(kwargs.get("factory", default), dbapi)
        return wrapped(*args, **kwargs)

    return connect_wrapper


_reentry = threading.local()


def _patch_family(package: ModuleType) -> None:
    """Post-import callback: wrap connect in ``package`` and its dbapi2 module.

    An import made here could import another watched family (``connection`` imports
    ``errors``, which imports ``sqlite3``: that is why the guard is loaded at the first
    ``connect()`` instead), whose callback would then run inside this one, on this thread.
    Such a nested call is queued and patched by the outer call once its imports are done.
    """
    pending = getattr(_reentry, "pending", None)
    if pending is not None:
        pending.append(package)
        return
    _reentry.pending = pending = [package]
    try:
        import wrapt  # only now: importing wrapt costs tens of milliseconds

        while pending:
            _patch_one(pending.pop(0), wrapt)
    finally:
        _reentry.pending = None


def _patch_one(package: ModuleType, wrapt: Any) -> None:
    dbapi_name = FAMILIES.get(package.__name__)
    dbapi = sys.modules.get(dbapi_name) if dbapi_name else None
    if dbapi is None:
        return
    wrapper = _make_wrapper(dbapi)
    with _lock:
        for module in (package, dbapi):
            if module.__dict__.get(PATCH_FLAG):
                continue
            original = getattr(module, "connect", None)
            if original is None:
                continue
            wrapped = wrapt.FunctionWrapper(original, wrapper, enabled=is_active)
            setattr(module, "connect", wrapped)
            setattr(module, PATCH_FLAG, True)
            _patched.append((module, "connect", original, wrapped))


def patch() -> None:
    """Arm the hooks: patch modules already imported, and others when they are imported."""
    global _active
    with _lock:
        _active = True
        for package in FAMILIES:
            importhook.when_imported(package, _patch_family)


def unpatch() -> None:
    """Put the original ``connect`` functions back (where nobody wrapped on top of ours)."""
    global _active
    with _lock:
        _active = False
        importhook.forget(_patch_family)
        for module, name, original, wrapped in _patched:
            if getattr(module, name, None) is wrapped:
                setattr(module, name, original)
            # else: another wrapper sits on top of ours; ours stays in its chain, disabled.
            try:
                delattr(module, PATCH_FLAG)
            except AttributeError:
                pass
        _patched.clear()


def hooked_modules() -> List[str]:
    with _lock:
        return sorted({module.__name__ for module, _, _, _ in _patched})
