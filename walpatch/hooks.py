"""Wrap ``connect`` of sqlite3 (and of the drop-in modules pysqlite3 and sqlean) with wrapt.

The wrapper only swaps the ``factory`` argument for a guarded subclass of whatever the
caller asked for (``connection.py``); the connection is still made by the original C
function. Both ``pkg.connect`` and ``pkg.dbapi2.connect`` are wrapped, since code imports
either. Like dd-trace-py's integrations, ``patch``/``unpatch`` are symmetric and idempotent
and leave a flag on the module.

Stacking with other instrumentation (OpenTelemetry, ddtrace): when ``connect`` is already a
wrapt wrapper, ours goes *beneath* it (innermost), because such tools uninstrument with
``module.connect = module.connect.__wrapped__`` and would otherwise strip ours instead of
theirs. ``unpatch`` takes ours out wherever it sits in a chain of wrapt wrappers; under a
wrapper of another kind it cannot, and ours stays there disabled.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
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
_errors: List[str] = []  # patching failures, for is_installed()/status()

# CPython 3.13 deprecates positional arguments after the first; its warning would point at
# our wrapper, so the wrapper passes them as keywords and warns on the caller's line instead.
# 3.15 makes them keyword-only (a TypeError): there they go to the original connect as given,
# so that the application gets the interpreter's own error, with or without walpatch.
_KEYWORD_AFTER_FIRST = (3, 13) <= sys.version_info < (3, 15)
_KEYWORD_ONLY = sys.version_info >= (3, 15)
_CONNECT_PARAMETERS = ("timeout", "detect_types", "isolation_level", "check_same_thread",
                       "factory", "cached_statements", "uri")
_POSITIONAL_WARNING = (
    "Passing more than 1 positional argument to sqlite3.connect() is deprecated. Parameters "
    "'timeout', 'detect_types', 'isolation_level', 'check_same_thread', 'factory', "
    "'cached_statements' and 'uri' will become keyword-only parameters in Python 3.15.")


def is_active() -> bool:
    return _active


def errors() -> List[str]:
    with _lock:
        return list(_errors)


def _make_wrapper(dbapi: ModuleType) -> Any:
    default = dbapi.Connection
    # The guard (connection.py and what it imports) is loaded at the first connect(), not when
    # the application imports sqlite3: an application that imports sqlite3 and never
    # connects does not pay for it. Holds (guarded_connection_class, events.count) once loaded.
    loaded: List[Tuple[Callable[..., Any], Callable[..., Any]]] = []
    stdlib = dbapi.__name__ == "sqlite3.dbapi2"
    warn_positional = _KEYWORD_AFTER_FIRST and stdlib
    keyword_only = _KEYWORD_ONLY and stdlib

    def connect_wrapper(
        wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Any:
        if keyword_only and len(args) > 1:
            return wrapped(*args, **kwargs)  # raises the interpreter's own TypeError
        if not loaded:
            from .connection import guarded_connection_class
            from .events import count

            # One item, replaced whole: threads racing through here all store the same pair.
            loaded[:] = [(guarded_connection_class, count)]
        factory, count = loaded[0]
        # (Not when the factory itself is positional: sqlite3 then passes the arguments on
        # positionally and the factory's __init__ warns too; keywords would lose that.)
        if (warn_positional and 1 < len(args) <= FACTORY_POSITION
                and not set(kwargs) & set(_CONNECT_PARAMETERS[:len(args) - 1])):
            # On the caller's line: past our frame and wrapt's (pure-Python wrapt, as on
            # free-threaded builds where wrapt 2.5 installs without its C extension, adds one).
            wrapt_dir = os.path.dirname(getattr(sys.modules.get("wrapt"), "__file__", "") or "")
            skip: Dict[str, Any] = {  # a 3.12+ argument; this branch runs on 3.13/3.14 only
                "skip_file_prefixes": (wrapt_dir + os.sep,) if wrapt_dir else ()}
            warnings.warn(_POSITIONAL_WARNING, DeprecationWarning, stacklevel=2, **skip)
            kwargs.update(zip(_CONNECT_PARAMETERS, args[1:]))
            args = args[:1]
        if len(args) > FACTORY_POSITION:
            guarded = factory(args[FACTORY_POSITION], dbapi)
            args = args[:FACTORY_POSITION] + (guarded,) + args[FACTORY_POSITION + 1:]
        else:
            kwargs["factory"] = factory(kwargs.get("factory", default), dbapi)
        conn = wrapped(*args, **kwargs)
        try:  # no __init__ override: one Python frame less on every connect
            conn._walpatch_database = args[0] if args else kwargs.get("database")
        except AttributeError:
            pass  # a factory walpatch could not guard
        else:
            count("connections")
        return conn

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
    except Exception as exc:  # fail open, but say so: is_installed() turns False
        message = f"walpatch: could not hook {package.__name__}.connect: {exc!r}; NOT guarded"
        with _lock:
            _errors.append(message)
        from .events import logger

        logger.error("%s", message)
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
            # Beneath any wrapt wrappers already there (see the module docstring).
            parent = None
            while isinstance(original, _proxy_type(wrapt)):
                parent, original = original, original.__wrapped__
            wrapped = wrapt.FunctionWrapper(original, wrapper, enabled=is_active)
            if parent is None:
                setattr(module, "connect", wrapped)
            else:
                parent.__wrapped__ = wrapped
            setattr(module, PATCH_FLAG, True)
            _patched.append((module, "connect", original, wrapped))


def _proxy_type(wrapt: Any) -> Any:
    """The base class of every wrapt wrapper (wrapt 2 split it from ObjectProxy)."""
    return getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)


def _take_out(module: ModuleType, name: str, original: Any, ours: Any) -> bool:
    """Remove ``ours`` from the chain of wrappers at ``module.name``; False if it cannot."""
    import wrapt  # already imported: ours is a wrapt wrapper

    link: Any = getattr(module, name, None)
    if link is ours:
        setattr(module, name, original)
        return True
    while isinstance(link, _proxy_type(wrapt)):
        inner = link.__wrapped__
        if inner is ours:
            try:
                link.__wrapped__ = original
                return True
            except (AttributeError, TypeError):
                return False
        link = inner
    return False


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
            # If ours cannot be taken out, it stays in the chain, disabled (is_active False).
            _take_out(module, name, original, wrapped)
            try:
                delattr(module, PATCH_FLAG)
            except AttributeError:
                pass
        _patched.clear()
        del _errors[:]


def hooked_modules() -> List[str]:
    with _lock:
        return sorted({module.__name__ for module, _, _, _ in _patched})
