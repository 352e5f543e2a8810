"""The pure parts: classification, the decision table, backoff, header parsing."""
from __future__ import annotations

import sqlite3

import pytest

from walpatch import classify as c
from walpatch import ondisk, policy
from walpatch.config import Config


def _err(message, code=None, cls=sqlite3.OperationalError):
    e = cls(message)
    if code is not None:
        e.sqlite_errorcode = code
        e.sqlite_errorname = f"CODE_{code}"
    return e


@pytest.mark.parametrize("message,code,expected", [
    ("database is locked", 5, c.CONTENTION),
    ("database is locked", 517, c.CONTENTION),
    ("database table is locked", 6, c.CONTENTION),
    ("disk I/O error", 778, c.TRANSIENT_IO),
    ("disk I/O error", 1034, c.TRANSIENT_IO),
    ("disk I/O error", 8458, c.TRANSIENT_IO),
    ("database or disk is full", 13, c.TRANSIENT_IO),
    ("locking protocol", 15, c.WAL_UNSUPPORTED),
    ("not authorized", 23, c.WAL_UNSUPPORTED),
    ("disk I/O error", 4618, c.WAL_UNSUPPORTED),  # IOERR_SHMOPEN
    ("disk I/O error", 5386, c.WAL_UNSUPPORTED),  # IOERR_SHMMAP
    ("disk I/O error", 4874, c.TRANSIENT_IO),  # IOERR_SHMSIZE: a transient EIO gives it too
    ("disk I/O error", 5130, c.TRANSIENT_IO),  # IOERR_SHMLOCK
    ("disk I/O error", 3850, c.STATE),  # IOERR_LOCK (mode=ro leaving WAL)
    ("cannot change into wal mode from within a transaction", 1, c.STATE),
    ("attempt to write a readonly database", 8, c.STATE),
    ("unable to open database file", 14, c.STATE),
    ("file is not a database", 26, c.STATE),
    ("database disk image is malformed", 11, c.CORRUPT),
    ("something else", 1, c.UNKNOWN),
])
def test_classify_by_code_and_by_message(message, code, expected):
    assert c.classify(_err(message, code)) == expected
    # 3.8-3.10: no code, the message alone (extended codes collapse to the primary message)
    if code not in (4618, 5386, 3850, 4874, 5130):
        assert c.classify(_err(message)) == expected


def test_corrupt_right_after_io_is_transient():
    e = _err("database disk image is malformed", 11, sqlite3.DatabaseError)
    assert c.classify(e) == c.CORRUPT
    assert c.classify(e, after_io_error=True) == c.TRANSIENT_IO


def test_extra_unsupported_markers():
    assert c.classify(_err("disk I/O error"), ["disk i/o"]) == c.WAL_UNSUPPORTED


WAL = ondisk.DiskState(ondisk.WAL, "2/2")
RB = ondisk.DiskState(ondisk.ROLLBACK, "1/1")
UNK = ondisk.DiskState(ondisk.UNKNOWN, "?")


@pytest.mark.parametrize("disk,history,allowed,action", [
    (WAL, None, None, policy.REFUSE),
    (UNK, None, None, policy.REFUSE),
    (RB, None, None, policy.PASS),
    (RB, policy.History(policy.WAL_FAILED, c.TRANSIENT_IO), None, policy.REFUSE),
    (RB, policy.History(policy.WAL_UNSUPPORTED, c.WAL_UNSUPPORTED), None, policy.PASS),
    (RB, policy.History(policy.WAL_OK), None, policy.PASS),
    (WAL, policy.History(policy.WAL_UNSUPPORTED), None, policy.REFUSE),
    (WAL, None, "walpatch.allow_downgrade()", policy.PASS),
])
def test_decision_table(disk, history, allowed, action):
    assert policy.decide_downgrade(disk, history, allowed).action == action


def test_refusal_after_failure_carries_the_cause():
    cause = _err("disk I/O error", 778)
    d = policy.decide_downgrade(RB, policy.History(policy.WAL_FAILED, c.TRANSIENT_IO, cause), None)
    assert d.refuse and d.cause is cause and "retry WAL" in d.reason


def test_backoff_is_bounded_in_attempts_and_time():
    cfg = Config(retry_attempts=4, retry_initial_delay=0.1, retry_max_delay=0.3,
                 retry_total_timeout=1.0)
    delays = [policy.retry_delay(a, 0.0, cfg, 0.999) for a in (1, 2, 3)]
    assert delays[0] == pytest.approx(0.1, rel=0.01)
    assert delays[2] == pytest.approx(0.3, rel=0.01)  # capped
    assert policy.retry_delay(4, 0.0, cfg, 0.5) is None  # attempts spent
    assert policy.retry_delay(1, 0.95, cfg, 0.999) == pytest.approx(0.05)  # time cap
    assert policy.retry_delay(1, 1.0, cfg, 0.5) is None
    assert 0.05 <= policy.retry_delay(1, 0.0, cfg, 0.0) <= 0.1  # jitter in the upper half


def _header(w, r):
    data = bytearray(ondisk.MAGIC + bytes(84))
    data[18], data[19] = w, r
    return bytes(data)


def test_parse_header():
    assert ondisk.parse_header(_header(2, 2)).mode == ondisk.WAL
    assert ondisk.parse_header(_header(1, 1)).mode == ondisk.ROLLBACK
    assert ondisk.parse_header(_header(3, 3)).mode == ondisk.UNKNOWN
    assert ondisk.parse_header(b"").mode == ondisk.EMPTY
    assert ondisk.parse_header(b"SQLite").mode == ondisk.UNKNOWN
    assert ondisk.parse_header(b"x" * 100).mode == ondisk.UNKNOWN


def test_silent_refusal_reasons():
    r = policy.explain_silent_refusal("delete", False, "vfs=unix-none", None)
    assert r.permanent and "unix-none" in r.reason
    r = policy.explain_silent_refusal("delete", True, None, None)
    assert not r.permanent and "transaction" in r.reason
    r = policy.explain_silent_refusal("delete", False, None, "mode=ro")
    assert not r.permanent and "read-only" in r.reason
