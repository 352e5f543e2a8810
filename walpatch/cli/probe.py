"""Can this directory's filesystem host a WAL database? The probe creates a scratch database in
a new hidden directory inside DIR (default: the current directory), asks for WAL, writes and
reads it from a second connection and from a second process (so that the shared memory of the
-shm file is really exercised), checks the header on disk, checkpoints, and removes everything
it created. A failure is classified with the same classifier as the guard (transient I/O,
contention, WAL unsupported here, ...). The filesystem type and mount options come from
/proc/self/mountinfo (nfs, cifs, fuse, 9p, virtiofs, overlay, ... are named with what is known
about them). SQLite is measured as it is: walpatch's retries are bypassed even when walpatch
is active in this interpreter.

Exit codes: 0 WAL works in DIR; 1 WAL does not work there (refused, unsupported, or failed
with an error: the verdict says which); 2 DIR cannot be probed (missing, not a directory,
not writable, scratch files cannot be created) or bad usage. Unreadable mount information
is not fatal: a one-line warning on stderr, `filesystem.error` in the JSON, and the exit code
is the verdict's.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from .. import classify as _c
from .. import ondisk
from . import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE

JSON_VERSION = 1
MOUNTINFO = "/proc/self/mountinfo"

OK = "wal-ok"
UNSUPPORTED = "wal-unsupported"
FAILED = "wal-failed"

#: What is known about filesystems that host SQLite files (design.md §3, field reports).
FS_NOTES = {
    "nfs": "network filesystem: 'locking protocol' errors are typical; WAL needs shared "
           "memory, so a WAL database must only ever be used from one host",
    "cifs": "SMB/CIFS: 'database is locked' and unreliable locks are typical; WAL needs "
            "shared memory on one host",
    "smb3": "SMB: see cifs",
    "9p": "9p (WSL2, VMs): 'disk I/O error' on the -shm file (IOERR_SHMMAP) is typical",
    "virtiofs": "virtiofs: IOERR_SHMMAP on the -shm file is typical without DAX/shared mmap",
    "fuse": "FUSE: depends on the filesystem; with direct_io shared mmap of the -shm file is "
            "refused (IOERR_SHMMAP)",
    "overlay": "overlayfs (containers): works for files created in the upper layer; never "
               "share one database file between containers through it",
    "vboxsf": "VirtualBox shared folder: 'disk I/O error' is typical",
    "ceph": "network filesystem: WAL needs shared memory on one host",
    "glusterfs": "network filesystem: WAL needs shared memory on one host",
    "lustre": "network filesystem: WAL needs shared memory on one host",
    "tmpfs": "memory-backed: WAL works; the data is lost on reboot",
}
NETWORK = ("nfs", "cifs", "smb3", "smbfs", "9p", "virtiofs", "ceph", "glusterfs", "lustre",
           "afs", "gpfs", "vboxsf", "vmhgfs", "davfs", "fuse.sshfs")


class ProbeError(Exception):
    """DIR cannot be probed (exit code 2); the message is one line."""


# --------------------------------------------------------------------------------------------
# mount information
# --------------------------------------------------------------------------------------------

def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo (octal)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field) >= i + 4 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> List[Dict[str, Any]]:
    """The entries of a mountinfo file (proc(5)); malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if "-" not in parts[6:]:
            continue
        sep = parts.index("-", 6)
        if len(parts) < sep + 3:
            continue
        try:
            major, minor = (int(x) for x in parts[2].split(":"))
        except ValueError:
            continue
        mounts.append({
            "mount_id": parts[0], "device": f"{major}:{minor}", "major": major, "minor": minor,
            "root": _unescape(parts[3]), "mount_point": _unescape(parts[4]),
            "mount_options": parts[5].split(","), "fs_type": parts[sep + 1],
            "source": _unescape(parts[sep + 2]),
            "super_options": parts[sep + 3].split(",") if len(parts) > sep + 3 else [],
        })
    return mounts


def find_mount(mounts: List[Dict[str, Any]], path: str, st_dev: int) -> Optional[Dict[str, Any]]:
    """The mount holding ``path``: same device, longest mount point that contains it (the
    last such entry wins, as the last mount on a point hides the earlier ones)."""
    real = os.path.realpath(path)
    best = None
    for m in mounts:
        mp = m["mount_point"]
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if not inside:
            continue
        same_dev = (m["major"], m["minor"]) == (os.major(st_dev), os.minor(st_dev))
        key = (same_dev, len(mp))
        if best is None or key >= best[0]:
            best = (key, m)
    return best[1] if best else None


#: A mount table larger than this is not one (/dev/zero would be read until MemoryError).
MAX_MOUNTINFO_BYTES = 16 * 1024 * 1024


def read_mount_table(path: str) -> str:
    """The text of a mountinfo file, read without ever blocking (a FIFO or a device is
    refused) and at most MAX_MOUNTINFO_BYTES; ValueError says what is wrong with it."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)  # not a database file
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ValueError("is a directory")
        if not stat.S_ISREG(mode):
            raise ValueError("not a regular file (give a mountinfo file such as "
                             f"{MOUNTINFO})")
        chunks: List[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_MOUNTINFO_BYTES:
                raise ValueError(f"larger than {MAX_MOUNTINFO_BYTES // (1024 * 1024)} MiB: "
                                 f"not a mount table (give a mountinfo file such as "
                                 f"{MOUNTINFO})")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def filesystem_info(path: str, mountinfo: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {"mountinfo": mountinfo, "error": None, "fs_type": None,
                            "mount_point": None, "source": None, "mount_options": [],
                            "super_options": [], "network": None, "device": None,
                            "notes": []}
    try:
        text = read_mount_table(mountinfo)
    except OSError as exc:
        info["error"] = f"cannot read {mountinfo}: {(exc.strerror or str(exc)).lower()}"
        return info
    except ValueError as exc:
        info["error"] = f"cannot read {mountinfo}: {exc}"
        return info
    mounts = parse_mountinfo(text)
    if not mounts:
        info["error"] = f"{mountinfo} holds no mount entries"
        return info
    mount = find_mount(mounts, path, os.stat(path).st_dev)
    if mount is None:
        info["error"] = f"no entry of {mountinfo} holds {os.path.realpath(path)}"
        return info
    fs = mount["fs_type"]
    info.update(fs_type=fs, mount_point=mount["mount_point"], source=mount["source"],
                mount_options=mount["mount_options"], super_options=mount["super_options"],
                device=mount["device"])
    family = fs.split(".", 1)[0]
    info["network"] = fs in NETWORK or family in NETWORK
    note = FS_NOTES.get(fs) or FS_NOTES.get(family)
    if note:
        info["notes"].append(note)
    opts = set(mount["mount_options"]) | set(mount["super_options"])
    if "ro" in mount["mount_options"]:
        info["notes"].append("mounted read-only")
    if family == "nfs" and ("nolock" in opts or "local_lock=all" in opts):
        info["notes"].append("NFS with local locks only (nolock/local_lock): other hosts do "
                             "not see this host's locks")
    if any(o in opts for o in ("cache=none", "cache=loose")) and family in ("9p", "virtiofs"):
        info["notes"].append("cache mode " + ",".join(sorted(o for o in opts
                                                              if o.startswith("cache="))))
    return info


# --------------------------------------------------------------------------------------------
# the probe itself
# --------------------------------------------------------------------------------------------

_SECOND_PROCESS = r"""
import json, sqlite3, sys
out = {"ok": False}
try:
    c = sqlite3.connect(sys.argv[1], timeout=5, isolation_level=None)
    out["mode"] = c.execute("PRAGMA journal_mode").fetchone()[0]
    out["rows_seen"] = c.execute("SELECT count(*) FROM probe").fetchone()[0]
    c.execute("INSERT INTO probe VALUES ('from a second process')")
    out["rows_after"] = c.execute("SELECT count(*) FROM probe").fetchone()[0]
    c.close()
    out["ok"] = True
except Exception as e:
    out.update(error=str(e), errorname=getattr(e, "sqlite_errorname", None),
               errorcode=getattr(e, "sqlite_errorcode", None), type=type(e).__name__)
print(json.dumps(out))
"""


class _StepFailed(Exception):
    def __init__(self, step: Dict[str, Any]) -> None:
        super().__init__(step.get("error"))
        self.step = step


def _raw_connect() -> Any:
    """sqlite3.connect without walpatch's wrapper, if walpatch is active here."""
    import sqlite3

    return getattr(sqlite3.connect, "__wrapped__", sqlite3.connect)


class _Recorder:
    def __init__(self) -> None:
        self.steps: List[Dict[str, Any]] = []
        self.io_seen = False

    def run(self, name: str, what: str, fn: Any) -> Any:
        started = time.monotonic()
        step: Dict[str, Any] = {"step": name, "what": what, "ok": False, "seconds": None,
                                "error": None, "errorname": None, "errorcode": None,
                                "category": None}
        self.steps.append(step)
        try:
            value = fn()
        except Exception as exc:  # sqlite3.Error, OSError, subprocess errors
            category = _c.classify(exc, after_io_error=self.io_seen)
            self.io_seen = self.io_seen or category == _c.TRANSIENT_IO
            code, name_ = _c.error_code(exc)
            step.update(error=str(exc) or type(exc).__name__, errorname=name_, errorcode=code,
                        category=category, seconds=round(time.monotonic() - started, 4))
            raise _StepFailed(step) from None
        step.update(ok=True, seconds=round(time.monotonic() - started, 4))
        return value


def _probe_database(db: str, python: Optional[str]) -> Dict[str, Any]:
    connect = _raw_connect()
    rec = _Recorder()
    out: Dict[str, Any] = {"steps": rec.steps, "verdict": None, "reason": None,
                           "category": None, "header_after_wal": None, "notes": []}
    conns: List[Any] = []

    def fail(reason: str, verdict: str, category: Optional[str] = None) -> Dict[str, Any]:
        out.update(verdict=verdict, reason=reason, category=category)
        return out

    try:
        a = rec.run("connect", "open a new scratch database",
                    lambda: connect(db, timeout=2, isolation_level=None))
        conns.append(a)
        mode = rec.run("journal_mode=wal", "PRAGMA journal_mode=WAL",
                       lambda: a.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        rec.steps[-1]["returned"] = mode
        if str(mode).lower() != "wal":
            rec.steps[-1]["ok"] = False
            return fail(f"SQLite refused WAL silently: PRAGMA journal_mode=WAL returned "
                        f"{mode!r} (a VFS or filesystem without shared memory)", UNSUPPORTED,
                        _c.WAL_UNSUPPORTED)
        rec.run("write", "create a table and commit a row (uses the -wal and -shm files)",
                lambda: (a.execute("CREATE TABLE probe(x)"),
                         a.execute("INSERT INTO probe VALUES ('first connection')")))
        disk = rec.run("header", "read header bytes 18-19 on disk",
                       lambda: ondisk.read_disk_state(db))
        out["header_after_wal"] = list(disk.header) if disk.header else None
        rec.steps[-1]["detail"] = disk.detail
        if not disk.is_wal:
            rec.steps[-1]["ok"] = False
            return fail(f"the connection reports WAL but on disk {disk.detail}", FAILED,
                        _c.STATE)
        b = rec.run("second-connection", "a second connection reads and writes",
                    lambda: connect(db, timeout=2, isolation_level=None))
        conns.append(b)

        def second_conn() -> int:
            seen = b.execute("SELECT count(*) FROM probe").fetchone()[0]
            b.execute("INSERT INTO probe VALUES ('second connection')")
            return seen

        seen = rec.run("second-connection-io", "read the first row, write a second",
                       second_conn)
        if seen != 1:
            rec.steps[-1]["ok"] = False
            return fail(f"the second connection saw {seen} row(s) instead of 1", FAILED)
        if python:
            child = rec.run("second-process", "another process reads and writes (shared "
                            "memory across processes)", lambda: _second_process(python, db))
            rec.steps[-1]["result"] = child
            if not child.get("ok"):
                rec.steps[-1]["ok"] = False
                category = _c.classify(_ChildError(child))
                rec.steps[-1].update(error=child.get("error"), errorname=child.get("errorname"),
                                     category=category)
                return fail(f"a second process could not use the database: "
                            f"{child.get('error')} ({child.get('errorname') or 'no code'})",
                            UNSUPPORTED if category == _c.WAL_UNSUPPORTED else FAILED,
                            category)
            if child.get("mode") != "wal" or child.get("rows_seen") != 2:
                rec.steps[-1]["ok"] = False
                return fail(f"the second process saw mode {child.get('mode')!r} and "
                            f"{child.get('rows_seen')} row(s) (expected 'wal' and 2)", FAILED)
        else:
            out["notes"].append("no Python executable to start a second process with: the "
                                "cross-process step was skipped")
        expect = 3 if python else 2
        seen = rec.run("read-back", "the first connection sees every write",
                       lambda: a.execute("SELECT count(*) FROM probe").fetchone()[0])
        if seen != expect:
            rec.steps[-1]["ok"] = False
            return fail(f"the first connection saw {seen} row(s) instead of {expect}: the "
                        "shared memory is not coherent between processes", UNSUPPORTED,
                        _c.WAL_UNSUPPORTED)
        rec.run("checkpoint", "PRAGMA wal_checkpoint(TRUNCATE)",
                lambda: a.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        out.update(verdict=OK, reason="WAL works here: two connections and two processes "
                                      "shared the database through the -shm file")
        return out
    except _StepFailed as failed:
        step = failed.step
        category = str(step.get("category") or "")
        verdict = UNSUPPORTED if category == _c.WAL_UNSUPPORTED else FAILED
        what = {
            _c.WAL_UNSUPPORTED: "WAL is not supported on this filesystem",
            _c.TRANSIENT_IO: "a (possibly transient) I/O error; run the probe again",
            _c.CONTENTION: "the scratch database was locked (contention); run the probe again",
        }.get(category or "", "an error that is neither contention, I/O nor 'unsupported'")
        return fail(f"step {step['step']!r} failed with {step.get('errorname') or 'an error'}"
                    f" ({step.get('error')}): {what}", verdict, category)
    finally:
        for conn in reversed(conns):
            try:
                conn.close()
            except Exception:
                pass


class _ChildError(Exception):
    """The second process's error, shaped for classify() (message + extended code)."""

    def __init__(self, child: Dict[str, Any]) -> None:
        super().__init__(child.get("error") or "")
        self.sqlite_errorcode = child.get("errorcode")
        self.sqlite_errorname = child.get("errorname")


def _second_process(python: str, db: str) -> Dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    proc = subprocess.run([python, "-c", _SECOND_PROCESS, db], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"ok": False, "error": f"the second process exited {proc.returncode}: "
                                  f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}"}


def _why(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    return (exc.strerror or str(exc)).lower()


def probe(directory: str, mountinfo: str = MOUNTINFO, keep: bool = False,
          python: Optional[str] = None) -> Dict[str, Any]:
    """The JSON object of ``walpatch probe`` (docs/cli.md). Raises ProbeError for a directory
    that cannot be probed."""
    import sqlite3

    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ProbeError(f"{directory}: " + ("no such directory" if exc.errno == errno.ENOENT
                                             else _why(exc))) from None
    if not os.path.isdir(directory):
        raise ProbeError(f"{directory}: not a directory")
    del st
    result: Dict[str, Any] = {
        "walpatch_probe": JSON_VERSION, "directory": directory,
        "realpath": os.path.realpath(directory), "sqlite_version": sqlite3.sqlite_version,
        "filesystem": filesystem_info(directory, mountinfo),
    }
    try:
        scratch = tempfile.mkdtemp(prefix=".walpatch-probe-", dir=directory)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # an existing directory that refuses new entries
            raise ProbeError(f"{directory}: cannot create scratch files there: this "
                             "filesystem does not allow creating files (a pseudo filesystem "
                             "such as /proc or /sys?); give a directory where the database "
                             "would live") from None
        raise ProbeError(f"{directory}: cannot create scratch files there: {_why(exc)}") \
            from None
    result["scratch"] = scratch
    db = os.path.join(scratch, "probe.db")
    try:
        result.update(_probe_database(db, python if python is not None else sys.executable))
        left = sorted(os.listdir(scratch))
        result["files_after_close"] = left
    finally:
        if keep:
            result["cleaned_up"] = False
        else:
            shutil.rmtree(scratch, ignore_errors=True)
            result["cleaned_up"] = not os.path.lexists(scratch)
    result["exit_code"] = EXIT_OK if result["verdict"] == OK else EXIT_PROBLEM
    # WAL works here: does this interpreter's SQLite have the WAL-reset bug? (null otherwise)
    from ..config import build_config
    from ..sqliteinfo import interpreter_verdict

    result["wal_reset_bug"] = interpreter_verdict(build_config({})[0].wal_reset_bug)[
        "wal_reset_bug"] if result["verdict"] == OK else None
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("directory", nargs="?", default=".", metavar="DIR",
                        help="directory to probe (default: the current directory)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (shape in docs/cli.md)")
    parser.add_argument("--mountinfo", default=MOUNTINFO, metavar="FILE",
                        help=f"mount table to read (default {MOUNTINFO}; e.g. "
                             "/proc/PID/mountinfo for another process's view)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the scratch directory in place (for inspection)")


def _print_human(r: Dict[str, Any]) -> None:
    fs = r["filesystem"]
    print(f"directory   {r['realpath']}")
    if fs["error"]:
        print(f"filesystem  unknown ({fs['error']})")
    else:
        net = ", network filesystem" if fs["network"] else ""
        print(f"filesystem  {fs['fs_type']} on {fs['mount_point']} (source {fs['source']}"
              f"{net})")
        print(f"options     {','.join(fs['mount_options'])}"
              + (f"; {','.join(fs['super_options'])}" if fs["super_options"] else ""))
        for note in fs["notes"]:
            print(f"note        {note}")
    print(f"sqlite      {r['sqlite_version']}")
    for step in r["steps"]:
        mark = "ok  " if step["ok"] else "FAIL"
        extra = ""
        if "returned" in step:
            extra = f" -> {step['returned']!r}"
        if step.get("error"):
            extra = f": {step['error']} ({step.get('errorname') or 'no code'}, " \
                    f"{step.get('category')})"
        print(f"  [{mark}] {step['step']:<20} {step['what']}{extra}")
    if r.get("wal_reset_bug") in ("affected", "unknown"):
        from ..sqliteinfo import cli_line

        print(f"note        {cli_line(r['sqlite_version'])}")
    print(f"verdict     {r['verdict']}: {r['reason']}")
    if not r.get("cleaned_up"):
        print(f"scratch     kept at {r['scratch']}")


def run(args: argparse.Namespace) -> int:
    # (A reader that leaves, `walpatch ... | head`, is handled once in cli.main.)
    try:
        result = probe(args.directory, args.mountinfo, keep=args.keep)
    except ProbeError as exc:
        print(f"walpatch probe: {exc}", file=sys.stderr)
        if args.json:  # a JSON reader gets an answer it can parse, not an empty stdout
            print(json.dumps({"walpatch_probe": JSON_VERSION, "exit_code": EXIT_USAGE,
                              "directory": args.directory, "error": str(exc)},
                             indent=2, sort_keys=True))
        return EXIT_USAGE
    except Exception as exc:  # never a traceback
        print(f"walpatch probe: unexpected error: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_PROBLEM
    if result["filesystem"]["error"]:
        print(f"walpatch probe: warning: {result['filesystem']['error']}; filesystem type "
              "unknown", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        _print_human(result)
    return int(result["exit_code"])
