"""The observer: samples header bytes 18/19 of the database through the whole run.

    python -m stress.observer DB STOP_FILE OUT_JSON [INTERVAL_S] [CONFIRM]

Not a writer and not protected: it opens the database file once with ``os.open`` (read-only),
keeps that descriptor to the end and reads the first 100 bytes with ``os.pread``. It holds no
SQLite lock, so its descriptor cannot release anyone's lock.

A sample counts only when it shows a *committed* state: no non-empty ``-journal`` file right
before and right after the read. A rollback-journal write transaction has its journal in place
before it touches page 1 and until it commits, so this filters out the uncommitted 2/2 of a
failed switch to WAL that is then rolled back (and the 1/1 of a failed downgrade). A new
state must also be seen in ``CONFIRM`` consecutive committed samples before it counts (a
switch and its rollback that both fit between two journal checks are not a transition).

Output: samples, committed samples, confirmed transitions (downgrades: WAL -> rollback,
upgrades: rollback -> WAL) with their times, raw (unconfirmed) transition counts, and how
often each header state was seen.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

WAL, ROLLBACK, OTHER = "wal", "rollback", "other"


def classify(data: bytes) -> str:
    if len(data) < 100 or data[:16] != b"SQLite format 3\x00":
        return OTHER
    pair = (data[18], data[19])
    if pair == (1, 1):
        return ROLLBACK
    if pair == (2, 2):
        return WAL
    return OTHER


def _journal_present(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


class Tracker:
    """Confirmed state transitions from a stream of committed samples (pure, testable)."""

    def __init__(self, confirm: int = 2) -> None:
        self.confirm = max(1, confirm)
        self.stable: Optional[str] = None
        self.candidate: Optional[str] = None
        self.count = 0
        self.last_raw: Optional[str] = None
        self.downgrades: List[float] = []
        self.upgrades: List[float] = []
        self.raw_downgrades = 0
        self.raw_upgrades = 0
        self.seen: Dict[str, int] = {}

    def feed(self, state: str, t: float) -> None:
        self.seen[state] = self.seen.get(state, 0) + 1
        if self.last_raw == WAL and state == ROLLBACK:
            self.raw_downgrades += 1
        elif self.last_raw == ROLLBACK and state == WAL:
            self.raw_upgrades += 1
        self.last_raw = state
        if self.stable is None:
            self.stable = state
            return
        if state == self.stable:
            self.candidate, self.count = None, 0
            return
        if state == self.candidate:
            self.count += 1
        else:
            self.candidate, self.count = state, 1
        if self.count >= self.confirm:
            if self.stable == WAL and state == ROLLBACK:
                self.downgrades.append(t)
            elif self.stable == ROLLBACK and state == WAL:
                self.upgrades.append(t)
            self.stable, self.candidate, self.count = state, None, 0


def observe(db: str, stop: str, interval: float, confirm: int) -> Dict[str, Any]:
    fd = os.open(db, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))  # kept open to the end
    journal = db + "-journal"
    tracker = Tracker(confirm)
    samples = uncommitted = 0
    start = time.monotonic()
    first: Optional[str] = None
    while True:
        stopping = os.path.exists(stop)
        j1 = _journal_present(journal)
        data = os.pread(fd, 100, 0)
        j2 = _journal_present(journal)
        samples += 1
        if j1 or j2:
            uncommitted += 1
        else:
            state = classify(data)
            first = first or state
            tracker.feed(state, round(time.monotonic() - start, 3))
        if stopping:
            break
        time.sleep(interval)
    return {
        "samples": samples, "uncommitted_samples": uncommitted,
        "first_state": first, "last_state": tracker.stable,
        "downgrades": len(tracker.downgrades), "upgrades": len(tracker.upgrades),
        "downgrade_times": tracker.downgrades[:50], "upgrade_times": tracker.upgrades[:50],
        "raw_downgrades": tracker.raw_downgrades, "raw_upgrades": tracker.raw_upgrades,
        "states_seen": tracker.seen, "interval": interval, "confirm": confirm,
        "seconds": round(time.monotonic() - start, 3),
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    db, stop, out = args[0], args[1], args[2]
    interval = float(args[3]) if len(args) > 3 else 0.002
    confirm = int(args[4]) if len(args) > 4 else 2
    result = observe(db, stop, interval, confirm)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, sort_keys=True)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
