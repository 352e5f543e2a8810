"""The one build step setup.cfg cannot express: put ``walpatch.pth`` into site-packages.

All metadata stays in setup.cfg. The ``.pth`` line is generated from
``walpatch/_bootstrap.py`` (``PTH_LINE``), so the line and the code it calls cannot drift
apart, and an sdist needs nothing beyond the package itself.

* Regular wheels (``pip install .``): ``build_py`` writes ``walpatch.pth`` at the top of
  ``build_lib``, which is the root of the wheel, that is, site-packages.
* Editable installs (``pip install -e .``, PEP 660): setuptools builds the editable wheel
  from a separate directory and ignores ``build_lib``; ``build_py`` then writes the file into
  the directory the ``install`` command points at, which setuptools (>= 64) packs as the root
  of the editable wheel. tests/test_activation.py checks both kinds of install.

Uninstalling removes the file with the package (it is listed in the wheel's RECORD).

The C extension ``walpatch._speedups`` (the execute hot path, issue 14) is optional: without a
working compiler the build prints a warning and walpatch uses its pure-Python code, which
behaves the same. ``WALPATCH_DISABLE_EXTENSIONS=1`` at build time skips it (and at run time
ignores a built one). ``pip install -e .`` builds it in place, next to the sources.
"""
import os
import runpy

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _bootstrap_constants():
    # _bootstrap.py imports only os and sys and defines things: safe to run at build time.
    ns = runpy.run_path(os.path.join(HERE, "walpatch", "_bootstrap.py"),
                        run_name="walpatch_bootstrap_at_build")
    return ns["PTH_NAME"], ns["PTH_LINE"]


class build_py_with_pth(build_py):
    """build_py that also writes walpatch.pth (see the module docstring)."""

    def _pth_target_dir(self):
        if getattr(self, "editable_mode", False):
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def run(self):
        super().run()
        name, line = _bootstrap_constants()
        target_dir = self._pth_target_dir()
        self.mkpath(target_dir)
        target = os.path.join(target_dir, name)
        with open(target, "w", encoding="utf-8") as f:
            f.write(line)
        self.announce(f"writing {target}", level=2)

    def get_outputs(self, include_bytecode=1):
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, _bootstrap_constants()[0]))
        return outputs


def _extensions():
    if os.environ.get("WALPATCH_DISABLE_EXTENSIONS", "").strip().lower() not in (
            "", "0", "false", "no", "off"):
        return []
    return [Extension("walpatch._speedups", ["walpatch/_speedups.c"], optional=True)]


setup(cmdclass={"build_py": build_py_with_pth}, ext_modules=_extensions())
