"""Build walpatch._speedups in place for another interpreter, without setuptools.

The pyenv interpreters 3.12+ have no setuptools, and tests that run them against the checkout
(PYTHONPATH) need the extension for their own ABI next to the sources (gitignored), as
``pip install -e .`` makes it for the venv's interpreter. One compiler call, flags from the
target interpreter's sysconfig; the file is written atomically, so parallel runs cannot import
a half-written one.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
SOURCE = os.path.join(CHECKOUT, "walpatch", "_speedups.c")

_QUERY = ("import sysconfig; print(sysconfig.get_paths()['include']); "
          "print(sysconfig.get_config_var('EXT_SUFFIX'))")


def build_inplace(python: str, extra_flags: Optional[List[str]] = None) -> str:
    """Compile the extension for ``python`` into walpatch/ (if older than the source);
    returns the path of the shared object. Raises CalledProcessError on a compiler error."""
    include, suffix = subprocess.run(
        [python, "-c", _QUERY], check=True, capture_output=True, text=True).stdout.split()
    target = os.path.join(CHECKOUT, "walpatch", "_speedups" + suffix)
    if (not extra_flags and os.path.exists(target)
            and os.path.getmtime(target) >= os.path.getmtime(SOURCE)):
        return target
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=os.path.dirname(target))
    os.close(fd)
    try:
        subprocess.run(
            [os.environ.get("CC", "cc"), "-O2", "-g", "-fPIC", "-shared", "-Wall", "-Wextra",
             "-Wno-missing-field-initializers", "-Wno-unused-parameter", "-I", include,
             *(extra_flags or []), "-o", tmp, SOURCE], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


if __name__ == "__main__":
    for py in sys.argv[1:] or [sys.executable]:
        print(build_inplace(py))
