"""Inspect SQLite database files without touching them: the journal mode from the header bytes,
a header sanity check (magic, page size, read/write versions), the sidecar files (-wal, -shm, a
hot -journal), who holds locks on the file, and with --integrity SQLite's quick_check (or
integrity_check with --full) through a read-only connection.

Nothing is ever created or modified, and the check is safe on a database that other processes
are using: files are opened read-only (a missing file is never created), locks are only
queried (F_GETLK, which takes none), and the integrity check uses a `mode=ro` connection only
where that cannot create a -wal or -shm file, with the -shm file opened read-only (else an
exact `immutable=1` read, or it is skipped with the reason).

Exit codes: 0 every file is a healthy SQLite database (and in the --expect mode);
1 a problem was found in a file (not SQLite, truncated or invalid header, a hot journal, a
failed integrity check or one that could not run, a journal mode other than --expect);
2 a path could not be inspected (missing, a directory or not a regular file, permission
denied) or bad usage. With several files the highest code wins (2 over 1 over 0).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import os
import re
import stat
import sys
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

from .. import ondisk
from . import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE

#: Version of the JSON shape printed by ``--json`` (docs/cli.md). Bumped on incompatible change.
JSON_VERSION = 1

WAL_MAGICS = (0x377F0682, 0x377F0683)
JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")
WAL_HEADER_SIZE, WAL_FRAME_HEADER_SIZE = 32, 24

# SQLite's unix lock bytes (os_unix.c / os.h) on the database file, and the -shm DMS byte.
PENDING_BYTE = 0x40000000
RESERVED_BYTE = PENDING_BYTE + 1
SHARED_FIRST = PENDING_BYTE + 2
SHARED_SIZE = 510
SHM_DMS_BYTE = 128

ENCODINGS = {1: "UTF-8", 2: "UTF-16le", 3: "UTF-16be"}
MAX_INTEGRITY_MESSAGES = 100


class CheckError(Exception):
    """A path that cannot be inspected (exit code 2); the message is one line."""


# --------------------------------------------------------------------------------------------
# raw, lock-free reading (this process holds no SQLite connection while it runs)
# --------------------------------------------------------------------------------------------

class _Flock(ctypes.Structure):
    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short),
                ("l_start", ctypes.c_int64), ("l_len", ctypes.c_int64),
                ("l_pid", ctypes.c_int)]


def lock_holder(fd: int, start: int, length: int) -> Optional[int]:
    """The pid of a process holding a POSIX lock that overlaps [start, start+length), or None.

    F_GETLK only asks; it takes no lock. Raises OSError when the query itself fails.
    """
    query = _Flock(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    answer = _Flock.from_buffer_copy(fcntl.fcntl(fd, fcntl.F_GETLK, bytes(query)))
    if answer.l_type == fcntl.F_UNLCK:
        return None
    return int(answer.l_pid) or -1  # -1: held, by a process of another pid namespace


def _open_ro(path: str) -> int:
    """A read-only descriptor; never creates, never blocks on a FIFO, spares atime if allowed."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    noatime = getattr(os, "O_NOATIME", 0)
    if noatime:
        try:
            return os.open(path, flags | noatime)
        except PermissionError:  # O_NOATIME needs ownership; EACCES proper falls through too
            pass
    return os.open(path, flags)


def _why(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOENT:
        return "no such file or directory"
    if exc.errno == errno.ELOOP:
        return "too many levels of symbolic links"
    return (exc.strerror or str(exc)).lower()


def parse_header_fields(data: bytes) -> Tuple[Dict[str, Any], List[str]]:
    """Every header field worth showing, and the sanity problems found (pure)."""
    problems: List[str] = []
    fields: Dict[str, Any] = {
        "bytes_read": len(data), "magic_ok": data[:16] == ondisk.MAGIC, "page_size": None,
        "write_version": None, "read_version": None, "reserved_bytes": None,
        "change_counter": None, "page_count": None, "schema_format": None,
        "text_encoding": None, "sqlite_version": None,
    }
    if not data:
        return fields, problems
    if not fields["magic_ok"]:
        problems.append("not an SQLite database (the file does not start with "
                        "'SQLite format 3\\0')")
        return fields, problems
    if len(data) < ondisk.HEADER_SIZE:
        problems.append(f"truncated header: {len(data)} of 100 bytes")
        return fields, problems
    raw_ps = int.from_bytes(data[16:18], "big")
    page_size = 65536 if raw_ps == 1 else raw_ps
    fields.update(
        page_size=page_size, write_version=data[18], read_version=data[19],
        reserved_bytes=data[20], change_counter=int.from_bytes(data[24:28], "big"),
        schema_format=int.from_bytes(data[44:48], "big"),
    )
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        problems.append(f"invalid page size {raw_ps} (bytes 16-17)")
    for name, value in (("write", data[18]), ("read", data[19])):
        if value not in (1, 2):
            problems.append(f"{name} version (byte {18 if name == 'write' else 19}) is "
                            f"{value}: neither 1 (rollback) nor 2 (WAL)")
    if data[18] in (1, 2) and data[19] in (1, 2) and data[18] != data[19]:
        problems.append(f"header bytes 18-19 disagree ({data[18]}/{data[19]}); SQLite writes "
                        "both equal")
    if tuple(data[21:24]) != (64, 32, 32):
        problems.append(f"payload fractions (bytes 21-23) are {tuple(data[21:24])}, "
                        "not (64, 32, 32)")
    version_valid_for = int.from_bytes(data[92:96], "big")
    if version_valid_for == fields["change_counter"]:
        fields["page_count"] = int.from_bytes(data[28:32], "big")
    encoding = int.from_bytes(data[56:60], "big")
    if encoding:
        fields["text_encoding"] = ENCODINGS.get(encoding)
        if encoding not in ENCODINGS:
            problems.append(f"invalid text encoding {encoding} (bytes 56-59)")
    version = int.from_bytes(data[96:100], "big")
    if version:
        fields["sqlite_version"] = f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"
    return fields, problems


def _sidecar(path: str, head: int) -> Dict[str, Any]:
    """exists/size and the first ``head`` bytes of a sidecar (never created, never waited on)."""
    out: Dict[str, Any] = {"exists": False, "size": None, "error": None}
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return out
    except OSError as exc:
        out.update(exists=None, error=_why(exc))
        return out
    out.update(exists=True, size=st.st_size)
    if not stat.S_ISREG(st.st_mode):
        out["error"] = "not a regular file"
        return out
    if head:
        try:
            fd = _open_ro(path)
        except OSError as exc:
            out["error"] = _why(exc)
            return out
        try:
            out["_head"] = os.pread(fd, head, 0)
            out["_fd_lock"] = lock_holder(fd, SHM_DMS_BYTE, 1) if path.endswith("-shm") else None
        except OSError as exc:
            out["error"] = _why(exc)
        finally:
            os.close(fd)  # a sidecar; this process holds no lock on it (no connection open)
    return out


def _wal_info(path: str, page_size: Optional[int]) -> Dict[str, Any]:
    info = _sidecar(path, WAL_HEADER_SIZE)
    head = info.pop("_head", None)
    info.pop("_fd_lock", None)
    info.update(valid_header=None, page_size=None, frames=None)
    if not info["exists"] or head is None:
        return info
    if len(head) >= WAL_HEADER_SIZE:
        info["valid_header"] = int.from_bytes(head[0:4], "big") in WAL_MAGICS
        if info["valid_header"]:
            info["page_size"] = int.from_bytes(head[8:12], "big")
    # else: empty (or shorter than a WAL header): no header written yet, no frames
    size = info["size"] or 0
    ps = info["page_size"] or page_size
    info["frames"] = max(0, (size - WAL_HEADER_SIZE) // (WAL_FRAME_HEADER_SIZE + ps)) \
        if ps and info["valid_header"] else 0
    return info


def inspect_raw(path: str) -> Dict[str, Any]:
    """Everything that can be learnt without SQLite. Raises CheckError for a path that cannot
    be inspected. Opens only read-only descriptors and closes them before returning."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckError(_why(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckError("is a directory (give the database file itself)")
    if not stat.S_ISREG(st.st_mode):
        raise CheckError("not a regular file")
    try:
        fd = _open_ro(path)
    except OSError as exc:
        raise CheckError(_why(exc)) from None
    locks: Dict[str, Optional[int]] = {}
    lock_error: Optional[str] = None
    try:
        try:
            data = os.pread(fd, ondisk.HEADER_SIZE, 0)
        except OSError as exc:
            raise CheckError(f"cannot read the header: {_why(exc)}") from None
        try:
            locks["reserved"] = lock_holder(fd, RESERVED_BYTE, 1)
            locks["pending"] = lock_holder(fd, PENDING_BYTE, 1)
            locks["shared"] = lock_holder(fd, SHARED_FIRST, SHARED_SIZE)
        except OSError as exc:  # a filesystem without POSIX locks: report, do not guess
            lock_error = _why(exc)
    finally:
        # Safe: this process holds no SQLite connection (and so no lock) on the file now.
        os.close(fd)
    header, problems = parse_header_fields(data)
    state = ondisk.parse_header(data)
    out: Dict[str, Any] = {
        "size": st.st_size, "journal_mode": state.mode, "journal_mode_detail": state.detail,
        "header": header, "problems": problems, "notes": [],
    }
    page_size = header["page_size"] if not problems else None
    if page_size and st.st_size % page_size:
        problems.append(f"the file size ({st.st_size}) is not a whole number of "
                        f"{page_size}-byte pages")
    out["header_ok"] = (not problems) if data else None
    wal = _wal_info(path + "-wal", page_size)
    shm = _sidecar(path + "-shm", 1)
    shm.pop("_head", None)
    shm_holder = shm.pop("_fd_lock", None)
    journal = _sidecar(path + "-journal", 8)
    head = journal.pop("_head", None)
    journal.pop("_fd_lock", None)
    journal.update(hot=None, header_magic=None)
    if journal.get("exists"):
        journal["header_magic"] = head == JOURNAL_MAGIC if head is not None else None
        # SQLite's own rule (pager.c hasHotJournal): the journal exists, is not empty, its
        # first byte is not zero (PERSIST zeroes it), the database is not empty, and no
        # process holds the RESERVED lock (a live writer's journal is not hot).
        if lock_error is not None or head is None:
            journal["hot"] = None
        else:
            journal["hot"] = bool(journal["size"] and head[:1] not in (b"", b"\x00")
                                  and st.st_size > 0 and locks.get("reserved") is None)
        if journal["hot"]:
            problems.append("hot journal: a writer died mid-transaction; the next connection "
                            "that opens the file rolls it back (the header may change then)")
        elif journal["hot"] is None:
            out["notes"].append("a -journal exists; whether it is hot could not be told")
    out["sidecars"] = {"wal": wal, "shm": shm, "journal": journal}
    locks["shm"] = shm_holder
    holders = sorted({p for p in locks.values() if p is not None})
    unreadable = [f"-{k}" for k, sc in out["sidecars"].items() if sc.get("error")]
    for name in unreadable:
        sc = out["sidecars"][name[1:]]
        problems.append(f"the {name} file cannot be inspected: {_sidecar_trouble(sc['error'])}")
    if lock_error is None and shm.get("error") and not holders:
        # Nobody holds a lock on the database file, but whether a process uses the -shm
        # (a WAL reader between transactions) could not be asked: do not say "no".
        lock_error = f"the -shm file cannot be opened: {shm['error']}"
    out["locks"] = {"error": lock_error, **locks}
    out["in_use"] = None if lock_error else bool(holders)
    out["lock_holders"] = holders
    if state.mode == ondisk.EMPTY and wal.get("size"):
        out["journal_mode"] = ondisk.WAL
        out["journal_mode_detail"] = "the file is empty but its -wal file holds the database"
    if state.mode == ondisk.ROLLBACK and wal.get("frames"):
        out["notes"].append(f"the header says rollback but a -wal file with {wal['frames']} "
                            "frame(s) exists (left by a WAL-mode process)")
    if state.mode == ondisk.EMPTY and not wal.get("size"):
        out["journal_mode_detail"] = "a new database, nothing written yet"
    return out


# --------------------------------------------------------------------------------------------
# integrity, through SQLite, read-only
# --------------------------------------------------------------------------------------------

_URI_PARAMS = {"ro": "mode=ro", "ro-shm": "mode=ro&readonly_shm=1", "immutable": "immutable=1"}


def ro_uri(path: str, how: str = "ro") -> str:
    """A ``file:`` URI for ``path`` opened read-only; ``?``, ``#``, ``%`` (and every other
    character a URI reserves) are percent-encoded, so no part of a path becomes a parameter.
    ``how``: "ro" (mode=ro), "ro-shm" (also readonly_shm=1: the -shm file is opened read-only
    and never written, not even the read marks), "immutable" (immutable=1: no locks, no
    sidecars; exact only while nobody writes)."""
    absolute = os.path.abspath(path)
    encoded = quote(os.fsencode(absolute), safe="/")
    return f"file://{encoded}?{_URI_PARAMS[how]}"


def _sidecar_trouble(error: str) -> str:
    if error == "not a regular file":
        return "not a regular file (a FIFO or device: SQLite would block on it or misuse it)"
    if error == "permission denied":
        return "permission denied (run the check as a user who can read it)"
    return error


def _integrity_plan(raw: Dict[str, Any]) -> Tuple[Optional[str], str]:
    """(how to open, why) — None when a read-only check would have to create something."""
    sc = raw["sidecars"]
    for suffix in ("wal", "shm", "journal"):
        error = sc[suffix].get("error")
        if error:  # SQLite would open it: a FIFO blocks it for good, an unreadable one fails
            return None, f"the -{suffix} file cannot be used by a read-only check: " \
                         f"{_sidecar_trouble(error)}"
    wal, shm = bool(sc["wal"].get("exists")), bool(sc["shm"].get("exists"))
    if raw["size"] == 0:
        return None, "the file is empty: there is nothing to check"
    if sc["journal"].get("hot"):
        return None, ("a hot journal must be rolled back first (by any connection with write "
                      "access); a read-only check cannot")
    if wal and shm:
        return "ro-shm", "read-only connection (mode=ro, readonly_shm=1)"
    if wal and not shm:
        return None, ("a -wal file exists without a -shm file: a read-only connection would "
                      "create the -shm file (copy the files elsewhere to check them)")
    if raw["journal_mode"] == ondisk.WAL:
        if shm:
            return None, ("a -shm file exists without a -wal file: a read-only connection "
                          "would create the -wal file")
        # No -wal: every committed page is in the main file, and mode=ro would create
        # -wal and -shm. immutable=1 reads exactly that file and creates nothing.
        return "immutable", "immutable=1 (WAL database with no -wal/-shm: all content is in " \
                            "the main file)"
    return "ro", "read-only connection (mode=ro)"


def run_integrity(path: str, raw: Dict[str, Any], full: bool, timeout: float) -> Dict[str, Any]:
    import sqlite3

    pragma = "integrity_check" if full else "quick_check"
    out: Dict[str, Any] = {"check": pragma, "ran": False, "ok": None, "messages": [],
                           "error": None, "how": None}
    how, why = _integrity_plan(raw)
    out["how"] = why
    if how is None:
        return out
    before = {k: os.path.lexists(path + k) for k in ("-wal", "-shm", "-journal")}
    try:
        st_before = os.stat(path)
        conn = sqlite3.connect(ro_uri(path, how), uri=True,
                               timeout=timeout, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        out["error"] = _sqlite_error(exc)
        return out
    try:
        rows = conn.execute(f"PRAGMA {pragma}({MAX_INTEGRITY_MESSAGES})").fetchall()
        messages = [str(r[0]) for r in rows]
        out.update(ran=True, ok=messages == ["ok"],
                   messages=[] if messages == ["ok"] else messages)
    except sqlite3.Error as exc:
        out["error"] = _sqlite_error(exc)
        out["ok"] = False if _is_corruption(exc) else None
    finally:
        conn.close()
    if how == "immutable":
        try:
            st_after = os.stat(path)
            changed = (st_after.st_mtime_ns, st_after.st_size) != \
                (st_before.st_mtime_ns, st_before.st_size) or os.path.lexists(path + "-wal")
        except OSError:
            changed = True
        if changed:
            out.update(ran=False, ok=None, messages=[],
                       error="the database was written while it was checked without locks "
                             "(immutable=1); run the check again")
    created = [k for k, existed in before.items() if not existed and os.path.lexists(path + k)]
    if created:  # by another process meanwhile (this one opens nothing that could create them)
        out["sidecars_appeared"] = created
    return out


def _sqlite_error(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    text = str(exc) or type(exc).__name__
    if name == "SQLITE_READONLY_ROLLBACK":
        return f"{text} ({name}): a hot journal must be rolled back first"
    return f"{text} ({name})" if name else text


def _is_corruption(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (11, 26)  # CORRUPT, NOTADB
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------

def _empty_result(path: str, expect: Optional[str]) -> Dict[str, Any]:
    return {
        "path": path, "realpath": None, "status": "error", "error": None, "size": None,
        "journal_mode": None, "journal_mode_detail": None, "header": None, "header_ok": None,
        "sidecars": None, "locks": None, "in_use": None, "lock_holders": [], "integrity": None,
        "expect": expect, "expect_ok": None, "problems": [], "notes": [],
    }


def check_file(path: str, integrity: Optional[str] = None, expect: Optional[str] = None,
               timeout: float = 5.0) -> Dict[str, Any]:
    """The JSON object for one path (docs/cli.md, "walpatch check --json")."""
    result = _empty_result(path, expect)
    try:
        result["realpath"] = os.path.realpath(path)
        raw = inspect_raw(path)
    except CheckError as exc:
        result["error"] = str(exc)
        return result
    result.update(raw)
    problems: List[str] = result["problems"]
    if integrity and raw["header_ok"] is not False:
        res = run_integrity(path, raw, integrity == "full", timeout)
        result["integrity"] = res
        if res["ok"] is False:
            problems.append(f"{res['check']} failed: " + (
                "; ".join(res["messages"][:3]) or res["error"] or "see messages"))
        elif not res["ran"] and raw["size"] and not raw["sidecars"]["journal"].get("hot"):
            problems.append(f"{res['check']} could not run: {res['error'] or res['how']}")
    elif integrity:
        result["integrity"] = {"check": "integrity_check" if integrity == "full" else
                               "quick_check", "ran": False, "ok": None, "messages": [],
                               "error": None, "how": "the header is not valid"}
    if expect:
        mode = result["journal_mode"]
        result["expect_ok"] = mode == expect
        if not result["expect_ok"]:
            problems.append(f"expected journal mode {expect}, the header says {mode}")
    result["status"] = "problem" if problems else "ok"
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("paths", nargs="+", metavar="PATH", help="database file(s)")
    parser.add_argument("--integrity", action="store_true",
                        help="run PRAGMA quick_check through a read-only connection")
    parser.add_argument("--full", action="store_true",
                        help="with --integrity: run integrity_check instead (slower)")
    parser.add_argument("--expect", choices=("wal", "rollback"),
                        help="exit 1 when a file's header is not in this journal mode")
    parser.add_argument("--timeout", default="5", metavar="SECONDS",
                        help="how long the integrity check waits for a lock: more than 0, "
                             f"at most {MAX_TIMEOUT:g} (default 5)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (shape in docs/cli.md)")


#: The longest --timeout: SQLite's busy timeout is an int of milliseconds, and Python turns
#: inf, nan or more than about 24.8 days into no wait at all (issue 10, item 10).
MAX_TIMEOUT = 86400.0


def parse_timeout(raw: Any) -> Optional[float]:
    """``raw`` as seconds when finite, > 0 and <= MAX_TIMEOUT (ASCII digits only), else None."""
    text = str(raw).strip()
    if not re.match(r"([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z", text):
        return None
    value = float(text)
    return value if 0.0 < value <= MAX_TIMEOUT else None


def _exit_code(results: List[Dict[str, Any]]) -> int:
    if any(r["status"] == "error" for r in results):
        return EXIT_USAGE
    if any(r["status"] == "problem" for r in results):
        return EXIT_PROBLEM
    return EXIT_OK


def _fmt_size(n: Optional[int]) -> str:
    return "?" if n is None else f"{n} bytes"


def _sidecars_text(sc: Dict[str, Any]) -> str:
    parts = []
    wal = sc["wal"]
    if wal.get("exists"):
        text = f"-wal {_fmt_size(wal['size'])}"
        if wal.get("valid_header") is False and wal.get("size"):
            text += " (NOT a valid WAL header)"
        elif wal.get("frames") is not None:
            text += f" ({wal['frames']} frame(s))"
        parts.append(text)
    else:
        parts.append("-wal none")
    shm = sc["shm"]
    parts.append(f"-shm {_fmt_size(shm['size'])}" if shm.get("exists") else "-shm none")
    j = sc["journal"]
    if j.get("exists"):
        hot = {True: "HOT", False: "not hot", None: "hot or not: unknown"}[j.get("hot")]
        parts.append(f"-journal {_fmt_size(j['size'])} ({hot})")
    else:
        parts.append("-journal none")
    return ", ".join(parts)


def _print_human(r: Dict[str, Any]) -> None:
    mode = r["journal_mode"]
    h = r["header"] or {}
    label = {"wal": "WAL", "rollback": "rollback journal", "empty": "empty",
             "unknown": "UNKNOWN"}.get(mode, str(mode))
    if h.get("write_version") is not None and mode in ("wal", "rollback"):
        detail = f"header bytes 18-19 = {h['write_version']}/{h['read_version']}"
    else:
        detail = r["journal_mode_detail"]
    print(f"{r['path']}: {label} ({detail})")
    if h.get("magic_ok") and h.get("page_size"):
        bits = [_fmt_size(r["size"]), f"page size {h['page_size']}"]
        if h.get("page_count") is not None:
            bits.append(f"{h['page_count']} pages")
        if h.get("text_encoding"):
            bits.append(h["text_encoding"])
        if h.get("sqlite_version"):
            bits.append(f"last written by SQLite {h['sqlite_version']}")
        print(f"  header     {'ok' if r['header_ok'] else 'BAD'}: " + ", ".join(bits))
    print(f"  sidecars   {_sidecars_text(r['sidecars'])}")
    locks = r["locks"] or {}
    if locks.get("error"):
        print(f"  in use     unknown (locks cannot be queried: {locks['error']})")
    elif r["in_use"]:
        who = []
        writer = locks.get("reserved") or locks.get("pending")
        if writer:
            who.append(f"pid {writer} is writing")
        if locks.get("shared"):
            who.append(f"pid {locks['shared']} has it open")
        if locks.get("shm") and locks.get("shm") != locks.get("shared"):
            who.append(f"pid {locks['shm']} uses the -shm")
        print("  in use     yes (" + ", ".join(who) + ")")
    else:
        print("  in use     no (no process holds a lock on it)")
    integ = r["integrity"]
    if integ:
        if integ["ran"]:
            text = "ok" if integ["ok"] else "FAILED: " + "; ".join(integ["messages"][:5])
        else:
            text = "not run: " + (integ["error"] or integ["how"])
        print(f"  integrity  {integ['check']}: {text}")
    if r["expect"]:
        print(f"  expect     {r['expect']}: " + ("ok" if r["expect_ok"] else "NO"))
    for note in r["notes"]:
        print(f"  note: {note}")
    if r.get("wal_reset_bug") in ("affected", "unknown"):
        print(f"  sqlite     {_sqlite_line()}")
    for problem in r["problems"]:
        print(f"  PROBLEM: {problem}")


def _sqlite_verdict() -> Dict[str, Any]:
    """This interpreter's SQLite and its WAL-reset-bug verdict (under the environment's
    WALPATCH_WAL_RESET_BUG), for WAL files."""
    from ..config import build_config
    from ..sqliteinfo import interpreter_verdict

    return interpreter_verdict(build_config({})[0].wal_reset_bug)


def _sqlite_line() -> str:
    from ..sqliteinfo import cli_line

    return cli_line(_sqlite_verdict()["version"])


def run(args: argparse.Namespace) -> int:
    # (A reader that leaves, `walpatch ... | head`, is handled once in cli.main.)
    if args.full and not args.integrity:
        args.integrity = True
    timeout = parse_timeout(args.timeout)
    if timeout is None:
        print(f"walpatch check: --timeout {args.timeout!r}: expected a number of seconds "
              f"greater than 0 and at most {MAX_TIMEOUT:g} (one day), such as 5",
              file=sys.stderr)
        return EXIT_USAGE
    args.timeout = timeout
    integrity = ("full" if args.full else "quick") if args.integrity else None
    results = []
    for path in args.paths:
        try:
            r = check_file(path, integrity, args.expect, args.timeout)
        except Exception as exc:  # never a traceback: say what failed, in one line
            r = _empty_result(path, args.expect)
            r["error"] = f"unexpected error: {type(exc).__name__}: {exc}"
        # The WAL-reset bug concerns WAL files: this interpreter's verdict, null otherwise.
        r["wal_reset_bug"] = _sqlite_verdict()["wal_reset_bug"] \
            if r.get("journal_mode") == ondisk.WAL else None
        results.append(r)
        if r["status"] == "error":
            print(f"walpatch check: {path}: {r['error']}", file=sys.stderr)
        elif not args.json:
            _print_human(r)
    code = _exit_code(results)
    if args.json:
        print(json.dumps({"walpatch_check": JSON_VERSION, "exit_code": code, "files": results},
                         indent=2, sort_keys=True, default=str))
    return code
