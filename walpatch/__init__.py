"""walpatch: stop SQLite WAL databases from being silently downgraded to a rollback journal.

Importing walpatch does not import sqlite3 or wrapt: ``install()`` arms a post-import hook
when sqlite3 is not imported yet, so it is cheap enough to run at interpreter start.
``WalDowngradeRefused`` (a subclass of ``sqlite3.OperationalError``) is loaded on first use.
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Dict, List, Optional

from . import events, hooks, runtime
from .config import Config, build_config, describe
from .runtime import allow_downgrade

__version__ = "0.1.0"

__all__ = [
    "install",
    "uninstall",
    "is_installed",
    "allow_downgrade",
    "stats",
    "status",
    "WalDowngradeRefused",
    "__version__",
]

_lock = threading.Lock()
_warned: set = set()


def _log_warnings(lines: Any) -> None:
    for line in lines:
        if line not in _warned:
            _warned.add(line)
            events.logger.warning("%s", line)


def install(**settings: Any) -> bool:
    """Guard every sqlite3 connection made from now on; returns True when active.

    ``settings`` override the ``WALPATCH_*`` environment variables (README, "Settings").
    Idempotent and thread-safe: a second call only applies new settings. Invalid settings are
    warned about once each and replaced by defaults; nothing here raises into the application.
    """
    with _lock:
        try:
            config, warnings = build_config(settings)
            _log_warnings(warnings)
            if config.log_level:
                events.logger.setLevel(config.log_level)
            sink_error = events.open_sink(config.event_file)
            if sink_error:
                _log_warnings([sink_error])
            runtime.config = config
            hooks.patch()
            lockguard = sys.modules.get("walpatch.lockguard")  # loaded at the first connect
            if lockguard is not None:
                lockguard.apply()
        except Exception as exc:  # fail open: the application runs on unprotected
            events.logger.error("walpatch: install failed, sqlite3 is NOT guarded: %r", exc)
            return False
        events.emit(
            "installed", logging.DEBUG, f"walpatch: installed ({config.mode})",
            mode=config.mode, settings=describe(config))
        return True


def uninstall() -> None:
    """Put ``sqlite3.connect`` back as it was. Idempotent.

    Connections opened while walpatch was installed keep their guarded class but pass every
    statement straight through from now on; connections opened before ``install()`` were
    never guarded.
    """
    with _lock:
        hooks.unpatch()
        runtime.config = None
        lockguard = sys.modules.get("walpatch.lockguard")
        if lockguard is not None:
            lockguard.disarm()


def is_installed() -> bool:
    """True when walpatch is active and every module it tried to hook was hooked."""
    return runtime.config is not None and hooks.is_active() and not hooks.errors()


def stats() -> Dict[str, int]:
    """Counters of what the guard saw and did since the process started (README, "stats")."""
    return events.snapshot()


def status() -> Dict[str, Any]:
    """Whether walpatch is active here, in which mode, with which settings and hooks."""
    config: Config | None = runtime.config
    return {
        "installed": is_installed(),
        "mode": config.mode if config else None,
        "settings": describe(config) if config else None,
        "setting_sources": dict(config.sources) if config else {},
        "hooked_modules": hooks.hooked_modules(),
        "hook_errors": hooks.errors(),
        "version": __version__,
        # which hot path the guarded execute methods use: "c" (walpatch._speedups) or "python"
        "speedups": _speedups_kind(),
        # the SQLite under each DB-API module this process has imported (version, source id,
        # library file, WAL-reset-bug verdict): issue 11
        "sqlite": _sqlite_modules(config.wal_reset_bug if config else None),
    }


def _sqlite_modules(setting: Optional[str]) -> List[Dict[str, Any]]:
    from . import sqliteinfo

    try:
        return sqliteinfo.collect_loaded(setting or sqliteinfo.setting_now())
    except Exception as exc:  # status() never raises for this
        return [{"module": "sqlite3", "error": f"{type(exc).__name__}: {exc}"}]


def _speedups_kind() -> str:
    from . import speedups  # lazily: status() only; imports no sqlite3

    return speedups.KIND


def __getattr__(name: str) -> Any:
    # Lazy so that `import walpatch` does not import sqlite3 (PEP 562).
    if name == "WalDowngradeRefused":
        from .errors import WalDowngradeRefused

        return WalDowngradeRefused
    raise AttributeError(f"module 'walpatch' has no attribute {name!r}")
