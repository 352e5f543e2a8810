"""Zero-code activation: what runs at interpreter start when ``WALPATCH`` is set.

Two routes call :func:`activate`:

* the ``walpatch.pth`` file that ``pip install`` puts into site-packages (one line, see
  :data:`PTH_LINE`; ``setup.py`` writes it from here), in every interpreter of that
  environment whose ``WALPATCH`` is set to something other than ``""``, ``0``, ``off``,
  ``false`` or ``no``;
* the bootstrap ``sitecustomize`` that ``walpatch run`` puts first on ``PYTHONPATH``
  (``walpatch/_sitecustomize/sitecustomize.py``).

Both load this file *by its path*, without executing ``walpatch/__init__.py``: importing the
whole package costs tens of milliseconds, importing sqlite3 a few more, wrapt tens more, and
most interpreters of an environment never touch SQLite. So at start this module only puts a
small finder in front of ``sys.meta_path``; when the application first imports ``sqlite3``
(or the drop-ins ``pysqlite3`` / ``sqlean``), right after that module has executed, it calls
``walpatch.install()``, which wraps ``connect`` before the application's ``import`` statement
returns. If a SQLite module is already imported, it installs at once.

Fail open: nothing here raises into the interpreter. An error is one line on stderr (or the
``walpatch`` logger's own messages from ``install()``), and the application runs on.

Module-level code imports nothing that an interpreter has not loaded already (``os``,
``sys``): this file is on the start-up path of every Python process of the environment.
Python 3.8 compatible; no ``from __future__`` import (it would import ``__future__``).
"""
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Dict, List, Optional, Set

#: The variable that switches walpatch on for a whole environment.
ENV = "WALPATCH"
#: Values of ``WALPATCH`` that leave walpatch off (compared stripped and lower-cased).
#: Same words as ``walpatch.config.DISABLE_WORDS`` (a test keeps them equal).
DISABLE_WORDS = ("", "0", "off", "false", "no")
#: Importing any of these arms walpatch (same names as ``walpatch.hooks.FAMILIES``).
WATCHED = ("sqlite3", "pysqlite3", "sqlean")

#: The file ``pip install`` puts into site-packages, and the name of its planned PEP 829
#: companion (``walpatch.start``, Python 3.15+; see docs/activation.md).
PTH_NAME = "walpatch.pth"

# What the .pth line runs (in a fresh namespace) when WALPATCH asks for walpatch: find the
# walpatch package *without importing it*, load this file as ``walpatch._bootstrap`` and call
# activate("pth"). Only modules every interpreter has loaded at this point are used.
# Some interpreters process the .pth files of a venv's site-packages twice (CPython 3.11's
# site.venv() and site.main() both call addsitepackages): the sys attribute makes the second
# run a no-op, so an error is reported once.
_PTH_CODE = """\
import os, sys
try:
    if getattr(sys, '_walpatch_pth_ran', False):
        raise SystemExit
    sys._walpatch_pth_ran = True
    m = sys.modules.get('walpatch._bootstrap')
    if m is None:
        import _frozen_importlib as b, _frozen_importlib_external as e
        for f in sys.meta_path:
            s = getattr(f, 'find_spec', None) and f.find_spec('walpatch', None)
            if s is not None and s.submodule_search_locations:
                break
        else:
            raise ImportError('the walpatch package is not importable here')
        p = os.path.join(list(s.submodule_search_locations)[0], '_bootstrap.py')
        s = e.spec_from_file_location('walpatch._bootstrap', p)
        m = b.module_from_spec(s)
        sys.modules[s.name] = m
        try:
            s.loader.exec_module(m)
        except BaseException:
            del sys.modules[s.name]
            raise
    m.activate('pth')
except SystemExit:
    pass
except Exception as x:
    try:
        sys.stderr.write('walpatch: WALPATCH is set but walpatch could not be activated by '
                         'walpatch.pth (sqlite3 is NOT guarded): %r\\n' % (x,))
    except Exception:
        pass
"""

#: The single line of ``walpatch.pth``. site.py executes lines that start with ``import``;
#: with ``WALPATCH`` unset it costs one dictionary lookup.
PTH_LINE = (
    "import os; exec(%r, {}) if os.environ.get(%r, '').strip().lower() not in %r else None\n"
    % (_PTH_CODE, ENV, DISABLE_WORDS)
)

# What happened in this interpreter (read by status()). Plain dict: no locks needed, every
# write happens under the import system's locks or is idempotent.
_state: "Dict[str, Any]" = {
    "armed": False,       # activate() ran and succeeded in arming
    "sources": [],        # who called activate(): "pth", "walpatch run", ...
    "trigger": None,      # which import installed walpatch ("sqlite3", ...) or "at start"
    "installed": None,    # what walpatch.install() returned
    "error": None,        # repr of an unexpected error, if any
}


def requested(environ: "Optional[Dict[str, str]]" = None) -> bool:
    """Whether ``WALPATCH`` asks for walpatch in ``environ`` (default: this process)."""
    env = os.environ if environ is None else environ
    return env.get(ENV, "").strip().lower() not in DISABLE_WORDS


def _say(message: str) -> None:
    try:
        sys.stderr.write(message.rstrip("\n") + "\n")
    except Exception:
        pass


class _Loader(object):
    """Runs the real loader, then installs walpatch (before the importer gets the module)."""

    def __init__(self, loader: "Any", name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: "Any") -> "Any":
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: "Any") -> None:
        # Put the real loader back first, so the module looks exactly as without us.
        module.__loader__ = self._loader
        spec = getattr(module, "__spec__", None)
        if spec is not None:
            spec.loader = self._loader
        self._loader.exec_module(module)
        _install(self._name)

    def __getattr__(self, name: str) -> "Any":
        return getattr(self._loader, name)


class _Finder(object):
    """Meta-path finder for :data:`WATCHED`; lets the other finders find the module."""

    def __init__(self) -> None:
        self._busy: "Set[str]" = set()

    def find_spec(self, fullname: str, path: "Any" = None, target: "Any" = None) -> "Any":
        if fullname not in WATCHED or fullname in self._busy:
            return None
        self._busy.add(fullname)
        spec = None
        try:
            for finder in list(sys.meta_path):
                if finder is self:
                    continue
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _Loader(spec.loader, fullname)
        return spec

    def invalidate_caches(self) -> None:
        pass


_finder = _Finder()


def _disarm_finder() -> None:
    try:
        while _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
    except ValueError:
        pass


def _install(trigger: str) -> None:
    """``walpatch.install()`` now (the settings come from the ``WALPATCH_*`` variables)."""
    _disarm_finder()
    if _state["trigger"] is not None:
        return
    _state["trigger"] = trigger
    try:
        import walpatch

        # This module was loaded by path: make ``walpatch._bootstrap`` an attribute too.
        if getattr(walpatch, "_bootstrap", None) is None:
            walpatch._bootstrap = sys.modules[__name__]  # type: ignore[attr-defined]
        _state["installed"] = bool(walpatch.install())  # logs its own failures
    except Exception as exc:  # fail open
        _state["installed"] = False
        _state["error"] = repr(exc)
        _say("walpatch: could not be activated (sqlite3 is NOT guarded): %r" % (exc,))


def activate(source: str = "api") -> bool:
    """Arm walpatch in this interpreter; idempotent, never raises. Returns True when armed.

    Installs at once if a SQLite module is imported already, else when one is first imported.
    ``source`` is recorded for ``walpatch status`` ("pth", "walpatch run", ...).
    """
    try:
        if source not in _state["sources"]:
            _state["sources"].append(source)
        if _state["armed"]:
            return True
        _state["armed"] = True
        for name in WATCHED:
            if name in sys.modules:
                _install(name)
                return True
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        return True
    except Exception as exc:  # pragma: no cover - defensive
        _state["error"] = repr(exc)
        _say("walpatch: could not be armed (sqlite3 is NOT guarded): %r" % (exc,))
        return False


def start() -> None:
    """PEP 829 entry point (``walpatch.start`` containing ``walpatch._bootstrap:start``, for
    Python 3.15+): the same as the ``.pth`` line. Not shipped yet: resolving the entry point
    imports the ``walpatch`` package at every start, which costs milliseconds until
    ``walpatch/__init__.py`` loads its submodules lazily (docs/activation.md)."""
    if requested():
        activate("start")


def find_pth_files() -> "List[str]":
    """Every ``walpatch.pth`` in this interpreter's site directories (for status)."""
    dirs: "List[str]" = []
    try:
        import site

        dirs.extend(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
        user = getattr(site, "USER_SITE", None)
        if user and getattr(site, "ENABLE_USER_SITE", False):
            dirs.append(user)
    except Exception:
        pass
    dirs.extend(p for p in sys.path if p)
    found: "List[str]" = []
    seen = set()
    for d in dirs:
        path = os.path.join(d, PTH_NAME)
        real = os.path.realpath(path)
        if real not in seen and os.path.isfile(path):
            seen.add(real)
            found.append(path)
    return found


def info() -> "Dict[str, Any]":
    """What the activation routes did in this interpreter (``walpatch status``)."""
    value = os.environ.get(ENV)
    return {
        "env_value": value,
        "env_requests_walpatch": requested(),
        "armed": bool(_state["armed"]),
        "activated_by": list(_state["sources"]),
        "waiting_for_import": bool(_state["armed"] and _state["trigger"] is None
                                   and _finder in sys.meta_path),
        "installed_on_import_of": _state["trigger"],
        "install_returned": _state["installed"],
        "error": _state["error"],
        "pth_files": find_pth_files(),
    }
