"""Run a callback right after a module is first imported, without importing it ourselves.

Small on purpose: ``install()`` can be called at interpreter start (the ``.pth`` file,
sitecustomize) before the application imports ``sqlite3``, and it must not import sqlite3 or
wrapt then (each costs milliseconds the application may never need). A meta-path finder
lets the normal finders locate the module and wraps the loader's ``exec_module``.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Dict, List, Optional

Callback = Callable[[Any], None]

_lock = threading.RLock()
_callbacks: Dict[str, List[Callback]] = {}


class _ChainedLoader:
    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # Put the real loader back first so the module looks exactly as without us.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _fire(self._name, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Finder:
    """Meta-path finder for the watched names; steps aside for everything else."""

    def __init__(self) -> None:
        self._busy = threading.local()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[Any]:
        if fullname not in _callbacks or getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.name = None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _ChainedLoader(spec.loader, fullname)  # type: ignore[assignment]
        return spec

    def invalidate_caches(self) -> None:
        pass


_finder = _Finder()


def _fire(name: str, module: Any) -> None:
    with _lock:
        callbacks = list(_callbacks.get(name, ()))
    for callback in callbacks:
        try:
            callback(module)
        except Exception as exc:  # never break the application's import
            sys.stderr.write(f"walpatch: post-import hook for {name} failed: {exc!r}\n")


def when_imported(name: str, callback: Callback) -> None:
    """Call ``callback(module)`` now if ``name`` is imported, else right after its import."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _callbacks.setdefault(name, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    callback(module)


def forget(callback: Callback) -> None:
    """Drop a pending callback everywhere (uninstall)."""
    with _lock:
        for name in list(_callbacks):
            _callbacks[name] = [c for c in _callbacks[name] if c is not callback]
            if not _callbacks[name]:
                del _callbacks[name]
        if not _callbacks and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
