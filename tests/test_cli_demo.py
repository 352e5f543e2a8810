"""`walpatch demo` and its parts: the bundled legacy app (walpatch.demo_app), the libfiu
wrapper (walpatch.faults), both scenarios with a real injected EIO, the JSON shape, the human
output, --keep (the kept files are re-read independently), and a machine without libfiu.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest

from walpatch import faults

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "apt-get install -y fiu-utils libfiu-dev"


def env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    e["PYTHONPATH"] = str(ROOT)
    e.update(extra or {})
    return e


def demo(*args: str, extra_env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walpatch", "demo", *args],
                          env=env(extra_env), capture_output=True, text=True, timeout=120)


def header(path: Path) -> tuple:
    data = path.read_bytes()[:100]  # this process holds no connection to the file
    return data[18], data[19]


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory) -> dict:
    if faults.available()[0] is False:
        pytest.skip(f"libfiu not available: {faults.available()[1]}")
    parent = tmp_path_factory.mktemp("demo")
    proc = demo("--json", "--keep", "--dir", str(parent))
    assert "Traceback" not in proc.stderr, proc.stderr
    data = json.loads(proc.stdout)
    data["_proc"] = proc
    return data


@pytest.mark.fault
def test_demo_json_both_scenarios(demo_json: dict) -> None:
    proc = demo_json["_proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert demo_json["walpatch_demo"] == 1 and demo_json["exit_code"] == 0
    assert demo_json["fault_injection"]["available"] is True
    assert demo_json["fault_injection"]["simulated"] is False
    s1, s2 = demo_json["scenarios"]
    assert (s1["name"], s2["name"]) == ("transient-eio", "already-wal")
    for sc in (s1, s2):
        assert sc["as_expected"] is True
        for run in sc["runs"].values():
            assert run["problems"] == [] and run["as_expected"] is True
            f = run["app"]["fault"]
            assert f["point"] == "posix/io/rw/pwrite" and f["errno"] == "EIO"
            if sc is s1:  # one transient EIO
                assert f["times"] == 1 and f["fired"] == 1 and f["calls"] >= 1
            else:  # a persistent EIO for the whole WAL request: every call fails
                assert f["times"] is None and f["fired"] == f["calls"] >= 1

    # Scenario 1: rollback file, one EIO during the WAL request.
    without, with_ = s1["runs"]["without"], s1["runs"]["with"]
    assert without["header_before"] == with_["header_before"] == [1, 1]
    assert without["app"]["fallback"] is True and without["app"]["final_mode"] == "delete"
    assert without["app"]["wal_error"]["message"] == "disk I/O error"
    assert without["app_log"][0] == \
        "WARNING: could not enable WAL (disk I/O error), falling back to DELETE"
    assert without["header_after"] == [1, 1] and without["events"] == []
    assert without["app"]["walpatch"] == {"active": False, "stats": None}
    assert with_["app"]["fallback"] is False and with_["app"]["wal_error"] is None
    assert with_["app"]["final_mode"] == "wal" and with_["header_after"] == [2, 2]
    assert with_["exit_code"] == 0
    assert [e["event"] for e in with_["events"]] == ["wal-retry", "wal-recovered"]
    stats = with_["app"]["walpatch"]["stats"]
    assert stats["wal_retries"] == 1 and stats["wal_recovered"] == 1

    # Scenario 2: the file is already WAL; the fallback asks for DELETE.
    without, with_ = s2["runs"]["without"], s2["runs"]["with"]
    assert without["header_before"] == with_["header_before"] == [2, 2]
    assert without["app"]["fallback"] is True and without["header_after"] == [1, 1]
    assert without["exit_code"] == 0
    assert with_["app"]["fallback"] is True
    assert with_["app"]["error"]["type"] == "WalDowngradeRefused"
    assert with_["exit_code"] == 1 and with_["header_after"] == [2, 2]
    assert [e["event"] for e in with_["events"]][-1] == "downgrade-refused"
    assert with_["events"][-1]["disk"] == "wal"
    assert with_["app"]["walpatch"]["stats"]["downgrades_refused"] == 1


@pytest.mark.fault
def test_kept_files_say_the_same(demo_json: dict) -> None:
    """Re-read the kept databases without the demo: its report matches the files."""
    scratch = Path(demo_json["scratch"])
    assert demo_json["scratch_kept"] is True and scratch.is_dir()
    expected = {
        "transient-eio-without-walpatch.db": (1, 1), "transient-eio-with-walpatch.db": (2, 2),
        "already-wal-without-walpatch.db": (1, 1), "already-wal-with-walpatch.db": (2, 2),
    }
    for name, pair in expected.items():
        assert header(scratch / name) == pair, name
    proc = subprocess.run([sys.executable, "-m", "walpatch", "check", "--json", "--integrity",
                           *(str(scratch / n) for n in expected)], env=env(),
                          capture_output=True, text=True, timeout=60)
    files = json.loads(proc.stdout)["files"]
    assert [f["journal_mode"] for f in files] == ["rollback", "wal", "rollback", "wal"]
    assert all(f["integrity"]["ok"] for f in files), proc.stdout
    assert (scratch / "transient-eio-events.jsonl").exists()


@pytest.mark.fault
def test_demo_human_output(tmp_path: Path) -> None:
    if faults.available()[0] is False:
        pytest.skip(f"libfiu not available: {faults.available()[1]}")
    proc = demo("--dir", str(tmp_path), extra_env={"COLUMNS": "120"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "simulated" not in out.lower()
    assert out.count("WITHOUT walpatch") == 2 and out.count("WITH walpatch") == 2
    assert out.count("real (libfiu): pwrite() -> EIO, once;") == 2
    assert out.count("real (libfiu): pwrite() -> EIO, persistent;") == 2
    assert out.count("WARNING: could not enable WAL (disk I/O") == 3
    assert "wal-recovered:" in out and "downgrade-refused:" in out
    lines = out.splitlines()
    after = [ln for ln in lines if ln.startswith("file after")]
    assert after[0].split() == ["file", "after", "bytes", "18-19", "=", "1/1", "(rollback)",
                                "<-", "not", "WAL", "bytes", "18-19", "=", "2/2", "(WAL)"]
    assert "<- DOWNGRADED" in after[1] and "2/2 (WAL)  (unchanged)" in after[1]
    assert lines[-1] == "Both scenarios behaved as documented."
    assert os.listdir(tmp_path) == []  # scratch removed


def test_demo_without_libfiu_says_so(tmp_path: Path) -> None:
    """A machine without fiu-run: nothing simulated, a clear message, exit 2."""
    no_fiu = {"PATH": "/nonexistent-bin", "TMPDIR": str(tmp_path)}
    proc = demo(extra_env=no_fiu)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == ("walpatch demo: cannot inject a real fault here: fiu-run is not on "
                           f"PATH (install libfiu: {INSTALL}). Nothing is simulated; install "
                           "libfiu and run the demo again\n")
    proc = demo("--json", extra_env=no_fiu)
    assert proc.returncode == 2
    data = json.loads(proc.stdout)
    assert data["fault_injection"] == {"available": False, "simulated": False,
                                       "detail": f"fiu-run is not on PATH (install libfiu: "
                                                 f"{INSTALL})"}
    assert data["scenarios"] == []
    assert os.listdir(tmp_path) == []


def test_demo_bad_dir(tmp_path: Path) -> None:
    if faults.available()[0] is False:
        pytest.skip(f"libfiu not available: {faults.available()[1]}")
    proc = demo("--dir", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert proc.stderr == f"walpatch demo: --dir {tmp_path / 'missing'}: no such directory\n"


# ---- the parts ------------------------------------------------------------------------------

def test_demo_app_without_fault(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    proc = subprocess.run([sys.executable, "-m", "walpatch.demo_app", str(db)], env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["final_mode"] == "wal" and report["rows"] == 1
    assert report["fallback"] is False and report["fault"] is None
    assert report["walpatch"] == {"active": False, "stats": None}
    assert header(db) == (2, 2)


def test_demo_app_refuses_a_fault_outside_fiu_run(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    proc = subprocess.run([sys.executable, "-m", "walpatch.demo_app", str(db), "--fault",
                           "pwrite"], env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4
    assert proc.stderr.startswith("demo_app: cannot set up the fault:")
    assert not db.exists()


@pytest.mark.fault
def test_faults_persistent_and_disable(tmp_path: Path) -> None:
    """walpatch.faults in a child under fiu-run: once, persistent, disable()."""
    if faults.available()[0] is False:
        pytest.skip(f"libfiu not available: {faults.available()[1]}")
    code = r"""
import errno, json, os, sys
from walpatch import faults
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)   # a scratch file, not a database
out = {"under": faults.under_fiu_run()}
def attempt():
    try:
        os.pwrite(fd, b"x", 0)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
f = faults.enable("pwrite", "EIO", once=True)
out["once"] = [attempt(), attempt()]
f.disable()
g = faults.enable("pwrite", "ENOSPC", once=False)
out["persistent"] = [attempt(), attempt(), attempt()]
faults.disable("posix/io/rw/pwrite")
out["after_disable"] = attempt()
out["counts"] = [f.calls, f.fired, g.calls, g.fired]
print(json.dumps(out))
"""
    proc = subprocess.run([*faults.command_prefix(), sys.executable, "-c", code,
                           str(tmp_path / "scratch")], env=env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {"under": True, "once": ["EIO", "ok"], "persistent": ["ENOSPC"] * 3,
                   "after_disable": "ok", "counts": [2, 1, 3, 3]}


def test_faults_api_validation() -> None:
    ok, detail = faults.available()
    assert isinstance(ok, bool) and detail
    if ok:
        assert "fiu-run" in detail
    else:
        assert INSTALL in detail
    assert faults.point_name("mmap") == "posix/mm/mmap"
    assert faults.point_name("posix/io/rw/pread") == "posix/io/rw/pread"
    assert faults.errno_value("eio") == 5 and faults.errno_value(28) == 28
    with pytest.raises(ValueError):
        faults.errno_value("ENOTANERRNO")
    with pytest.raises(ValueError):
        faults.Fault("pwrite", times=0)
    assert faults.Fault("pwrite").once is True
    assert faults.Fault("pwrite", once=False).times is None
    assert faults.command_prefix()[1:] == ["-x", "-f", ""]
    if not faults.under_fiu_run():  # pytest itself does not run under fiu-run
        with pytest.raises(RuntimeError, match="fiu-run -x"):
            faults.Fault("pwrite").enable()


@pytest.mark.fault
def test_demo_when_walpatch_cannot_be_activated(tmp_path: Path) -> None:
    """wrapt unimportable in the application's interpreter: the demo says so (exit 2) rather
    than showing an unprotected run under the "with walpatch" heading."""
    if faults.available()[0] is False:
        pytest.skip(f"libfiu not available: {faults.available()[1]}")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "wrapt.py").write_text("raise ImportError('wrapt is broken on purpose')\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = demo("--dir", str(scratch),
                extra_env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(shim)])})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"walpatch demo: walpatch cannot be activated in "
                                  f"{sys.executable} (")
    assert "wrapt is broken on purpose" in proc.stderr
    assert proc.stdout == "" and os.listdir(scratch) == []
