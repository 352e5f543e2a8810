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

import functools
import logging
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
    # connects does not pay for it. Holds (guarded_connection_class, events.count,
    # sqliteinfo.watch_connect, lockguard.track) once loaded.
    loaded: List[Tuple[Callable[..., Any], ...]] = []
    stdlib = dbapi.__name__ == "sqlite3.dbapi2"
    warn_positional = _KEYWORD_AFTER_FIRST and stdlib
    keyword_only = _KEYWORD_ONLY and stdlib

    def connect_wrapper(
        wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Any:
        if keyword_only and len(args) > 1:
            return wrapped(*args, **kwargs)  # raises the interpreter's own TypeError
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
        # walpatch's own failures (a broken install, the descriptor limit while the guard
        # is imported) never become the application's: this call runs plain (issue 10, item 7).
        try:
            if not loaded:
                from .connection import guarded_connection_class
                from .events import count
                from .lockguard import track
                from .sqliteinfo import watch_connect

                # One item, replaced whole: threads racing through here all store the same tuple.
                loaded[:] = [(guarded_connection_class, count, watch_connect, track)]
            factory, count, watch, track = loaded[0]
            positional = len(args) > FACTORY_POSITION
            given = args[FACTORY_POSITION] if positional else kwargs.get("factory", default)
            if isinstance(given, functools.partial):
                guarded = _guard_partial(factory, given, dbapi)
            else:
                guarded = factory(given, dbapi)
            if _aiosqlite_pending:
                _bridge_aiosqlite()
        except Exception as exc:
            _fall_back(exc)
            return wrapped(*args, **kwargs)
        if positional:
            args = args[:FACTORY_POSITION] + (guarded,) + args[FACTORY_POSITION + 1:]
        else:
            kwargs["factory"] = guarded
        conn = wrapped(*args, **kwargs)
        database = args[0] if args else kwargs.get("database")
        if getattr(type(conn), _GUARDED_MARK, False):
            try:  # no __init__ override: one Python frame less on every connect
                conn._walpatch_database = database
            except AttributeError:
                pass
            count("connections")
            watch(dbapi, database)  # WAL-reset bug: a connection to a WAL file is WAL use
            track(conn, database)  # the lock guard (lockguard.py): at once when it is off
            return conn
        try:  # a factory that is not a class made it: guard it if its class allows
            if _guard_result(conn, given, factory, dbapi):
                try:
                    conn._walpatch_database = database
                except AttributeError:
                    pass
                count("connections")
                watch(dbapi, database)
                track(conn, database)
        except Exception as exc:  # the connection is the application's: hand it over
            _fall_back(exc)
        return conn

    return connect_wrapper


_fell_back = False


def _fall_back(exc: BaseException) -> None:
    """One line on stderr, once per process; the next connect() tries the guard again."""
    global _fell_back
    if _fell_back:
        return
    _fell_back = True
    try:
        sys.stderr.write(
            f"walpatch: cannot load its guard ({type(exc).__name__}: {exc}); this connection "
            "is NOT guarded (plain sqlite3); walpatch tries again at the next connect() "
            "(said once)\n")
    except Exception:  # noqa: BLE001 - no stderr: nothing more to do
        pass


def _guard_partial(guarded_class: Callable[..., Any], given: functools.partial,
                   dbapi: ModuleType) -> Any:
    """A ``functools.partial`` of a Connection class: the same partial (arguments kept) of
    its guarded subclass; any other partial unchanged (its result is guarded afterwards where
    possible, see ``_guard_result``)."""
    if isinstance(given.func, type):
        inner = guarded_class(given.func, dbapi)
        if inner is not given.func:
            return functools.partial(inner, *given.args, **given.keywords)
    return given


#: guarded class -> the same class without its own slot, for re-classing an object made by an
#: opaque factory (``obj.__class__ = ...`` needs the very same layout).
_reclass_variants: Dict[type, type] = {}


def _guard_result(conn: Any, given: Any, guarded_class: Callable[..., Any],
                  dbapi: ModuleType) -> bool:
    """Guard ``conn``, made unguarded by a factory that is not a class; True when done.
    Reports once per factory when it cannot be."""
    cls = type(conn)
    # A factory that is not a class (a lambda, a function, a partial of a function) made
    # the connection itself: switch the object to the guarded subclass of its own class.
    if isinstance(conn, dbapi.Connection) and cls.__flags__ & _HEAPTYPE \
            and not cls.__flags__ & _IMMUTABLETYPE:
        guarded = guarded_class(cls, dbapi)
        if guarded is not cls:
            variant = _reclass_variant(guarded)
            try:
                conn.__class__ = variant
                return True
            except TypeError:
                pass
    inner = given.func if isinstance(given, functools.partial) else given
    if isinstance(inner, type):
        return False  # a class walpatch could not subclass: reported as unguardable-class
    from .events import emit

    name = _describe(given)
    emit("unguardable-factory", logging.WARNING,
         f"walpatch: connect(factory={name}) returned a {cls.__module__}.{cls.__qualname__} "
         "that walpatch cannot guard (pass a sqlite3.Connection subclass as factory, or have "
         "the factory return an instance of one); its connections are NOT guarded",
         dedupe_key=name, outcome="unguarded")
    return False


def _reclass_variant(guarded: type) -> type:
    variant = _reclass_variants.get(guarded)
    if variant is None:
        namespace = {k: v for k, v in guarded.__dict__.items()
                     if k not in ("__slots__", "__dict__", "__weakref__")
                     and not isinstance(v, _MEMBER_DESCRIPTOR)}
        namespace["__slots__"] = ()
        variant = type(guarded.__name__, guarded.__bases__, namespace)
        with _lock:
            variant = _reclass_variants.setdefault(guarded, variant)
    return variant


def _describe(factory: Any) -> str:
    name = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    module = getattr(factory, "__module__", None)
    return f"{module}.{name}" if module else str(name)


_GUARDED_MARK = "_walpatch_guarded"  # connection.GUARDED_MARK (not imported: lazy guard)
_HEAPTYPE = 1 << 9
_IMMUTABLETYPE = 1 << 8
_MEMBER_DESCRIPTOR = type(type("_Slotted", (), {"__slots__": ("x",)}).__dict__["x"])


# --- aiosqlite: carry allow_downgrade() into its worker thread (issue 10, item 15) ---------
# aiosqlite runs every call in one worker thread per connection, fed by a queue: the
# contextvars of the task that made the call (so allow_downgrade()) do not reach it. Its
# Connection._execute(fn, *args) is where a call is queued, in the caller's context; there
# a call made inside allow_downgrade() is wrapped to run inside allow_downgrade() too.
_aiosqlite_pending = True
_aiosqlite_patched: List[Tuple[type, Any, Any]] = []


def _bridge_aiosqlite() -> None:
    """Wrap ``aiosqlite.core.Connection._execute`` once aiosqlite is imported (checked at
    each connect() until then: one dict lookup). A failure is said once and not retried."""
    global _aiosqlite_pending
    try:
        _bridge_aiosqlite_now()
    except Exception as exc:  # noqa: BLE001 - never the application's error
        _aiosqlite_pending = False
        try:
            sys.stderr.write(f"walpatch: cannot carry allow_downgrade() into aiosqlite's "
                             f"worker thread: {exc!r}\n")
        except Exception:  # noqa: BLE001
            pass


def _bridge_aiosqlite_now() -> None:
    global _aiosqlite_pending
    core = sys.modules.get("aiosqlite.core")
    cls = getattr(core, "Connection", None) if core is not None else None
    original = getattr(cls, "_execute", None) if cls is not None else None
    if original is None:
        return  # not imported (yet), or a version without this method: try at next connect
    with _lock:
        if not _aiosqlite_pending:
            return
        _aiosqlite_pending = False
        if isinstance(cls, type) and "_execute" in cls.__dict__:
            import wrapt

            ours = wrapt.FunctionWrapper(original, _aiosqlite_execute)
            setattr(cls, "_execute", ours)
            _aiosqlite_patched.append((cls, original, ours))


def _aiosqlite_execute(wrapped: Any, instance: Any, args: Tuple[Any, ...],
                       kwargs: Dict[str, Any]) -> Any:
    if args and _active:
        from .runtime import downgrade_allowed_in_context

        if downgrade_allowed_in_context():
            args = (_AllowedCall(args[0]),) + args[1:]
    return wrapped(*args, **kwargs)


class _AllowedCall:
    """``fn`` run inside ``allow_downgrade()`` (in aiosqlite's worker thread)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .runtime import allow_downgrade

        with allow_downgrade():
            return self.fn(*args, **kwargs)


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
        _unbridge_aiosqlite()


def _unbridge_aiosqlite() -> None:
    global _aiosqlite_pending
    for cls, original, ours in _aiosqlite_patched:
        if cls.__dict__.get("_execute") is ours:  # else someone wrapped on top: leave it
            setattr(cls, "_execute", original)
    _aiosqlite_patched.clear()
    _aiosqlite_pending = True


def hooked_modules() -> List[str]:
    with _lock:
        return sorted({module.__name__ for module, _, _, _ in _patched})
