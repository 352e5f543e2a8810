"""Zero-code activation, end to end, in real virtualenvs where walpatch was installed with pip.

Every route runs in a fresh interpreter (a subprocess) of a virtualenv, for both kinds of
install: a regular one (``pip install <copy of the checkout>``) and an editable one
(``pip install -e``). The venvs are built once per test session (under pytest's basetemp;
tests/test_dropins.py reuses them) from a copy of the checkout, so nothing is written into
the work tree. Children run in an empty directory, with no ``PYTHON*``/``WALPATCH*``
variables from the test run, so walpatch can only come from the venv's site-packages.

Routes: the ``WALPATCH`` variable (``walpatch.pth``), ``walpatch run`` and
``python -m walpatch run`` (bootstrap sitecustomize), and ``walpatch status``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ITEMS = ("walpatch", "setup.py", "setup.cfg", "pyproject.toml", "README.md")
KINDS = ("regular", "editable")
READY = ".walpatch-test-ready"

# ------------------------------------------------------------------------------------------
# venvs (built once per session; test_dropins.py imports these helpers)
# ------------------------------------------------------------------------------------------


def _check(cmd: Sequence[str], **kw: Any) -> str:
    proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                           f"{proc.stdout}")
    return proc.stdout


def venv_python(home: Path) -> Path:
    return home / "bin" / "python"


def venv_site_packages(python: Path) -> Path:
    out = _check([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    return Path(out.strip())


def venv_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "walpatch-venvs"
    base.mkdir(exist_ok=True)
    return base


def source_copy(base: Path) -> Path:
    """A copy of the checkout's installable files (pip builds in the source tree)."""
    src = base / "src"
    if not (src / READY).exists():
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        for item in SOURCE_ITEMS:
            path = ROOT / item
            if path.is_dir():
                shutil.copytree(path, src / item,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
            else:
                shutil.copy2(path, src / item)
        (src / READY).write_text("ok")
    return src


def wheelhouse(base: Path) -> Path:
    """Local wheels, fetched/built once per session: setuptools and wheel (the build
    backend), wrapt (for this interpreter) and walpatch itself (built from the copy). Later
    installs of this interpreter's venvs then need no network and no build, except the
    ones that are about building (``pip install <checkout>``, ``pip install -e``), which build
    with isolation from these local wheels."""
    wh = base / "wheelhouse"
    if not (wh / READY).exists():
        shutil.rmtree(wh, ignore_errors=True)
        wh.mkdir()
        pip = [sys.executable, "-m", "pip"]
        _check(pip + ["download", "-q", "--disable-pip-version-check", "-d", str(wh),
                      "setuptools>=64", "wheel", "wrapt"])
        _check(pip + ["wheel", "-q", "--disable-pip-version-check", "--no-deps", "--no-index",
                      "--find-links", str(wh), "-w", str(wh), str(source_copy(base))])
        (wh / READY).write_text("ok")
    return wh


def build_venv(base: Path, name: str, pip_args: Sequence[str] = (),
               base_python: Optional[str] = None, use_index: bool = False) -> Path:
    """venv ``base/name`` with ``pip install pip_args`` (once per session); its python.

    Venvs of this interpreter are made without pip and filled by this interpreter's pip
    (``--python``) from the local wheelhouse only (``use_index``: PyPI too); venvs of another
    interpreter get their own pip and may fetch what they need (wrapt for that version) from
    PyPI. Failures raise: nothing is skipped.
    """
    home = base / name
    python = venv_python(home)
    if (home / READY).exists():
        return python
    shutil.rmtree(home, ignore_errors=True)
    wh = wheelhouse(base)
    quiet = ["-q", "--disable-pip-version-check"]
    if base_python is None:
        _check([sys.executable, "-m", "venv", "--without-pip", str(home)])
        if pip_args:
            index = [] if use_index else ["--no-index"]
            _check([sys.executable, "-m", "pip", "--python", str(python), "install", *quiet,
                    *index, "--find-links", str(wh), *pip_args])
    else:
        _check([base_python, "-m", "venv", str(home)])
        if pip_args:
            # The wheelhouse's walpatch wheel is this interpreter's (it carries the compiled
            # walpatch._speedups): another interpreter builds walpatch from the source copy.
            args = [str(source_copy(base)) if a == "walpatch" else a for a in pip_args]
            _check([str(python), "-m", "pip", "install", *quiet, "--find-links", str(wh),
                    *args])
    (home / READY).write_text("ok")
    return python


def pip_in(python: Path, *args: str) -> str:
    """This interpreter's pip acting on the venv of ``python``."""
    return _check([sys.executable, "-m", "pip", "--python", str(python), *args])


def install_args(kind: str, src: Path) -> List[str]:
    """``pip install <checkout>`` (pip builds the wheel) or ``pip install -e <checkout>``."""
    return ["-e", str(src)] if kind == "editable" else [str(src)]


@pytest.fixture(scope="session")
def venv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return venv_base(tmp_path_factory)


@pytest.fixture(scope="session", params=KINDS)
def kind_python(request: pytest.FixtureRequest, venv_dir: Path) -> Dict[str, Any]:
    kind = request.param
    src = source_copy(venv_dir)
    python = build_venv(venv_dir, kind, install_args(kind, src))
    return {"kind": kind, "python": python, "bin": python.parent, "src": src}


@pytest.fixture(scope="session")
def bare_python(venv_dir: Path) -> Path:
    """A venv without walpatch (an 'unrelated interpreter')."""
    return build_venv(venv_dir, "bare")


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """An empty directory to run children in (the checkout must not be importable)."""
    d = tmp_path / "cwd"
    d.mkdir()
    return d


# ------------------------------------------------------------------------------------------
# children
# ------------------------------------------------------------------------------------------


def clean_env(**extra: Optional[str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "WALPATCH")) and k not in ("LD_PRELOAD",
                                                                      "VIRTUAL_ENV")}
    env["PYTHONIOENCODING"] = "utf-8"
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run(cmd: Sequence[Any], cwd: Path, env: Dict[str, str], timeout: float = 60
        ) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)


def last_json(proc: subprocess.CompletedProcess) -> Dict[str, Any]:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line; exit {proc.returncode}\nstdout:\n{proc.stdout}\n"
                         f"stderr:\n{proc.stderr}")


def walpatch_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if "walpatch" in line.lower()]


PROBE = r'''
import json, os, sys
NAMES = ("sqlite3", "wrapt", "walpatch", "walpatch._bootstrap", "walpatch.connection")
def loaded():
    return sorted(n for n in NAMES if n in sys.modules)
out = {
    "pid": os.getpid(),
    "before": loaded(),
    "finders": [type(f).__module__ for f in sys.meta_path],
    "usc_runs": getattr(sys, "walpatch_test_usc_runs", 0),
    "sitecustomize": getattr(sys.modules.get("sitecustomize"), "__file__", None),
    "bootstrap_dirs_on_sys_path": [p for p in sys.path if p.rstrip("/").endswith(
        os.path.join("walpatch", "_sitecustomize"))],
    "env": {k: os.environ.get(k) for k in ("WALPATCH", "PYTHONPATH")},
}
import sqlite3
out["after_import"] = loaded()
out["connect_type"] = type(sqlite3.connect).__name__
sqlite3.connect(":memory:").close()
out["after_connect"] = loaded()
if "walpatch" in sys.modules:
    import walpatch
    from walpatch import _bootstrap
    st = walpatch.status()
    out.update(installed=st["installed"], mode=st["mode"], hooked=st["hooked_modules"],
               activation=_bootstrap.info(), walpatch_file=walpatch.__file__)
if len(sys.argv) > 1:  # nested: run this probe again in a child interpreter
    import subprocess
    child = subprocess.run([sys.executable, __file__] + sys.argv[2:],
                           stdout=subprocess.PIPE, universal_newlines=True)
    out["child"] = json.loads(child.stdout.strip().splitlines()[-1])
print(json.dumps(out))
'''

LEGACY = r'''
"""An old release of the application: it still asks for a rollback journal."""
import json, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
out = {"refused": None, "returned": None}
try:
    out["returned"] = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
except sqlite3.OperationalError as exc:
    out["refused"] = {"type": type(exc).__name__, "message": str(exc)}
conn.execute("CREATE TABLE IF NOT EXISTS items(x)")
conn.execute("INSERT INTO items VALUES (1)")
conn.commit()
out["rows"] = conn.execute("SELECT count(*) FROM items").fetchone()[0]
out["mode_now"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
conn.close()
print(json.dumps(out))
'''

MAKE_WAL = r'''
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
conn.execute("CREATE TABLE items(x)")
conn.commit()
conn.close()
'''

USER_SITECUSTOMIZE = r'''
import sys
sys.walpatch_test_usc_runs = getattr(sys, "walpatch_test_usc_runs", 0) + 1
'''


def header(path: Path) -> Optional[tuple]:
    """Bytes 18/19 of a database file. The test process holds no connection to it."""
    data = path.read_bytes()[:100]
    return (data[18], data[19]) if len(data) == 100 else None


@pytest.fixture()
def scripts(workdir: Path) -> Dict[str, Path]:
    out = {}
    for name, text in (("probe.py", PROBE), ("legacy.py", LEGACY), ("make_wal.py", MAKE_WAL)):
        (workdir / name).write_text(text)
        out[name] = workdir / name
    usc = workdir / "usc"
    usc.mkdir()
    (usc / "sitecustomize.py").write_text(USER_SITECUSTOMIZE)
    out["usc"] = usc
    return out


def wal_db(python: Path, workdir: Path, scripts: Dict[str, Path], name: str = "app.db"
           ) -> Path:
    db = workdir / name
    proc = run([python, scripts["make_wal.py"], db], workdir, clean_env())
    assert proc.returncode == 0, proc.stderr
    assert header(db) == (2, 2)
    return db


# ------------------------------------------------------------------------------------------
# the .pth file
# ------------------------------------------------------------------------------------------


def _checkout_pth_line() -> str:
    import runpy

    return runpy.run_path(str(ROOT / "walpatch" / "_bootstrap.py"))["PTH_LINE"]


def test_pth_file_installed_and_recorded(kind_python: Dict[str, Any]) -> None:
    site = venv_site_packages(kind_python["python"])
    pth = site / "walpatch.pth"
    assert pth.read_text() == _checkout_pth_line()
    assert pth.read_text().startswith("import ") and pth.read_text().count("\n") == 1
    records = list(site.glob("walpatch-*.dist-info/RECORD"))
    assert len(records) == 1
    assert any(line.split(",")[0] == "walpatch.pth"
               for line in records[0].read_text().splitlines()), \
        "walpatch.pth is not in RECORD: pip uninstall would leave it behind"


def test_bootstrap_words_match_config() -> None:
    from walpatch import _bootstrap, config, hooks

    assert set(_bootstrap.DISABLE_WORDS) == set(config.DISABLE_WORDS)
    assert set(_bootstrap.WATCHED) == set(hooks.FAMILIES)


# ------------------------------------------------------------------------------------------
# WALPATCH unset or off: nothing happens
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "0", "off", "false", " OFF ", "no"])
def test_unset_or_off_does_nothing(kind_python: Dict[str, Any], workdir: Path,
                                   scripts: Dict[str, Path], value: Optional[str]) -> None:
    proc = run([kind_python["python"], scripts["probe.py"]], workdir,
               clean_env(WALPATCH=value))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = last_json(proc)
    assert out["before"] == []  # no sqlite3, wrapt or walpatch module at start
    assert "walpatch._bootstrap" not in out["finders"]
    assert out["after_import"] == ["sqlite3"]  # importing sqlite3 brings nothing of ours
    assert out["after_connect"] == ["sqlite3"]
    assert out["connect_type"] == "builtin_function_or_method"


# ------------------------------------------------------------------------------------------
# WALPATCH set: lazy, then active
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,mode", [("1", "enforce"), ("on", "enforce"),
                                        ("true", "enforce"), ("ENFORCE", "enforce"),
                                        ("yes", "enforce"), ("observe", "observe")])
def test_set_is_lazy_then_active(kind_python: Dict[str, Any], workdir: Path,
                                 scripts: Dict[str, Path], value: str, mode: str) -> None:
    proc = run([kind_python["python"], scripts["probe.py"]], workdir, clean_env(WALPATCH=value))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = last_json(proc)
    # At start: only the small bootstrap module, and its finder first on sys.meta_path.
    assert out["before"] == ["walpatch._bootstrap"]
    assert out["finders"][0] == "walpatch._bootstrap"
    # Importing sqlite3 installs walpatch; the guard itself loads at the first connect().
    assert out["after_import"] == ["sqlite3", "walpatch", "walpatch._bootstrap", "wrapt"]
    assert "walpatch.connection" in out["after_connect"]
    assert out["connect_type"] == "FunctionWrapper"
    assert out["installed"] is True and out["mode"] == mode
    assert out["hooked"] == ["sqlite3", "sqlite3.dbapi2"]
    assert out["activation"]["activated_by"] == ["pth"]
    assert out["activation"]["installed_on_import_of"] == "sqlite3"
    src = kind_python["src"] if kind_python["kind"] == "editable" else \
        venv_site_packages(kind_python["python"])
    assert Path(out["walpatch_file"]).resolve() == (src / "walpatch" / "__init__.py").resolve()


def test_legacy_downgrade_refused_via_env(kind_python: Dict[str, Any], workdir: Path,
                                          scripts: Dict[str, Path]) -> None:
    py = kind_python["python"]
    # Control: without walpatch the old release flips the WAL file to a rollback journal.
    control = wal_db(py, workdir, scripts, "control.db")
    proc = run([py, scripts["legacy.py"], control], workdir, clean_env())
    out = last_json(proc)
    assert out["refused"] is None and out["returned"] == "delete"
    assert header(control) == (1, 1)

    db = wal_db(py, workdir, scripts)
    proc = run([py, scripts["legacy.py"], db], workdir, clean_env(WALPATCH="1"))
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc)
    assert out["refused"] is not None, out
    assert out["refused"]["type"] == "WalDowngradeRefused"
    assert "walpatch refused PRAGMA main.journal_mode=DELETE" in out["refused"]["message"]
    assert out["rows"] == 1 and out["mode_now"] == "wal"
    assert header(db) == (2, 2)


@pytest.mark.fault
def test_transient_fault_no_downgrade_via_env(libfiu: Any, kind_python: Dict[str, Any],
                                              workdir: Path) -> None:
    """The real scenario, switched on by the environment only: tests/legacy_app.py (which
    never imports walpatch) asks for WAL on a fresh file while one pwrite fails with EIO
    (libfiu); unprotected it falls back to DELETE, with WALPATCH=1 the guard retries."""
    py = kind_python["python"]
    cmd = [libfiu.fiu_run_command(), "-x", "-f", "", py, ROOT / "tests" / "legacy_app.py"]
    fault = ["--fault", "pwrite", "--times", "1"]
    control, db = workdir / "control.db", workdir / "app.db"
    proc = run(cmd + [control] + fault, workdir, clean_env())
    out = last_json(proc)
    assert out["fault"]["fired"] == 1 and out["fallback_ran"] is True
    assert out["caught"]["message"] == "disk I/O error"
    assert header(control) == (1, 1)

    proc = run(cmd + [db] + fault, workdir, clean_env(WALPATCH="1"))
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc)
    assert out["fault"]["fired"] == 1
    assert out["caught"] is None and out["fallback_ran"] is False
    assert out["wal_returned"] == "wal" and out["final_mode"] == "wal" and out["rows"] == 3
    assert header(db) == (2, 2)
    assert "succeeded after 2 attempts" in proc.stderr


def test_observe_mode_logs_and_changes_nothing(kind_python: Dict[str, Any], workdir: Path,
                                               scripts: Dict[str, Path]) -> None:
    py = kind_python["python"]
    db = wal_db(py, workdir, scripts)
    proc = run([py, scripts["legacy.py"], db], workdir, clean_env(WALPATCH="observe"))
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc)
    assert out["refused"] is None and out["returned"] == "delete"
    assert header(db) == (1, 1)
    assert "would refuse journal_mode=delete" in proc.stderr


@pytest.mark.parametrize("variable,value,accepted", [
    ("WALPATCH_RETRY_ATTEMPTS", "lots", "a whole number"),
    ("WALPATCH_LOG_LEVEL", "LOUD", "one of DEBUG"),
    ("WALPATCH", "bogus", "one of enforce, observe"),
])
def test_invalid_setting_one_warning_still_protected(
        kind_python: Dict[str, Any], workdir: Path, scripts: Dict[str, Path],
        variable: str, value: str, accepted: str) -> None:
    py = kind_python["python"]
    db = wal_db(py, workdir, scripts)
    env = clean_env(WALPATCH="1")
    env[variable] = value
    proc = run([py, scripts["legacy.py"], db], workdir, env)
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc)
    assert out["refused"] and out["refused"]["type"] == "WalDowngradeRefused"
    assert header(db) == (2, 2)
    warnings = [line for line in proc.stderr.splitlines() if f"{variable}=" in line]
    assert len(warnings) == 1, proc.stderr
    assert repr(value) in warnings[0] and accepted in warnings[0]
    assert "protection stays on" in warnings[0]
    # ... and nothing else about settings: one warning, one line.
    assert len([ln for ln in proc.stderr.splitlines() if "ignoring" in ln]) == 1


def test_status_command(kind_python: Dict[str, Any], workdir: Path) -> None:
    walpatch_cmd = kind_python["bin"] / "walpatch"
    proc = run([walpatch_cmd, "status"], workdir, clean_env())
    assert proc.returncode == 0, proc.stderr
    assert "is not active in this interpreter (WALPATCH is unset)" in proc.stdout
    assert "walpatch.pth: " + str(venv_site_packages(kind_python["python"])) in proc.stdout

    env = clean_env(WALPATCH="observe", WALPATCH_RETRY_ATTEMPTS="9")
    proc = run([kind_python["python"], "-m", "walpatch", "status"], workdir, env)
    assert proc.returncode == 0, proc.stderr
    assert "is armed by walpatch.pth (WALPATCH='observe'), mode: observe" in proc.stdout
    assert "retry_attempts = 9  (WALPATCH_RETRY_ATTEMPTS)" in proc.stdout

    proc = run([walpatch_cmd, "status", "--json"], workdir,
               clean_env(WALPATCH="1", WALPATCH_RETRY_ATTEMPTS="0"))
    info = json.loads(proc.stdout)
    assert info["activation"]["armed"] is True
    assert info["activation"]["activated_by"] == ["pth"]
    assert info["environment_settings"]["retry_attempts"] == 5
    assert len(info["setting_warnings"]) == 1
    assert "WALPATCH_RETRY_ATTEMPTS='0'" in info["setting_warnings"][0]

    # In a process that imported sqlite3: installed, with the hooked modules.
    code = ("import json, sqlite3; from walpatch.cli.status import collect; "
            "print(json.dumps(collect(), default=str))")
    proc = run([kind_python["python"], "-c", code], workdir, clean_env(WALPATCH="1"))
    info = last_json(proc)
    assert info["installed"] is True and info["mode"] == "enforce"
    assert info["hooked_modules"] == ["sqlite3", "sqlite3.dbapi2"]
    assert info["activation"]["installed_on_import_of"] == "sqlite3"


# ------------------------------------------------------------------------------------------
# walpatch run
# ------------------------------------------------------------------------------------------


def test_run_user_sitecustomize_once_and_nested(kind_python: Dict[str, Any], workdir: Path,
                                                scripts: Dict[str, Path]) -> None:
    py = kind_python["python"]
    env = clean_env(PYTHONPATH=str(scripts["usc"]))
    # probe.py nests twice: the command, its child, its grandchild.
    proc = run([kind_python["bin"] / "walpatch", "run", "--", py, scripts["probe.py"],
                "nest", "nest"], workdir, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    levels = []
    out: Optional[Dict[str, Any]] = last_json(proc)
    while out is not None:
        levels.append(out)
        out = out.get("child")
    assert len(levels) == 3
    for level in levels:
        assert level["usc_runs"] == 1, level  # the user's sitecustomize, exactly once
        assert level["sitecustomize"] == str(scripts["usc"] / "sitecustomize.py")
        assert level["bootstrap_dirs_on_sys_path"] == []  # taken out again
        assert level["env"]["WALPATCH"] == "enforce"
        assert level["env"]["PYTHONPATH"].split(os.pathsep)[1:] == [str(scripts["usc"])]
        assert level["before"] == ["walpatch._bootstrap"]  # lazy in every interpreter
        assert level["installed"] is True and level["mode"] == "enforce"
        # The .pth armed it first; the bootstrap sitecustomize found it armed (no second set-up).
        assert level["activation"]["activated_by"] == ["pth", "walpatch run"]
        assert level["finders"].count("walpatch._bootstrap") == 1  # armed once, not twice
    assert levels[0]["pid"] != levels[1]["pid"] != levels[2]["pid"]


def test_run_nested_run_adds_bootstrap_once(kind_python: Dict[str, Any], workdir: Path,
                                            scripts: Dict[str, Path]) -> None:
    wp = kind_python["bin"] / "walpatch"
    env = clean_env(PYTHONPATH=str(scripts["usc"]))
    proc = run([wp, "run", "--observe", wp, "run", kind_python["python"], scripts["probe.py"]],
               workdir, env)
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc)
    entries = out["env"]["PYTHONPATH"].split(os.pathsep)
    assert len(entries) == 2 and entries[1] == str(scripts["usc"])
    assert entries[0].endswith(os.path.join("walpatch", "_sitecustomize"))
    assert out["usc_runs"] == 1
    assert out["env"]["WALPATCH"] == "observe"  # the inner run keeps the outer's mode
    assert out["mode"] == "observe"


def test_run_legacy_refused_and_python_m(kind_python: Dict[str, Any], workdir: Path,
                                         scripts: Dict[str, Path]) -> None:
    py = kind_python["python"]
    db = wal_db(py, workdir, scripts)
    proc = run([py, "-m", "walpatch", "run", py, scripts["legacy.py"], db], workdir,
               clean_env())
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc)
    assert out["refused"] and out["refused"]["type"] == "WalDowngradeRefused"
    assert header(db) == (2, 2)

    proc = run([kind_python["bin"] / "walpatch", "run", "--observe", "--", py,
                scripts["legacy.py"], db], workdir, clean_env())
    out = last_json(proc)
    assert out["refused"] is None and header(db) == (1, 1)
    assert "would refuse" in proc.stderr


def test_run_exit_codes(kind_python: Dict[str, Any], workdir: Path) -> None:
    py = kind_python["python"]
    wp = kind_python["bin"] / "walpatch"
    env = clean_env()
    assert run([wp, "run", "--", py, "-c", "raise SystemExit(7)"], workdir, env
               ).returncode == 7
    assert run([py, "-m", "walpatch", "run", py, "-c", "import sys; sys.exit(3)"], workdir,
               env).returncode == 3
    assert run([wp, "run", "false"], workdir, env).returncode == 1
    proc = run([wp, "run", "--", "no-such-command-walpatch"], workdir, env)
    assert proc.returncode == 127
    assert proc.stderr.strip() == "walpatch run: command not found: no-such-command-walpatch"
    proc = run([wp, "run", "./missing/prog"], workdir, env)
    assert proc.returncode == 127 and "command not found" in proc.stderr
    not_exec = workdir / "data.txt"
    not_exec.write_text("x")
    proc = run([wp, "run", str(not_exec)], workdir, env)
    assert proc.returncode == 126 and "cannot execute" in proc.stderr
    proc = run([wp, "run"], workdir, env)
    assert proc.returncode == 2 and "no command given" in proc.stderr
    # A child killed by a signal: the status is the signal's, as if run directly.
    proc = run([wp, "run", py, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
               workdir, env)
    assert proc.returncode == -signal.SIGKILL


def test_run_execs_and_signals_reach_the_command(kind_python: Dict[str, Any],
                                                 workdir: Path) -> None:
    code = (
        "import os, signal, sys, time\n"
        "def on_term(signum, frame):\n"
        "    print('got', signum, flush=True)\n"
        "    sys.exit(42)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "print('ready', os.getpid(), os.environ['WALPATCH'], flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([str(kind_python["bin"] / "walpatch"), "run", "--",
                             str(kind_python["python"]), "-c", code],
                            cwd=str(workdir), env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        assert int(ready[1]) == proc.pid  # exec: the command *is* the launched process
        assert ready[2] == "enforce"
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 42, err
    assert rest.strip() == f"got {int(signal.SIGTERM)}"


def test_run_unrelated_interpreter_left_alone(kind_python: Dict[str, Any], bare_python: Path,
                                              workdir: Path, scripts: Dict[str, Path]) -> None:
    """An interpreter without walpatch (another venv): one line on stderr, nothing of the
    launcher's environment imported, the user's sitecustomize still runs once."""
    env = clean_env(PYTHONPATH=str(scripts["usc"]))
    proc = run([kind_python["bin"] / "walpatch", "run", bare_python, scripts["probe.py"]],
               workdir, env)
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc)
    assert out["before"] == [] and out["after_connect"] == ["sqlite3"]
    assert out["connect_type"] == "builtin_function_or_method"
    assert out["usc_runs"] == 1
    assert out["bootstrap_dirs_on_sys_path"] == []
    lines = walpatch_lines(proc.stderr)
    assert len(lines) == 1 and "not installed for this interpreter" in lines[0], proc.stderr
    assert proc.stderr.count("\n") == 1


def test_run_without_pth_sitecustomize_alone(venv_dir: Path, bare_python: Path,
                                             workdir: Path, scripts: Dict[str, Path]) -> None:
    """walpatch importable only through PYTHONPATH (``pip install --target``), so no .pth is
    processed (as on Python 3.18+ where .pth import lines are ignored): the bootstrap
    sitecustomize of ``walpatch run`` activates it on its own."""
    target = venv_dir / "target"
    if not (target / READY).exists():
        shutil.rmtree(target, ignore_errors=True)
        _check([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                "--no-index", "--find-links", str(wheelhouse(venv_dir)), "--target",
                str(target), "walpatch"])
        (target / READY).write_text("ok")
    assert (target / "walpatch.pth").exists()  # there, but not in a site directory
    db = wal_db(bare_python, workdir, scripts)
    env = clean_env(PYTHONPATH=os.pathsep.join([str(target), str(scripts["usc"])]))
    # Without walpatch run: WALPATCH alone does nothing here (no .pth processed)...
    env_only = dict(env, WALPATCH="1")
    out = last_json(run([bare_python, scripts["probe.py"]], workdir, env_only))
    assert out["before"] == [] and out["connect_type"] == "builtin_function_or_method"
    # ... while walpatch run activates it through its sitecustomize.
    launcher = [bare_python, "-m", "walpatch", "run"]
    proc = run(launcher + [bare_python, scripts["probe.py"], "nest"], workdir, env)
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc)
    for level in (out, out["child"]):
        assert level["activation"]["activated_by"] == ["walpatch run"]
        assert level["installed"] is True and level["usc_runs"] == 1
        assert level["before"] == ["walpatch._bootstrap"]
    proc = run(launcher + [bare_python, scripts["legacy.py"], db], workdir, env)
    assert last_json(proc)["refused"]["type"] == "WalDowngradeRefused"
    assert header(db) == (2, 2)


def test_user_sitecustomize_error_reported_as_without_walpatch(
        kind_python: Dict[str, Any], workdir: Path, scripts: Dict[str, Path]) -> None:
    (scripts["usc"] / "sitecustomize.py").write_text("raise RuntimeError('user boom')\n")
    env = clean_env(PYTHONPATH=str(scripts["usc"]))
    py = kind_python["python"]
    plain = run([py, "-c", "print('app ran')"], workdir, env)
    wrapped = run([kind_python["bin"] / "walpatch", "run", py, "-c", "print('app ran')"],
                  workdir, env)
    assert plain.stdout == wrapped.stdout == "app ran\n"
    assert "Error in sitecustomize" in plain.stderr and "user boom" in plain.stderr
    assert "user boom" in wrapped.stderr
    assert wrapped.returncode == plain.returncode == 0


# ------------------------------------------------------------------------------------------
# sitecustomize_example.py
# ------------------------------------------------------------------------------------------


def test_sitecustomize_example(kind_python: Dict[str, Any], bare_python: Path,
                               workdir: Path, scripts: Dict[str, Path]) -> None:
    site_dir = workdir / "site"
    site_dir.mkdir()
    shutil.copy2(ROOT / "sitecustomize_example.py", site_dir / "sitecustomize.py")
    py = kind_python["python"]
    db = wal_db(py, workdir, scripts)
    # WALPATCH unset: on (enforce), through the sitecustomize, not through the .pth.
    env = clean_env(PYTHONPATH=str(site_dir))
    proc = run([py, scripts["legacy.py"], db], workdir, env)
    assert proc.returncode == 0, proc.stderr
    # On an SQLite with the WAL-reset bug (issue 11) the connect to the WAL file warns first.
    lines = [ln for ln in proc.stderr.splitlines() if "has the WAL-reset bug" not in ln]
    assert lines[0].startswith("walpatch: refused journal_mode=delete on "), proc.stderr
    assert last_json(proc)["refused"]["type"] == "WalDowngradeRefused"
    assert header(db) == (2, 2)
    out = last_json(run([py, scripts["probe.py"]], workdir, env))
    assert "wrapt" not in out["before"] and "sqlite3" not in out["before"]
    assert out["installed"] is True and out["activation"]["activated_by"] == []
    # WALPATCH=0 switches it off.
    proc = run([py, scripts["legacy.py"], db], workdir, dict(env, WALPATCH="0"))
    assert last_json(proc)["returned"] == "delete" and header(db) == (1, 1)
    # An interpreter without walpatch: one line, and the application runs.
    proc = run([bare_python, "-c", "print('app ran')"], workdir, env)
    assert proc.returncode == 0 and proc.stdout == "app ran\n"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("walpatch: not active"), proc.stderr


# ------------------------------------------------------------------------------------------
# uninstall, and a .pth left behind without its package
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_uninstall_leaves_python_clean(venv_dir: Path, workdir: Path,
                                       scripts: Dict[str, Path], kind: str) -> None:
    src = source_copy(venv_dir)
    py = build_venv(venv_dir, f"uninstall-{kind}",
                    ["-e", str(src)] if kind == "editable" else ["walpatch"])
    site = venv_site_packages(py)
    assert (site / "walpatch.pth").exists()
    pip_in(py, "uninstall", "-y", "-q", "walpatch")
    assert not (site / "walpatch.pth").exists()
    assert not list(site.glob("walpatch*")) and not list(site.glob("__editable__*walpatch*"))
    for value in (None, "1", "observe"):
        proc = run([py, scripts["probe.py"]], workdir, clean_env(WALPATCH=value))
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        out = last_json(proc)
        assert out["before"] == [] and out["connect_type"] == "builtin_function_or_method"

    # A walpatch.pth left behind without its package (a broken uninstall, a copied
    # site-packages): unset costs nothing and says nothing; set gives one line and the
    # application runs on.
    (site / "walpatch.pth").write_text(_checkout_pth_line())
    proc = run([py, scripts["probe.py"]], workdir, clean_env())
    assert proc.returncode == 0 and proc.stderr == ""
    proc = run([py, scripts["probe.py"]], workdir, clean_env(WALPATCH="1"))
    assert proc.returncode == 0
    assert last_json(proc)["connect_type"] == "builtin_function_or_method"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("walpatch: WALPATCH is set but walpatch "
                                                   "could not be activated"), proc.stderr
    (site / "walpatch.pth").unlink()


# ------------------------------------------------------------------------------------------
# the oldest and newest supported interpreters (when this machine has them)
# ------------------------------------------------------------------------------------------

#: the oldest, the newest, and the free-threaded build (any patch release:
#: test_cpython_suite.find_interpreter picks the newest under ~/.pyenv/versions)
OTHER_PYTHONS = ["3.8", "3.13", "3.15", "3.13t"]


@pytest.mark.parametrize("version", OTHER_PYTHONS)
def test_other_interpreters(version: str, venv_dir: Path, workdir: Path,
                            scripts: Dict[str, Path]) -> None:
    from .test_cpython_suite import find_interpreter

    found = find_interpreter(version)
    base = Path(found) if found else Path.home() / ".pyenv" / "versions" / (version + ".*")
    if not base.exists():
        msg = f"CPython {version} is NOT installed at {base}: activation was NOT checked on it"
        print(msg, file=sys.stderr)
        if os.environ.get("WALPATCH_REQUIRE_ALL_PYTHONS", "").strip().lower() in (
                "1", "true", "yes", "on"):
            pytest.fail(msg + " (WALPATCH_REQUIRE_ALL_PYTHONS=1)", pytrace=False)
        pytest.skip(msg)
    py = build_venv(venv_dir, f"py{version}", ["walpatch"], base_python=str(base))
    out = last_json(run([py, scripts["probe.py"]], workdir, clean_env()))
    assert out["before"] == [] and out["after_connect"] == ["sqlite3"]
    proc = run([py, scripts["probe.py"]], workdir, clean_env(WALPATCH="1"))
    assert proc.stderr == ""
    out = last_json(proc)
    assert out["before"] == ["walpatch._bootstrap"]
    assert out["installed"] is True and out["connect_type"] == "FunctionWrapper"
    db = wal_db(py, workdir, scripts)
    env = clean_env(PYTHONPATH=str(scripts["usc"]))
    proc = run([py, "-m", "walpatch", "run", py, scripts["legacy.py"], db], workdir, env)
    assert last_json(proc)["refused"]["type"] == "WalDowngradeRefused", proc.stderr
    assert header(db) == (2, 2)
