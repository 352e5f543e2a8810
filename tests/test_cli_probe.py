"""`walpatch probe` on real mounts: a tmpfs of its own (WAL works), a FUSE mount that refuses
shared mmap (bindfs -o direct_io: SQLite gets IOERR_SHMMAP, WAL is unsupported there) and the
same FUSE mount without direct_io as a control; bad directories (missing, a file, a read-only
mount, no permission), unreadable mount information, the JSON shape and the exit codes.

Mounting needs root (tmpfs, FUSE); the FUSE tests need bindfs (Debian: apt-get install -y
bindfs). They are marked ``fault``: with WALPATCH_REQUIRE_FAULTS=1 a skip fails the session.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

from walpatch.cli import probe as cli_probe

ROOT = Path(__file__).resolve().parent.parent
DROP_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search"]
TOP_KEYS = {
    "walpatch_probe", "exit_code", "directory", "realpath", "sqlite_version", "filesystem",
    "scratch", "steps", "verdict", "reason", "category", "header_after_wal",
    "files_after_close", "cleaned_up", "notes", "wal_reset_bug",
}
FS_KEYS = {"mountinfo", "error", "fs_type", "mount_point", "source", "mount_options",
           "super_options", "network", "device", "notes"}
STEP_KEYS = {"step", "what", "ok", "seconds", "error", "errorname", "errorcode", "category"}


def env() -> Dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    e["PYTHONPATH"] = str(ROOT)
    return e


def probe(*args: str, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "walpatch", "probe", *args],
                          env=env(), capture_output=True, text=True, timeout=60)


def probe_json(*args: str, **kw) -> tuple:
    proc = probe("--json", *args, **kw)
    assert "Traceback" not in proc.stderr, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == TOP_KEYS, set(data) ^ TOP_KEYS
    assert set(data["filesystem"]) == FS_KEYS
    for step in data["steps"]:
        assert set(step) >= STEP_KEYS
    assert data["exit_code"] == proc.returncode
    return proc, data


def _umount(path: Path) -> None:
    for _ in range(50):
        if not os.path.ismount(path):
            return
        subprocess.run(["umount", str(path)], capture_output=True)
        if os.path.ismount(path):
            time.sleep(0.1)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs mount"  # a space: mountinfo escapes it as \040
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "walpatch-test", str(mnt)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"mounting a tmpfs needs root: {proc.stderr}"
    try:
        yield mnt
    finally:
        _umount(mnt)


def _bindfs_missing() -> Optional[str]:
    if shutil.which("bindfs") is None:
        return "bindfs is not installed (apt-get install -y bindfs)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel/container)"
    return None


def bindfs(src: Path, mnt: Path, options: List[str]) -> None:
    reason = _bindfs_missing()
    if reason:
        pytest.skip(reason)
    src.mkdir()
    mnt.mkdir()
    proc = subprocess.run(["bindfs", *options, str(src), str(mnt)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    for _ in range(100):
        if os.path.ismount(mnt):
            return
        time.sleep(0.05)
    raise AssertionError("bindfs did not mount")


# ---- real filesystems -----------------------------------------------------------------------

def test_probe_on_tmpfs_succeeds(tmpfs: Path) -> None:
    proc, data = probe_json(str(tmpfs))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["verdict"] == "wal-ok" and data["category"] is None
    fs = data["filesystem"]
    assert fs["fs_type"] == "tmpfs" and fs["mount_point"] == str(tmpfs)
    assert fs["source"] == "walpatch-test" and fs["error"] is None and fs["network"] is False
    assert "size=16384k" in fs["super_options"]
    assert data["header_after_wal"] == [2, 2]
    names = [s["step"] for s in data["steps"]]
    assert names == ["connect", "journal_mode=wal", "write", "header", "second-connection",
                     "second-connection-io", "second-process", "read-back", "checkpoint"]
    assert all(s["ok"] for s in data["steps"])
    child = data["steps"][6]["result"]
    assert child == {"ok": True, "mode": "wal", "rows_seen": 2, "rows_after": 3}
    # SQLite removed -wal/-shm at the last close; the probe removed everything else.
    assert data["files_after_close"] == ["probe.db"]
    assert data["cleaned_up"] is True and os.listdir(tmpfs) == []


def test_probe_human_output(tmpfs: Path) -> None:
    proc = probe(str(tmpfs))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == f"directory   {tmpfs}"
    assert out[1] == f"filesystem  tmpfs on {tmpfs} (source walpatch-test)"
    assert out[-1].startswith("verdict     wal-ok: WAL works here")
    assert "  [ok  ] second-process" in proc.stdout
    assert os.listdir(tmpfs) == []


@pytest.mark.fault
def test_probe_on_fuse_without_shared_mmap_is_refused(tmp_path: Path) -> None:
    """bindfs -o direct_io: the kernel refuses MAP_SHARED on direct-I/O FUSE files (ENODEV),
    so SQLite cannot map the -shm file. A real 'WAL unsupported here' filesystem."""
    mnt = tmp_path / "mnt"
    bindfs(tmp_path / "src", mnt, ["-o", "direct_io"])
    try:
        proc, data = probe_json(str(mnt))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        # Before 3.11 sqlite3 gives no extended code: IOERR_SHMMAP is a plain "disk I/O
        # error", which the classifier takes as transient I/O (documented limit), so the
        # verdict is "failed" there, still exit 1.
        expected = "wal-unsupported" if sys.version_info >= (3, 11) else "wal-failed"
        assert data["verdict"] == expected
        assert data["category"] == ("wal-unsupported" if sys.version_info >= (3, 11)
                                    else "transient-io")
        failed = [s for s in data["steps"] if not s["ok"]]
        assert len(failed) == 1 and failed[0]["step"] == "write"
        assert failed[0]["error"] == "disk I/O error"
        if sys.version_info >= (3, 11):
            assert failed[0]["errorname"] == "SQLITE_IOERR_SHMMAP"
        assert data["filesystem"]["fs_type"] == "fuse"
        assert any("direct_io" in n for n in data["filesystem"]["notes"])
        assert data["cleaned_up"] is True and os.listdir(mnt) == []
        assert os.listdir(tmp_path / "src") == []
        human = probe(str(mnt))
        assert human.returncode == 1
        assert f"verdict     {expected}: step 'write' failed" in human.stdout
    finally:
        _umount(mnt)


@pytest.mark.fault
def test_probe_on_fuse_with_shared_mmap_works(tmp_path: Path) -> None:
    """The control: the same FUSE filesystem without direct_io supports shared mmap."""
    mnt = tmp_path / "mnt"
    bindfs(tmp_path / "src", mnt, [])
    try:
        proc, data = probe_json(str(mnt))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert data["verdict"] == "wal-ok" and data["filesystem"]["fs_type"] == "fuse"
    finally:
        _umount(mnt)


# ---- bad input ------------------------------------------------------------------------------

def test_missing_directory_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    proc = probe(str(missing))
    assert proc.returncode == 2
    assert proc.stderr == f"walpatch probe: {missing}: no such directory\n"
    assert not missing.exists()
    (tmp_path / "f.txt").write_text("x")
    proc = probe("--json", str(tmp_path / "f.txt"))
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {  # issue 10 item 17: a JSON reader gets JSON
        "walpatch_probe": 1, "exit_code": 2, "directory": str(tmp_path / "f.txt"),
        "error": f"{tmp_path / 'f.txt'}: not a directory"}
    assert proc.stderr == f"walpatch probe: {tmp_path / 'f.txt'}: not a directory\n"
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_read_only_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "walpatch-ro", str(mnt)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    try:
        proc = probe(str(mnt))
        assert proc.returncode == 2
        assert proc.stderr == (f"walpatch probe: {mnt}: cannot create scratch files there: "
                               "read-only file system\n")
    finally:
        _umount(mnt)


def test_unwritable_directory(tmp_path: Path) -> None:
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o555)
    prefix = DROP_DAC if os.geteuid() == 0 else []
    try:
        proc = probe(str(d), prefix=prefix)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr == (f"walpatch probe: {d}: cannot create scratch files there: "
                               "permission denied\n")
        assert os.listdir(d) == []
    finally:
        d.chmod(0o755)


def test_unreadable_mount_information(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for mountinfo, message in (
        (tmp_path / "missing", f"cannot read {tmp_path / 'missing'}: no such file or directory"),
        (tmp_path, f"cannot read {tmp_path}: is a directory"),
        (tmp_path / "garbage", f"{tmp_path / 'garbage'} holds no mount entries"),
    ):
        if mountinfo.name == "garbage":
            mountinfo.write_text("this is not a mount table\n")
        proc, data = probe_json("--mountinfo", str(mountinfo), str(work))
        assert proc.returncode == 0, proc.stderr  # the probe itself still ran: WAL works
        assert data["verdict"] == "wal-ok"
        assert data["filesystem"]["error"] == message
        assert data["filesystem"]["fs_type"] is None
        assert proc.stderr == (f"walpatch probe: warning: {message}; filesystem type "
                               "unknown\n")
    assert os.listdir(work) == []
    proc = probe("--mountinfo", str(tmp_path / "missing"), str(work))
    assert proc.returncode == 0 and "filesystem  unknown (cannot read" in proc.stdout


def test_keep_leaves_the_scratch_directory(tmp_path: Path) -> None:
    proc, data = probe_json("--keep", str(tmp_path))
    assert proc.returncode == 0
    assert data["cleaned_up"] is False
    scratch = Path(data["scratch"])
    assert scratch.parent == tmp_path and scratch.name.startswith(".walpatch-probe-")
    assert sorted(os.listdir(scratch)) == ["probe.db"]
    head = (scratch / "probe.db").read_bytes()[:100]
    assert (head[18], head[19]) == (2, 2)


# ---- pure parts -----------------------------------------------------------------------------

MOUNTINFO = (
    "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "40 22 0:35 / /srv/my\\040data rw,nosuid - nfs4 server:/export rw,vers=4.2,local_lock=all\n"
    "41 22 0:36 / /srv/my\\040data/sub rw - 9p hostshare rw,cache=none,trans=virtio\n"
    "broken line\n"
)


def test_parse_mountinfo_and_find_mount() -> None:
    mounts = cli_probe.parse_mountinfo(MOUNTINFO)
    assert [m["mount_point"] for m in mounts] == ["/", "/srv/my data", "/srv/my data/sub"]
    assert mounts[1]["fs_type"] == "nfs4" and mounts[1]["source"] == "server:/export"
    assert mounts[1]["super_options"] == ["rw", "vers=4.2", "local_lock=all"]
    assert mounts[0]["mount_options"] == ["rw", "relatime"]
    dev = os.makedev(0, 36)
    found = cli_probe.find_mount(mounts, "/srv/my data/sub/x", dev)
    assert found is not None and found["fs_type"] == "9p"
    found = cli_probe.find_mount(mounts, "/srv/my data", os.makedev(0, 35))
    assert found is not None and found["fs_type"] == "nfs4"
    assert cli_probe.find_mount(mounts, "/srv/my database", os.makedev(253, 1))["fs_type"] \
        == "ext4"
