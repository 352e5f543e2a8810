"""Drop-in SQLite modules, with the real packages from PyPI: ``pysqlite3-binary`` (imported
as ``pysqlite3``) and ``sqlean.py`` (imported as ``sqlean``). Both copy the sqlite3 API and
bundle their own, newer SQLite library; both have a ``dbapi2`` module of their own with their
own ``Connection`` and exception classes.

They run in a virtualenv where walpatch is installed with pip (the same session-wide venv
machinery as tests/test_activation.py), switched on with ``WALPATCH=1`` or ``walpatch run``,
in fresh interpreters. A refusal must be catchable as *that module's* OperationalError (the
legacy code says ``except pysqlite3.OperationalError``).
"""
from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path
from typing import Any, Dict

import pytest

from .test_activation import (
    build_venv,
    clean_env,
    header,
    last_json,
    run,
    source_copy,
    venv_base,
)

DROPINS = ("pysqlite3", "sqlean")
# pysqlite3-binary has no wheel for 3.15: there pysqlite3 is built from its sdist (it links
# the interpreter's libsqlite3; measured: builds in about 100 s, issue 13).
PYPI_PACKAGES = ("pysqlite3" if sys.version_info >= (3, 15) else "pysqlite3-binary",
                 "sqlean.py")


@pytest.fixture(scope="session")
def dropin_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if sys.version_info < (3, 9):
        # Measured in the nox matrix: sqlean.py has no wheel for 3.8 and its sdist fails to
        # build here, so the drop-ins cannot be installed on 3.8 (tested on 3.9-3.13).
        pytest.skip("sqlean.py cannot be installed on Python 3.8 (no wheel; sdist build fails)")
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        # Measured in the 3.13t cell: pip finds no cp313t wheel of pysqlite3-binary or
        # sqlean.py (noxfile.NOT_COVERED; the drop-ins run in the 3.9-3.15 cells).
        pytest.skip("pysqlite3-binary and sqlean.py have no free-threaded (cp313t) wheels")
    base = venv_base(tmp_path_factory)
    source_copy(base)
    return build_venv(base, "dropins", ["walpatch", *PYPI_PACKAGES], use_index=True)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "cwd"
    d.mkdir()
    return d


FACTS = r'''
import json, sqlite3
out = {}
for name in ("pysqlite3", "sqlean"):
    pkg = __import__(name)
    dbapi = __import__(name + ".dbapi2", fromlist=["x"])
    out[name] = {
        "connect_same": pkg.connect is dbapi.connect,
        "connection_module": dbapi.Connection.__module__,
        "operational_error": dbapi.OperationalError.__module__ + "."
                             + dbapi.OperationalError.__name__,
        "shares_stdlib_errors": issubclass(dbapi.OperationalError, sqlite3.Error),
        "sqlite_version": dbapi.sqlite_version,
    }
print(json.dumps(out))
'''

# Each module named on the command line: import it, connect to DB.<name>, ask for DELETE,
# catch the module's own OperationalError, report. ``walpatch`` is imported only at the end.
LEGACY = r'''
import importlib, json, sys
db, names = sys.argv[1], sys.argv[2:]
report = {}
for name in names:
    mod = importlib.import_module(name)
    conn = mod.connect(db + "." + name.split(".")[0])
    out = {"returned": None, "refused": None}
    try:
        out["returned"] = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    except mod.OperationalError as exc:
        out["refused"] = {
            "type": type(exc).__name__,
            "mro": [c.__module__ + "." + c.__name__ for c in type(exc).__mro__],
            "message": str(exc),
        }
    out["mode_now"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    report[name] = out
if "walpatch" in sys.modules:
    import walpatch
    report["hooked"] = walpatch.status()["hooked_modules"]
    report["stats"] = walpatch.stats()
print(json.dumps(report))
'''

MAKE_WAL = r'''
import sqlite3, sys
for path in sys.argv[1:]:
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    conn.execute("CREATE TABLE IF NOT EXISTS items(x)")
    conn.commit()
    conn.close()
'''

WAL_REQUEST = r'''
import importlib, json, sys
mod = importlib.import_module(sys.argv[2])
conn = mod.connect(sys.argv[1])
mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
conn.close()
import walpatch
print(json.dumps({"mode": mode, "stats": walpatch.stats()}))
'''


def _write(workdir: Path, name: str, text: str) -> Path:
    path = workdir / name
    path.write_text(text)
    return path


def _wal_files(py: Path, workdir: Path, db: Path, names: Any) -> None:
    paths = [f"{db}.{n.split('.')[0]}" for n in names]
    proc = run([py, _write(workdir, "make_wal.py", MAKE_WAL), *paths], workdir, clean_env())
    assert proc.returncode == 0, proc.stderr
    for p in paths:
        assert header(Path(p)) == (2, 2)


def test_real_packages_match_the_assumptions(dropin_python: Path, workdir: Path) -> None:
    """What hooks.py (FAMILIES: pkg -> pkg.dbapi2) and errors.py (a refusal class per
    module's OperationalError) assume about the real packages."""
    proc = run([dropin_python, _write(workdir, "facts.py", FACTS)], workdir, clean_env())
    assert proc.returncode == 0, proc.stderr
    facts = last_json(proc)
    for name in DROPINS:
        f = facts[name]
        assert f["connect_same"] is True
        assert f["connection_module"] == f"{name}.dbapi2"
        assert f["operational_error"] == f"{name}.dbapi2.OperationalError"
        assert f["shares_stdlib_errors"] is False  # their own exception hierarchy


@pytest.mark.parametrize("name", DROPINS + ("pysqlite3.dbapi2", "sqlean.dbapi2"))
def test_dropin_downgrade_refused_via_env(dropin_python: Path, workdir: Path,
                                          name: str) -> None:
    py = dropin_python
    legacy = _write(workdir, "legacy.py", LEGACY)
    control, db = workdir / "control.db", workdir / "app.db"
    _wal_files(py, workdir, control, [name])
    _wal_files(py, workdir, db, [name])
    family = name.split(".")[0]

    out = last_json(run([py, legacy, control, name], workdir, clean_env()))
    assert out[name]["returned"] == "delete" and out[name]["refused"] is None
    assert header(Path(f"{control}.{family}")) == (1, 1)

    proc = run([py, legacy, db, name], workdir, clean_env(WALPATCH="1"))
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc)
    refused = out[name]["refused"]
    assert refused is not None, out
    assert refused["type"] == "WalDowngradeRefused"
    assert f"{family}.dbapi2.OperationalError" in refused["mro"]  # caught as the module's
    assert "walpatch.errors.WalDowngradeRefused" in refused["mro"]
    assert out[name]["mode_now"] == "wal"
    assert header(Path(f"{db}.{family}")) == (2, 2)
    assert {family, f"{family}.dbapi2"} <= set(out["hooked"])
    assert "post-import hook" not in proc.stderr


def test_dropin_imported_before_sqlite3_both_guarded(dropin_python: Path,
                                                     workdir: Path) -> None:
    """Regression: the drop-in's post-import hook loaded walpatch's guard, which imports
    sqlite3, whose own hook then failed on a half-initialised module, so sqlite3 stayed
    unguarded in such a process."""
    py = dropin_python
    names = ["pysqlite3", "sqlite3", "sqlean"]
    db = workdir / "app.db"
    _wal_files(py, workdir, db, names)
    proc = run([py, _write(workdir, "legacy.py", LEGACY), db, *names], workdir,
               clean_env(WALPATCH="1"))
    assert proc.returncode == 0, proc.stderr
    assert "post-import hook" not in proc.stderr
    out = last_json(proc)
    for name in names:
        assert out[name]["refused"]["type"] == "WalDowngradeRefused", out
        assert header(Path(f"{db}.{name}")) == (2, 2)
    assert out["hooked"] == sorted(["pysqlite3", "pysqlite3.dbapi2", "sqlean", "sqlean.dbapi2",
                                    "sqlite3", "sqlite3.dbapi2"])


def test_dropin_via_walpatch_run(dropin_python: Path, workdir: Path) -> None:
    py = dropin_python
    db = workdir / "app.db"
    _wal_files(py, workdir, db, DROPINS)
    proc = run([py, "-m", "walpatch", "run", "--", py, _write(workdir, "legacy.py", LEGACY),
                db, *DROPINS], workdir, clean_env())
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc)
    for name in DROPINS:
        assert out[name]["refused"]["type"] == "WalDowngradeRefused"
        assert header(Path(f"{db}.{name}")) == (2, 2)


@pytest.mark.parametrize("name", ["sqlite3", "pysqlite3", "sqlean"])
def test_each_request_guarded_once(dropin_python: Path, workdir: Path, name: str) -> None:
    """The drop-ins' Connection.execute goes through self.cursor() (older CPython _sqlite code)
    also on Python 3.11+: a request must still be guarded once, not by the connection and
    again by the cursor (it was, with wal_requests == 3, before connection.py measured the
    route per module)."""
    db = workdir / "fresh.db"
    proc = run([dropin_python, _write(workdir, "wal.py", WAL_REQUEST), db, name], workdir,
               clean_env(WALPATCH="1"))
    assert proc.returncode == 0, proc.stderr
    out: Dict[str, Any] = json.loads(proc.stdout)
    assert out["mode"] == "wal" and header(db) == (2, 2)
    assert out["stats"]["wal_requests"] == 1 and out["stats"]["wal_ok"] == 1, out["stats"]
