"""The journal mode a database file has *on disk*, read without ever endangering a lock.

Why this is careful (design.md §5): closing any file descriptor of a database file drops every
POSIX lock this process holds on it, so ``open(path).read(100)`` followed by ``close()`` can
silently release another connection's lock and let a second process write under it. So we
never close a descriptor of a database file. We read the header with ``pread`` through a
descriptor that SQLite itself already holds for that file (found in ``/proc/self/fd``: the
connection asking always has one), and only where that is impossible (no ``/proc``) do we open
a read-only descriptor that is then kept open for the life of the process.
``os.stat`` and ``os.pread`` neither open nor close anything.
"""
from __future__ import annotations

import os
import stat
import threading
from typing import Dict, List, NamedTuple, Optional, Tuple

MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100

WAL = "wal"
ROLLBACK = "rollback"
EMPTY = "empty"  # zero-length file: a new database, not yet written
ABSENT = "absent"
UNKNOWN = "unknown"  # could not tell: callers fail closed

_PROC_FD_DIR = "/proc/self/fd"
MAX_KEPT_DESCRIPTORS = 256


class DiskState(NamedTuple):
    mode: str
    detail: str
    header: Optional[Tuple[int, int]] = None  # bytes 18 and 19

    @property
    def is_wal(self) -> bool:
        return self.mode == WAL


def parse_header(data: bytes) -> DiskState:
    """Journal mode from the first bytes of a database file (pure)."""
    if not data:
        return DiskState(EMPTY, "the file is empty (a new database)")
    if len(data) < HEADER_SIZE:
        return DiskState(UNKNOWN, f"the header is truncated ({len(data)} of 100 bytes)")
    if data[:16] != MAGIC:
        return DiskState(UNKNOWN, "the file does not start with the SQLite header")
    write_v, read_v = data[18], data[19]
    pair = (write_v, read_v)
    if pair == (1, 1):
        return DiskState(ROLLBACK, "header bytes 18-19 = 1/1 (rollback journal)", pair)
    if 2 in pair and set(pair) <= {1, 2}:
        return DiskState(WAL, f"header bytes 18-19 = {write_v}/{read_v} (WAL)", pair)
    return DiskState(UNKNOWN, f"header bytes 18-19 = {write_v}/{read_v} (not a known mode)", pair)


_lock = threading.Lock()
#: inode -> a descriptor this process holds on it (normally SQLite's own). A cache, bounded
#: (least recently used first out): forgetting an entry closes nothing, the next read just
#: looks in /proc/self/fd again, where our own kept descriptors are found too.
_fd_by_inode: Dict[Tuple[int, int], int] = {}  # insertion order = recency
MAX_CACHED_DESCRIPTORS = 1024
_kept: List[int] = []  # descriptors we opened ourselves: never closed, on purpose


def _matches(fd: int, key: Tuple[int, int]) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == key


def _find_existing_fd(key: Tuple[int, int]) -> Optional[int]:
    """A descriptor this process already has on the inode (normally SQLite's own)."""
    try:
        names = os.listdir(_PROC_FD_DIR)  # opens and closes a directory, not the database
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat(os.path.join(_PROC_FD_DIR, name))  # follows the link: no open()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == key:
            return int(name)
    return None


def _descriptor_for(path: str, key: Tuple[int, int]) -> Optional[int]:
    with _lock:
        fd = _fd_by_inode.get(key)
        if fd is not None and _matches(fd, key):
            del _fd_by_inode[key]  # re-inserted below: most recently used last
            _fd_by_inode[key] = fd
            return fd
        fd = _find_existing_fd(key)
        if fd is None:
            if len(_kept) >= MAX_KEPT_DESCRIPTORS:
                return None
            try:
                # No O_CREAT: a missing file is never created. Kept open for good (see above).
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return None
            if not _matches(fd, key):  # replaced between stat and open: keep it anyway
                _kept.append(fd)
                return None
            _kept.append(fd)
        _fd_by_inode.pop(key, None)
        _fd_by_inode[key] = fd
        while len(_fd_by_inode) > MAX_CACHED_DESCRIPTORS:
            del _fd_by_inode[next(iter(_fd_by_inode))]
        return fd


def _sidecar_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def read_disk_state(path: str) -> DiskState:
    """The on-disk journal mode of the database file at ``path`` (fails closed to UNKNOWN)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return DiskState(ABSENT, "the file does not exist")
    except OSError as exc:
        return DiskState(UNKNOWN, f"cannot stat the file: {exc.strerror or exc}")
    key = (st.st_dev, st.st_ino)
    if st.st_size == 0:
        state = DiskState(EMPTY, "the file is empty (a new database)")
    else:
        fd = _descriptor_for(path, key)
        if fd is None:
            return DiskState(UNKNOWN, "no descriptor could be had without risking a lock")
        try:
            data = os.pread(fd, HEADER_SIZE, 0)
        except OSError as exc:
            return DiskState(UNKNOWN, f"cannot read the header: {exc.strerror or exc}")
        if not _matches(fd, key):  # the descriptor changed hands while we read
            return DiskState(UNKNOWN, "the file changed while its header was read")
        state = parse_header(data)
    if state.mode == EMPTY and _sidecar_size(path + "-wal") > 0:
        # A new database whose first pages were committed in WAL mode and not yet
        # checkpointed: its content lives in the -wal file.
        return DiskState(WAL, "the file is empty but its -wal file holds the database")
    return state


def kept_descriptor_count() -> int:
    return len(_kept)


def wal_files_open(exclude: Optional[str] = None) -> Optional[List[str]]:
    """Paths of the SQLite database files this process has open that are WAL on disk (read
    through the open descriptors themselves: nothing is opened or closed), leaving out
    ``exclude``; None when the open files cannot be listed (no /proc)."""
    try:
        names = os.listdir(_PROC_FD_DIR)
    except OSError:
        return None
    skip = None
    if exclude is not None:
        try:
            st = os.stat(exclude)
            skip = (st.st_dev, st.st_ino)
        except OSError:
            pass
    seen = set()
    found: List[str] = []
    for name in names:
        link = os.path.join(_PROC_FD_DIR, name)
        try:
            st = os.stat(link)
            if not stat.S_ISREG(st.st_mode):
                continue
            key = (st.st_dev, st.st_ino)
            if key == skip or key in seen:
                continue
            seen.add(key)
            data = os.pread(int(name), HEADER_SIZE, 0)
            path = os.readlink(link)
        except (OSError, ValueError):
            continue
        if data[:16] != MAGIC and data:
            continue
        state = parse_header(data)
        if state.mode == EMPTY and _sidecar_size(path + "-wal") > 0:
            state = DiskState(WAL, "empty with a -wal file")
        if state.mode == WAL:
            found.append(path)
    return found
