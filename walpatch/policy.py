"""The decision table of design.md §4, as pure functions: no SQLite, no files, no clock.

Inputs are plain values (what is on disk, what happened to this file before, the settings),
outputs are decisions with a human reason. ``guard.py`` gathers the inputs and acts.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from . import classify as _c
from . import ondisk
from .config import Config

# Outcomes of the last WAL request for a file, kept per process (history.py).
WAL_OK = "ok"
WAL_FAILED = "failed"  # anything but "WAL unsupported here": a downgrade would be unsafe
WAL_UNSUPPORTED = "unsupported"  # the application's own fallback may downgrade

PASS = "pass"
REFUSE = "refuse"


class History(NamedTuple):
    """The last WAL request's outcome for a file.

    ``error`` must hold no traceback: a traceback keeps the frames it passed through alive,
    and with them the caller's cursor, whose prepared statement makes ``close()`` leave the
    connection open with its transaction and locks (guard._kept_error). ``original`` (a weak
    reference) gives back the very error the application saw, while it still holds it."""

    outcome: str
    category: Optional[str] = None
    error: Optional[BaseException] = None
    detail: str = ""
    original: Optional[Callable[[], Any]] = None

    def cause(self) -> Optional[BaseException]:
        """The error to chain a refusal to: the application's own while it lives."""
        original = self.original() if self.original is not None else None
        return original if isinstance(original, BaseException) else self.error


class Decision(NamedTuple):
    action: str
    reason: str
    cause: Optional[BaseException] = None

    @property
    def refuse(self) -> bool:
        return self.action == REFUSE


def outcome_for_category(category: str) -> str:
    """What a failed WAL request of this category means for a later downgrade."""
    return WAL_UNSUPPORTED if category == _c.WAL_UNSUPPORTED else WAL_FAILED


def decide_downgrade(
    disk: ondisk.DiskState, history: Optional[History], allowed_because: Optional[str]
) -> Decision:
    """May a request to leave WAL (DELETE/TRUNCATE/PERSIST/MEMORY/OFF) run on this file?"""
    if allowed_because:
        return Decision(PASS, f"downgrade allowed on purpose ({allowed_because}); on disk: "
                        f"{disk.detail}")
    if disk.mode == ondisk.WAL:
        return Decision(
            REFUSE,
            f"the file is in WAL mode on disk ({disk.detail}); leaving WAL while other "
            "processes may use the file in WAL mode is what corrupts databases",
        )
    if disk.mode == ondisk.UNKNOWN:
        return Decision(
            REFUSE, f"the on-disk journal mode could not be established ({disk.detail}); "
            "walpatch fails closed"
        )
    if history is not None and history.outcome == WAL_FAILED:
        what = history.detail or history.category or "an error"
        return Decision(
            REFUSE,
            f"the last request for WAL on this file in this process failed with {what}, "
            "which is not a sign that WAL is unsupported here; retry WAL instead",
            history.cause(),
        )
    why = (
        "no WAL request failed here" if history is None
        else f"last WAL request: {history.outcome}"
    )
    return Decision(PASS, f"not WAL on disk ({disk.detail}); {why}")


def retry_delay(attempt: int, elapsed: float, config: Config, jitter: float) -> Optional[float]:
    """Seconds to wait before attempt ``attempt + 1``, or None when the budget is spent.

    Exponential backoff from ``retry_initial_delay`` capped at ``retry_max_delay``, with
    "equal jitter" (``jitter`` in [0, 1) picks a point in the upper half), and never beyond
    ``retry_total_timeout`` since the first attempt started.
    """
    if attempt >= config.retry_attempts:
        return None
    remaining = config.retry_total_timeout - elapsed
    if remaining <= 0:
        return None
    base = min(config.retry_max_delay, config.retry_initial_delay * (2 ** (attempt - 1)))
    delay = base / 2 + (base / 2) * jitter
    return min(delay, remaining)


class SilentRefusal(NamedTuple):
    reason: str
    permanent: bool  # True: WAL cannot work here (treated as "WAL unsupported")


def explain_silent_refusal(
    returned_mode: str,
    in_transaction: bool,
    vfs_without_shm: Optional[str],
    read_only: Optional[str],
) -> SilentRefusal:
    """Why SQLite answered a WAL request with another mode and no error."""
    kept = f"SQLite kept journal mode {returned_mode!r}"
    if vfs_without_shm:
        return SilentRefusal(
            f"{kept}: the connection uses {vfs_without_shm}, which has no shared memory, so "
            "WAL is unsupported here", True)
    if read_only:
        return SilentRefusal(f"{kept}: the database is read-only ({read_only})", False)
    if in_transaction:
        return SilentRefusal(
            f"{kept}: the connection is inside a transaction that has already written", False)
    return SilentRefusal(f"{kept}: cause unknown", False)
