"""walpatch's bootstrap ``sitecustomize``: ``walpatch run`` puts this directory first on
``PYTHONPATH``, so Python runs this file at start in the command and in every Python
subprocess it starts (they inherit ``PYTHONPATH`` and ``WALPATCH``).

What it does, in this order, and never raising into the interpreter:

1. takes every walpatch bootstrap directory out of ``sys.path`` (they hold nothing the
   application should see);
2. if ``WALPATCH`` asks for walpatch, arms it with the walpatch installed *for this
   interpreter* (the same ``walpatch._bootstrap`` the ``walpatch.pth`` line uses; when the
   ``.pth`` already did it, this is a no-op, so walpatch is never set up twice). An interpreter
   that has no walpatch of its own (another virtualenv, a system tool) gets one line on
   stderr and is otherwise left alone: nothing of the launcher's environment leaks into it;
3. runs the next ``sitecustomize`` on ``sys.path`` (the user's own, or the system's) exactly
   once, as the module ``sitecustomize``, the way Python would have without us. Its errors
   surface exactly as they would have ("Error in sitecustomize; ...").

Written for any Python 3 (no f-strings, no annotations): an unrelated interpreter of any
version may run it.
"""
import os
import sys

_ENV = "WALPATCH"
_DISABLE_WORDS = ("", "0", "off", "false", "no")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _is_bootstrap_dir(entry):
    try:
        real = os.path.realpath(entry or os.curdir)
    except Exception:
        return False
    if real == os.path.realpath(_HERE):
        return True
    return (os.path.basename(real) == "_sitecustomize"
            and os.path.basename(os.path.dirname(real)) == "walpatch"
            and os.path.isfile(os.path.join(real, "sitecustomize.py")))


def _say(message):
    try:
        sys.stderr.write(message + "\n")
    except Exception:
        pass


def _load_bootstrap():
    """``walpatch._bootstrap`` of the walpatch this interpreter imports, loaded by path
    (without running ``walpatch/__init__.py``); None when there is no walpatch here."""
    module = sys.modules.get("walpatch._bootstrap")
    if module is not None:
        return module
    import _frozen_importlib as bootstrap
    import _frozen_importlib_external as external

    spec = None
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec("walpatch", None) if find_spec is not None else None
        if spec is not None and spec.submodule_search_locations:
            break
    else:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "_bootstrap.py")
    spec = external.spec_from_file_location("walpatch._bootstrap", path)
    module = bootstrap.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def _activate():
    if os.environ.get(_ENV, "").strip().lower() in _DISABLE_WORDS:
        return
    try:
        module = _load_bootstrap()
        if module is None:
            _say("walpatch: WALPATCH is set (walpatch run) but walpatch is not installed for "
                 "this interpreter (%s); its SQLite connections are NOT guarded"
                 % (sys.executable,))
            return
        module.activate("walpatch run")
    except Exception as exc:
        _say("walpatch: WALPATCH is set but walpatch could not be activated by walpatch run's "
             "sitecustomize (sqlite3 is NOT guarded): %r" % (exc,))


def _run_next_sitecustomize():
    import _frozen_importlib as bootstrap
    import _frozen_importlib_external as external

    spec = external.PathFinder.find_spec("sitecustomize", list(sys.path))
    if spec is None or spec.loader is None:
        return
    module = bootstrap.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("sitecustomize", None)
        raise  # site.py reports it as "Error in sitecustomize", as without walpatch


if __name__ == "sitecustomize":
    sys.path[:] = [p for p in sys.path if not _is_bootstrap_dir(p)]
    _activate()
    _run_next_sitecustomize()
