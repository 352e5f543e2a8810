"""The compatibility matrix: the whole test suite on every CPython 3.8-3.15 that pyenv has,
against wrapt 1.17 and against the newest wrapt 2.x that the interpreter supports, and on the
free-threaded 3.13t build (session ``tests_free_threaded``, newest wrapt 2.x).

    python -m pip install nox
    nox                                   # the whole matrix (docs/compatibility.md)
    nox -l                                # list the cells
    nox -s "tests-3.8(wrapt='1.17')"      # one cell
    nox -s tests-3.12 -- -k frameworks    # pytest arguments after --
    nox -s tests_free_threaded            # the free-threaded 3.13t cell

Interpreters: ``pyenv versions --bare`` (or the folders of $PYENV_ROOT/versions), newest patch
release of each minor version 3.8-3.15, and the newest free-threaded ``3.13.Zt`` (labelled
``3.13t``); 3.14, 3.15 and 3.13t come from scripts/provision-pythons.sh (docs/compatibility.md),
which .ci/run calls first. Their ``bin`` folders are put first on PATH so that
nox finds the real interpreters, not pyenv's shims. Nothing is downloaded: an interpreter
that is missing is reported by nox (an error when the CI variable is set).

wrapt: ``1.17`` = wrapt==1.17.*; ``2`` = the newest 2.x (2.2.0 excluded: descriptor
regression; 2.1+ dropped Python 3.8, so 3.8 gets 2.0.x). Each cell prints the wrapt it got
and fails if that is not the series it asked for.

Each cell installs walpatch (editable) with setup.cfg's ``test`` extra (pytest, hypothesis,
and the framework packages of tests/test_frameworks.py and tests/test_stacking.py) and sets
WALPATCH_REQUIRE_FAULTS=1, WALPATCH_REQUIRE_FRAMEWORKS=1 and WALPATCH_REQUIRE_ALL_PYTHONS=1,
so that none of those tests may skip. A test file that cannot run in a cell (NOT_COVERED:
OpenTelemetry on 3.8 with wrapt 2) is deselected with a warning.

``WALPATCH_NOX_SUITE=core nox``: the whole suite on 3.11 only, a core on the other
interpreters (CORE_LEAVES_OUT below), for when the full matrix outgrows CI's time limit.

Cross-interpreter tests (tests/test_cpython_suite.py runs CPython's own sqlite3 suite on every
interpreter; test_faults.py, test_activation.py and test_transparency.py run some checks on
other interpreters too) must run once per interpreter, not in every cell for every
interpreter: each cell deselects the test ids parametrized with another interpreter's version
("[3.9]", ...) and sets WALPATCH_MATRIX=1 for the tests to know they run in a cell.
"""
from __future__ import annotations

import configparser
import glob
import os
import re
import subprocess
from typing import Dict, List, Sequence

import nox

MINORS = range(8, 16)  # CPython 3.8 .. 3.15
#: free-threaded builds (pyenv's naming, ~/.pyenv/versions/3.13.Zt): their cell label
FREE_THREADED_MINORS = range(13, 14)  # 3.13t (3.14t: no source obtainable here yet)
WRAPT = {
    "1.17": "wrapt==1.17.*",
    "2": "wrapt>=2,!=2.2.0",  # pip picks the newest 2.x the interpreter supports
}
#: The framework packages (also in setup.cfg's test extra): tests/test_frameworks.py and,
#: for OpenTelemetry, tests/test_stacking.py.
OTEL = ["opentelemetry-instrumentation-sqlite3", "opentelemetry-sdk"]
#: (python, wrapt) -> (test file, why it cannot run in that cell): deselected, and said so
NOT_COVERED = {
    ("3.8", "2"): ("tests/test_stacking.py",
                   "opentelemetry-instrumentation 0.54b1, the last release for Python 3.8, "
                   "requires wrapt<2: OpenTelemetry cannot be installed next to wrapt 2 on 3.8"),
    ("3.13t", "2"): ("tests/test_dropins.py",
                     "pysqlite3-binary and sqlean.py have no free-threaded (cp313t) wheels; "
                     "building both from source was not verified here (sqlean.py's sdist took "
                     "15 min on 3.15); the drop-ins run in the 3.9-3.15 cells "
                     "(test_sqliteinfo's two drop-in tests skip here for the same reason)"),
}
#: WALPATCH_NOX_SUITE=ci (what .ci/run uses, right after the full suite on 3.11): every cell
#: leaves out CORE_LEAVES_OUT.
#: WALPATCH_NOX_SUITE=core: the fallback if the matrix outgrows CI's time limit. The cells
#: of FULL_ON run everything; the others leave out these files (load, benchmarks, the
#: SQLite-oracle fuzzing of the pure-Python scanner: slow, and least tied to the
#: interpreter or wrapt). Measured cost per cell: docs/compatibility.md.
FULL_ON = "3.11"
CORE_LEAVES_OUT = ["tests/test_stress.py", "tests/test_bench_smoke.py", "tests/test_sqlscan.py",
                   # the differential harness and the 6,000-file state test: generators and
                   # load, run once per CI run by the full suite on 3.11
                   "tests/test_differential.py",
                   "tests/test_hardening_guard.py::test_item14_per_file_state_is_bounded_over_many_files",
                   # runs 3.8, 3.13, 3.15 and 3.13t from the full suite on 3.11 already; a
                   # cell runs the whole activation file natively instead (16 s per cell)
                   "tests/test_activation.py::test_other_interpreters"]
#: This cell runs with WALPATCH_DISABLE_EXTENSIONS=1: the pure-Python hot path (identical
#: behaviour to walpatch/_speedups.c, which every other cell and the full suite use).
PURE_PYTHON_CELL = ("3.12", "2")
#: The cells .ci/run selects (`nox -s ...`), to stay within CI's time on a fresh machine:
#: one cell per interpreter: the newest wrapt 2.x on each but 3.11, where .ci/run's full suite
#: runs with it and the cell takes wrapt 1.17 instead, and the free-threaded cell: 9 cells.
#: `nox` alone runs all 17 (the full matrix, docs/compatibility.md).
#: .ci/run runs them in two lanes at once: a cell is CPU-bound (about 6 min alone, user+sys
#: close to wall time) and the machine has 2 cores. The free-threaded cell is the slowest, so
#: its lane has one cell fewer.
CI_LANES = [
    ["tests_free_threaded", "tests-3.8(wrapt='2')", "tests-3.12(wrapt='2')",
     "tests-3.14(wrapt='2')"],
    ["tests-3.9(wrapt='2')", "tests-3.10(wrapt='2')", "tests-3.11(wrapt='1.17')",
     "tests-3.13(wrapt='2')", "tests-3.15(wrapt='2')"],
]
CI_CELLS = [cell for lane in CI_LANES for cell in lane]

nox.options.sessions = ["tests", "tests_free_threaded"]
nox.options.reuse_existing_virtualenvs = False
if hasattr(nox.options, "download_python"):
    nox.options.download_python = "never"  # only registries are reachable here


def _pyenv_root() -> str:
    return os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")


def _pyenv_versions() -> List[str]:
    try:
        out = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True,
                             timeout=30).stdout
        names = out.split()
    except (OSError, subprocess.SubprocessError):
        names = []
    if not names:
        names = [os.path.basename(p) for p in glob.glob(os.path.join(_pyenv_root(), "versions",
                                                                      "*"))]
    return names


def discover(free_threaded: bool = False) -> Dict[str, str]:
    """'3.8' -> the bin folder of the newest pyenv CPython 3.8.x (3.8-3.15 only); with
    ``free_threaded``, '3.13t' -> that of the newest 3.13.Zt."""
    newest: Dict[int, tuple] = {}
    suffix = "t" if free_threaded else ""
    minors = FREE_THREADED_MINORS if free_threaded else MINORS
    for name in _pyenv_versions():
        match = re.fullmatch(r"3\.(\d+)\.(\d+)" + suffix, name)
        if not match or int(match.group(1)) not in minors:
            continue
        minor, patch = int(match.group(1)), int(match.group(2))
        bin_dir = os.path.join(_pyenv_root(), "versions", name, "bin")
        if not os.access(os.path.join(bin_dir, "python"), os.X_OK):
            continue
        if minor not in newest or patch > newest[minor][0]:
            newest[minor] = (patch, bin_dir)
    return {f"3.{minor}{suffix}": newest[minor][1] for minor in sorted(newest)}


INTERPRETERS = discover()
FREE_THREADED = discover(free_threaded=True)
PYTHONS = list(INTERPRETERS) or [f"3.{minor}" for minor in MINORS]
PYTHONS_FT = list(FREE_THREADED) or [f"3.{minor}t" for minor in FREE_THREADED_MINORS]
# Real interpreters first on PATH (before pyenv's shims), so "3.8" resolves to python3.8 and
# "3.13t" to python3.13t.
os.environ["PATH"] = os.pathsep.join(list(INTERPRETERS.values()) + list(FREE_THREADED.values())
                                     + [os.environ.get("PATH", "")])


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower()


def test_requirements() -> List[str]:
    """The requirements of setup.cfg's ``test`` extra."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(os.path.dirname(os.path.abspath(__file__)), "setup.cfg"))
    raw = parser.get("options.extras_require", "test", fallback="")
    return [line.strip() for line in raw.splitlines() if line.strip()]


def other_versions_expression(current: str) -> str:
    """A pytest -k expression deselecting tests parametrized with another version's id."""
    labels = [f"3.{minor}" for minor in MINORS] + [f"3.{m}t" for m in FREE_THREADED_MINORS]
    others = [f"[{label}]" for label in labels if label != current]
    return " and ".join(f"not {ident}" for ident in others)


@nox.session(python=PYTHONS, venv_backend="venv")
@nox.parametrize("wrapt", list(WRAPT))
def tests(session: nox.Session, wrapt: str) -> None:
    """The whole test suite on one interpreter with one wrapt series."""
    _cell(session, wrapt)


@nox.session(python=PYTHONS_FT, venv_backend="venv")
def tests_free_threaded(session: nox.Session) -> None:
    """The whole suite on the free-threaded build (newest wrapt 2.x: the series that declares
    free-threading support), including tests/test_free_threaded.py (GIL stays off, threads
    stress) run on this very interpreter."""
    # hypothesis 6.156+ has no free-threaded wheel and builds a Rust extension from the crates
    # index, which is not reachable here: take the newest hypothesis that ships a wheel.
    _cell(session, "2", pip_args=["--only-binary", "hypothesis"])


def _cell(session: nox.Session, wrapt: str, pip_args: Sequence[str] = ()) -> None:
    suite = os.environ.get("WALPATCH_NOX_SUITE", "full").strip().lower()
    if suite not in ("full", "core", "ci"):
        session.error(f"WALPATCH_NOX_SUITE={suite!r}: use 'full', 'core' or 'ci'")
    gap = NOT_COVERED.get((str(session.python), wrapt))
    # setup.cfg's test extra, minus what cannot be installed in this cell (pip would
    # otherwise backtrack for many minutes looking for an OpenTelemetry that takes wrapt 2).
    requirements = [r for r in test_requirements()
                    if not (gap and gap[0] == "tests/test_stacking.py" and _name(r) in OTEL)]
    session.install(*pip_args, "-e", ".", WRAPT[wrapt], *requirements)
    got = session.run("python", "-c", "import wrapt; print(wrapt.__version__)", silent=True)
    got = (got or "").strip().splitlines()[-1]
    if not (got.startswith("1.17.") if wrapt == "1.17" else got.startswith("2.")):
        session.error(f"asked for wrapt {WRAPT[wrapt]!r}, got {got}")
    if got.startswith("2.2.0"):
        session.error("wrapt 2.2.0 is excluded (descriptor regression)")
    session.log(f"wrapt {got} on Python {session.python}")
    env = {
        "WALPATCH_MATRIX": "1",
        "WALPATCH_REQUIRE_FAULTS": "1",
        "WALPATCH_REQUIRE_FRAMEWORKS": "1",
        "WALPATCH_REQUIRE_ALL_PYTHONS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if (str(session.python), wrapt) == PURE_PYTHON_CELL:
        # issue 14: the whole (cell) suite once on the pure-Python hot path as well
        env["WALPATCH_DISABLE_EXTENSIONS"] = "1"
        session.log("WALPATCH_DISABLE_EXTENSIONS=1: this cell runs the pure-Python hot path")
    args = list(session.posargs or ["-q", "-p", "no:cacheprovider"])
    if gap:
        session.warn(f"NOT COVERED in this cell: {gap[0]}: {gap[1]}")
        args = ["--deselect", gap[0]] + args
    # ci: .ci/run has just run the whole suite on 3.11; the cells leave these files out
    # everywhere (the timing-sensitive load tests then run once per CI run, not three times).
    if (suite == "ci") or (suite == "core" and str(session.python) != FULL_ON):
        session.warn(f"WALPATCH_NOX_SUITE={suite}: left out here: {', '.join(CORE_LEAVES_OUT)}")
        for path in CORE_LEAVES_OUT:
            args = ["--deselect", path] + args
    session.run("python", "-m", "pytest", "-k", other_versions_expression(str(session.python)),
                *args, env=env)
