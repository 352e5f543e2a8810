"""CPython's own sqlite3 test suite passes the same with walpatch installed as without it.

For every CPython 3.8-3.15 (and the free-threaded 3.13t) in ~/.pyenv/versions, run
``tests/cpython_suite_runner.py`` in a subprocess twice (plain, then with
``walpatch.install()`` first) and compare the counts and the ids of the failing tests. The
interpreters other than the one running pytest have no wrapt, so each gets a venv with wrapt
in a cache dir (~/.cache/walpatch-test-venvs, reused across runs; built atomically so parallel
runs cannot see a half-made one).

The differences the suite finds are inherent to instrumenting sqlite3 from Python (design.md §1,
docs/transparency.md): walpatch hands out a *subclass* of ``sqlite3.Connection`` so that
``conn.execute`` can be guarded (the C type cannot be patched), so
``type(cx) == sqlite3.Connection`` is False. With the pure-Python hot path
(WALPATCH_DISABLE_EXTENSIONS=1, or no compiler at install), a warning raised inside sqlite3's
C code also names the innermost Python frame (ours); the C hot path (walpatch._speedups, built
here in place for each interpreter by tests/speedups_build.py) has no such frame.
Each is listed below by test id *and* asserted to fail with exactly that message;
any other difference, or a listed one that stops happening, fails this test.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Dict, List, Optional, Tuple

import pytest

from .speedups_build import build_inplace

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)  # the repo root: holds the walpatch package
RUNNER = os.path.join(HERE, "cpython_suite_runner.py")
PYENV = os.path.expanduser("~/.pyenv/versions")
VENV_CACHE = os.environ.get(
    "WALPATCH_TEST_VENVS", os.path.expanduser("~/.cache/walpatch-test-venvs"))
#: "3.13t": the free-threaded (--disable-gil) 3.13 build, ~/.pyenv/versions/3.13.Zt
#: (scripts/provision-pythons.sh provisions 3.14, 3.15 and 3.13t).
VERSIONS = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14", "3.15", "3.13t"]


def free_threaded() -> bool:
    """This interpreter is a free-threaded (--disable-gil) build."""
    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


#: this interpreter's label in VERSIONS ("3.13t" for the free-threaded build)
CURRENT = "%d.%d" % sys.version_info[:2] + ("t" if free_threaded() else "")


def version_tuple(version: str) -> Tuple[int, int]:
    """'3.13t' -> (3, 13)."""
    major, minor = version.rstrip("t").split(".")
    return int(major), int(minor)

#: (test id prefix, text that must be in its failure, why): the differences the suite finds,
#: all inherent to instrumenting sqlite3 from Python (docs/transparency.md, "Limits").
_TYPE_IDENTITY = (
    "test.test_sqlite3.test_dbapi.OpenTests.test_database_keyword",
    "self.assertEqual(type(cx), sqlite.Connection)",
    "connect() returns a guarded subclass of sqlite3.Connection, so type(cx) is not the base")


def _warning_location(test_id: str, module: str) -> tuple:
    return (test_id, os.path.join("walpatch", module) + "' != ",
            "a warning raised inside sqlite3's C code with stacklevel=1 (or by an adapter with "
            f"stacklevel=2) is attributed to the innermost Python frame: walpatch/{module}")


_WARNINGS_312 = [
    # 3.12 deprecated named placeholders with a sequence of parameters, and the default
    # date/datetime adapters; both warnings are raised while Cursor.execute runs.
    _warning_location("test.test_sqlite3.test_dbapi.CursorTests.test_execute_named_param_and_"
                      "sequence", "connection.py"),
    _warning_location("test.test_sqlite3.test_types.DateTimeTests.test_sqlite_date",
                      "connection.py"),
    _warning_location("test.test_sqlite3.test_types.DateTimeTests.test_sqlite_timestamp",
                      "connection.py"),
]
KNOWN_DIFFERENCES: Dict[str, List[Tuple[str, str, str]]] = {
    "3.11": [_TYPE_IDENTITY],
    # With walpatch._speedups (the default where it is built) the warnings of 3.12+ name the
    # caller's line, as without walpatch: only type identity differs.
    "3.12": [_TYPE_IDENTITY],
    # 3.13's deprecation of positional connect() arguments is re-issued by hooks.py on the
    # caller's line, so test_connect_positional_arguments passes with walpatch too.
    "3.13": [_TYPE_IDENTITY],
    "3.13t": [_TYPE_IDENTITY],
}
#: added to the above when the run uses the pure-Python hot path (WALPATCH_DISABLE_EXTENSIONS)
PURE_PYTHON_DIFFERENCES: Dict[str, List[Tuple[str, str, str]]] = {
    "3.12": _WARNINGS_312,
    "3.13": _WARNINGS_312,
    "3.13t": _WARNINGS_312,
}
# --- 3.14 and 3.15 (pythons branch, issue 13) ------------------------------------------------
# 3.14 raises ProgrammingError for named placeholders with a sequence (no warning left to
# misattribute); the date/timestamp adapter warnings remain. 3.15: positional connect()
# arguments raise the interpreter's own TypeError with walpatch too (hooks.py), so
# test_connect_positional_arguments passes.
_WARNINGS_314 = [w for w in _WARNINGS_312 if "named_param" not in w[0]]
KNOWN_DIFFERENCES["3.14"] = [_TYPE_IDENTITY]
KNOWN_DIFFERENCES["3.15"] = [_TYPE_IDENTITY]
PURE_PYTHON_DIFFERENCES["3.14"] = _WARNINGS_314
PURE_PYTHON_DIFFERENCES["3.15"] = _WARNINGS_314


def find_interpreter(version: str) -> Optional[str]:
    """Newest ~/.pyenv/versions/X.Y.Z/bin/python for ``version`` ('3.8'), or None.

    In a nox matrix cell (WALPATCH_MATRIX=1) the cell's own interpreter is used for its
    version, so that CPython's suite runs against the cell's wrapt.
    """
    if os.environ.get("WALPATCH_MATRIX") == "1" and version == CURRENT:
        return sys.executable
    suffix = "t" if version.endswith("t") else ""  # 3.13t: ~/.pyenv/versions/3.13.Zt
    found = []
    for path in glob.glob(os.path.join(PYENV, version.rstrip("t") + ".*", "bin", "python")):
        patch = os.path.basename(os.path.dirname(os.path.dirname(path))).split(".")[2]
        if patch.endswith(suffix) and patch[:len(patch) - len(suffix)].isdigit():
            found.append((int(patch[:len(patch) - len(suffix)]), path))
    if not found and version == CURRENT:
        return sys.executable
    return max(found)[1] if found else None


def _wrapt_spec(version: str) -> str:
    # setup.cfg: wrapt 2.1 dropped 3.8; 2.2.0 had a descriptor regression.
    return "wrapt>=1.14,!=2.2.0,<2.1" if version == "3.8" else "wrapt>=1.14,!=2.2.0"


def _can_import_wrapt(python: str) -> bool:
    return subprocess.run(
        [python, "-c", "import wrapt"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ).returncode == 0


def python_with_wrapt(version: str, base: str) -> str:
    """An interpreter of ``version`` that can import wrapt: ``base`` itself when it already
    can, else a cached venv made from it with wrapt pip-installed."""
    if _can_import_wrapt(base):
        return base
    real = os.path.realpath(base)
    tag = os.path.basename(os.path.dirname(os.path.dirname(real)))  # e.g. 3.8.18
    venv = os.path.join(VENV_CACHE, tag)
    python = os.path.join(venv, "bin", "python")
    if os.path.exists(os.path.join(venv, ".ready")) and _can_import_wrapt(python):
        return python
    os.makedirs(VENV_CACHE, exist_ok=True)
    building = tempfile.mkdtemp(prefix=tag + ".building-", dir=VENV_CACHE)
    try:
        subprocess.run([base, "-m", "venv", building], check=True, capture_output=True)
        pip = subprocess.run(
            [os.path.join(building, "bin", "python"), "-m", "pip", "install", "-q",
             "--disable-pip-version-check", "--no-input", _wrapt_spec(version)],
            capture_output=True, text=True, timeout=300)
        assert pip.returncode == 0, f"pip install wrapt for {tag} failed:\n{pip.stderr[-2000:]}"
        with open(os.path.join(building, ".ready"), "w") as f:
            f.write(_wrapt_spec(version) + "\n")
        shutil.rmtree(venv, ignore_errors=True)
        try:
            os.rename(building, venv)
        except OSError:  # another run made it first: use theirs
            pass
    finally:
        shutil.rmtree(building, ignore_errors=True)
    # A venv's scripts hard-code its path, and we renamed it: call the interpreter with -m only.
    assert _can_import_wrapt(python), f"venv {venv} cannot import wrapt"
    return python


@pytest.fixture(scope="session")
def interpreters() -> Dict[str, Optional[str]]:
    return {v: find_interpreter(v) for v in VERSIONS}


def skip_missing_interpreter(version: str, what: str) -> None:
    """Skip, loudly, when CPython ``version`` is truly absent; with
    WALPATCH_REQUIRE_ALL_PYTHONS=1 (for CI) fail instead, so that a machine without it
    cannot report green."""
    msg = (f"CPython {version} is NOT installed under {PYENV}: {what} was NOT checked on it "
           "(this is not a pass)")
    print(msg, file=sys.stderr)
    if os.environ.get("WALPATCH_REQUIRE_ALL_PYTHONS", "").strip().lower() in (
            "1", "true", "yes", "on"):
        pytest.fail(msg + "; WALPATCH_REQUIRE_ALL_PYTHONS=1", pytrace=False)
    pytest.skip(msg)


def run_suite(python: str, with_walpatch: bool) -> dict:
    env = dict(os.environ)
    env.pop("WALPATCH", None)  # the .pth bootstrap must not install it in the plain run
    env["PYTHONPATH"] = CHECKOUT
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    args = [python, RUNNER] + (["--walpatch"] if with_walpatch else [])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=HERE)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, (
        f"{args} exited {proc.returncode}\nstdout:{proc.stdout[-3000:]}\n"
        f"stderr:{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("version", VERSIONS)
def test_cpython_sqlite3_suite_same_with_walpatch(version: str, interpreters: dict) -> None:
    base = interpreters[version]
    if base is None:
        skip_missing_interpreter(version, "its sqlite3 test suite with walpatch")
    python = python_with_wrapt(version, base)
    pure_python = os.environ.get("WALPATCH_DISABLE_EXTENSIONS", "").strip().lower() not in (
        "", "0", "false", "no", "off")
    if not pure_python:
        build_inplace(python)  # walpatch._speedups for this interpreter, next to the sources

    plain = run_suite(python, with_walpatch=False)
    guarded = run_suite(python, with_walpatch=True)
    summary = {k: (plain.get(k), guarded.get(k)) for k in ("python", "run", "failures", "errors",
                                                           "skipped", "expected_failures")}
    print(f"CPython {version} sqlite3 suite (without, with walpatch): {summary}")

    assert plain["python"].startswith(version.rstrip("t") + ".")
    assert not plain["walpatch"] and guarded["walpatch"]
    # walpatch really was active in the guarded run: connect wrapped, connections guarded.
    assert guarded["walpatch_installed"] is True
    assert guarded["connect_is_wrapped"] is True
    assert os.path.dirname(os.path.dirname(guarded["walpatch_file"])) == CHECKOUT
    assert guarded["walpatch_stats"]["connections"] > 100
    assert guarded["speedups"] == ("python" if pure_python else "c")
    # The suite really ran.
    assert plain["run"] > 250, plain

    assert guarded["run"] == plain["run"]
    assert guarded["skipped_ids"] == plain["skipped_ids"]
    assert guarded["expected_failures"] == plain["expected_failures"]
    assert guarded["unexpected_successes"] == plain["unexpected_successes"]

    known = KNOWN_DIFFERENCES.get(version, []) + (
        PURE_PYTHON_DIFFERENCES.get(version, []) if pure_python else [])
    new_problems = sorted(set(guarded["problems"]) - set(plain["problems"]))
    gone = sorted(set(plain["problems"]) - set(guarded["problems"]))
    assert gone == [], f"tests that fail only WITHOUT walpatch: {gone}"

    def explained(test_id: str) -> bool:
        return any(test_id.startswith(prefix) and text in guarded["details"][test_id]
                   for prefix, text, _ in known)

    unexplained = [t for t in new_problems if not explained(t)]
    assert unexplained == [], (
        "new failures with walpatch:\n" + "\n".join(
            f"{t}:\n{guarded['details'].get(t, '')}" for t in unexplained))
    for prefix, _text, why in known:
        hits = [t for t in new_problems if t.startswith(prefix)]
        assert hits, f"{prefix} no longer differs with walpatch ({why}): update KNOWN_DIFFERENCES"
    print(f"CPython {version}: {len(new_problems)} known difference(s): "
          + "; ".join(sorted({why for _, _, why in known})))
