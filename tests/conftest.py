"""Shared pytest wiring: the ``libfiu`` fixture and WALPATCH_REQUIRE_FAULTS.

* ``libfiu``: the ``tests/faultinject.py`` module when real syscall faults can be injected
  here; otherwise the test is skipped with the reason (what is missing, how to install it).
* ``WALPATCH_REQUIRE_FAULTS=1`` (set by .ci/run): any test marked ``@pytest.mark.fault`` that
  skipped, for whatever reason, makes the session fail with a list of those tests, so a CI
  machine without libfiu cannot report green while no fault was injected.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import pytest

from . import faultinject

# This machine's SQLite (3.40.1) has the WAL-reset bug, so every process that uses WAL with
# walpatch prints one `sqlite-wal-reset-bug` warning on stderr (issue 11). Tests that compare a
# process's stderr with and without walpatch would all see it: the suite states "this build is
# accepted" for its subprocesses by default. tests/test_sqliteinfo.py removes the setting and
# tests the warning itself.
os.environ.setdefault("WALPATCH_WAL_RESET_BUG", "accept")

_REQUIRE_VAR = "WALPATCH_REQUIRE_FAULTS"
_skipped_fault_tests: List[Tuple[str, str]] = []


def _require_faults() -> bool:
    return os.environ.get(_REQUIRE_VAR, "").strip().lower() in ("1", "true", "yes", "on")


@pytest.fixture(scope="session")
def libfiu():
    """The faultinject helper module; skips (with the reason) when libfiu is not usable."""
    reason = faultinject.missing_reason()
    if reason:
        pytest.skip(f"libfiu not available: {reason}")
    return faultinject


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "fault" in report.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(
            report.longrepr)
        _skipped_fault_tests.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _require_faults() and _skipped_fault_tests and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore
    if not (_require_faults() and _skipped_fault_tests):
        return
    terminalreporter.section(f"{_REQUIRE_VAR}=1: fault tests skipped", sep="!", red=True)
    for nodeid, reason in _skipped_fault_tests:
        terminalreporter.line(f"SKIPPED FAULT TEST {nodeid}: {reason}", red=True)
    terminalreporter.line(
        f"{len(_skipped_fault_tests)} fault test(s) skipped while {_REQUIRE_VAR}=1: the session "
        "fails (install libfiu: apt-get install -y fiu-utils libfiu-dev)", red=True)
