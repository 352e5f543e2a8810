"""Run CPython's own sqlite3 test suite in this process, optionally with walpatch installed.

    python tests/cpython_suite_runner.py [--walpatch] [--verbose]

The last line printed is a JSON object: {"python", "module", "walpatch", "run", "failures",
"errors", "skipped", "expected_failures", "unexpected_successes", "problems", ...}.
"problems" lists the ids of failing / erroring tests, so two runs can be compared test by test.

Used by tests/test_cpython_suite.py on every interpreter in ~/.pyenv/versions; kept free of
anything newer than Python 3.8 and of third-party imports (wrapt is only needed by walpatch).
Exit code: 0 when the suite ran (whatever it found), 2 when it could not be loaded.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import unittest


def suite_module_name() -> str:
    """CPython's sqlite3 test entry module: test.test_sqlite3 (3.11+) or test.test_sqlite."""
    return "test.test_sqlite3" if sys.version_info >= (3, 11) else "test.test_sqlite"


def load_suite(module_name: str) -> unittest.TestSuite:
    import importlib

    module = importlib.import_module(module_name)
    loader = unittest.TestLoader()
    # Both modules define load_tests(); loadTestsFromModule honours it (3.11+ discovers the
    # test_sqlite3 package's submodules, 3.8-3.10 collect sqlite3.test.*.suite()).
    return loader.loadTestsFromModule(module)


def _ids(pairs: list) -> list:
    return sorted(test.id() for test, _ in pairs)


def run(with_walpatch: bool, verbose: bool = False, stream: object = None) -> dict:
    module_name = suite_module_name()
    info: dict = {
        "python": "%d.%d.%d" % sys.version_info[:3],
        "module": module_name,
        "walpatch": with_walpatch,
    }
    if with_walpatch:
        import walpatch

        info["walpatch_installed"] = bool(walpatch.install())
        info["walpatch_file"] = walpatch.__file__
    import sqlite3

    info["sqlite_version"] = sqlite3.sqlite_version
    # Some suites write test files into the current directory (TESTFN): give them a scratch one.
    old_cwd = os.getcwd()
    scratch = tempfile.mkdtemp(prefix="walpatch-cpython-suite-")
    os.chdir(scratch)
    try:
        suite = load_suite(module_name)
        out = stream if stream is not None else io.StringIO()
        runner = unittest.TextTestRunner(stream=out, verbosity=2 if verbose else 1)
        result = runner.run(suite)
    finally:
        os.chdir(old_cwd)
    if with_walpatch:
        import walpatch

        info["walpatch_stats"] = walpatch.stats()
        info["connect_is_wrapped"] = type(sqlite3.connect).__name__ == "FunctionWrapper"
        info["speedups"] = walpatch.status()["speedups"]
    info.update(
        run=result.testsRun,
        failures=len(result.failures),
        errors=len(result.errors),
        skipped=len(result.skipped),
        expected_failures=len(result.expectedFailures),
        unexpected_successes=len(result.unexpectedSuccesses),
        problems=_ids(result.failures) + _ids(result.errors),
        skipped_ids=sorted(test.id() for test, _ in result.skipped),
    )
    if result.failures or result.errors:
        info["details"] = {
            test.id(): text[-1500:] for test, text in result.failures + result.errors
        }
    return info


def main(argv: list) -> int:
    with_walpatch = "--walpatch" in argv
    verbose = "--verbose" in argv
    try:
        info = run(with_walpatch, verbose, stream=sys.stderr if verbose else None)
    except Exception as exc:  # could not even load the suite: say so on the JSON line
        print(json.dumps({"python": sys.version.split()[0], "walpatch": with_walpatch,
                          "load_error": repr(exc)}))
        return 2
    sys.stdout.flush()
    print(json.dumps(info, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
