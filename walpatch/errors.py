"""WalDowngradeRefused: what an application sees instead of an unsafe downgrade.

It subclasses the DB-API module's own ``OperationalError`` so that existing ``except
sqlite3.OperationalError`` handlers keep working. Drop-in modules (pysqlite3, sqlean) have
their own exception classes, so each gets a subclass that is both its OperationalError and
WalDowngradeRefused.
"""
from __future__ import annotations

import sqlite3
import sys
import threading
from types import ModuleType
from typing import Dict, Optional, Type

SQLITE_PERM = 3


class WalDowngradeRefused(sqlite3.OperationalError):
    """A request to leave WAL mode was refused; the database was not touched.

    Attributes: ``database`` (file path), ``schema``, ``requested_mode``, ``reason``, and
    ``original_error`` (the failed WAL request's error, also ``__cause__``) or None. On 3.11+
    ``sqlite_errorcode``/``sqlite_errorname`` are SQLITE_PERM, like SQLite's own errors carry.
    The message avoids the phrases legacy fallbacks match on ("disk i/o error", "locked").
    """

    def __init__(
        self,
        database: str,
        schema: str,
        requested_mode: str,
        reason: str,
        original_error: Optional[BaseException] = None,
    ) -> None:
        self.database = database
        self.schema = schema
        self.requested_mode = requested_mode
        self.reason = reason
        self.original_error = original_error
        message = (
            f"walpatch refused PRAGMA {schema}.journal_mode={requested_mode.upper()} on "
            f"{database!r}: {reason}. The database was not changed. To leave WAL on purpose "
            "use walpatch.allow_downgrade() or WALPATCH_ALLOW_DOWNGRADE=1"
        )
        super().__init__(message)
        if sys.version_info >= (3, 11):
            self.sqlite_errorcode = SQLITE_PERM
            self.sqlite_errorname = "SQLITE_PERM"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (
            type(self),
            (self.database, self.schema, self.requested_mode, self.reason, None),
        )


_classes: Dict[int, Type[Exception]] = {}
_lock = threading.Lock()


def refusal_class_for(module: ModuleType) -> Type[Exception]:
    """The WalDowngradeRefused class to raise for connections of DB-API ``module``."""
    base = getattr(module, "OperationalError", sqlite3.OperationalError)
    if base is sqlite3.OperationalError:
        return WalDowngradeRefused
    with _lock:
        cls = _classes.get(id(base))
        if cls is None:
            cls = type("WalDowngradeRefused", (WalDowngradeRefused, base), {
                "__module__": __name__,
                "__doc__": WalDowngradeRefused.__doc__,
            })
            _classes[id(base)] = cls
        return cls
