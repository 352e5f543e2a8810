"""What to paste into a site's own ``sitecustomize.py`` to switch walpatch on for every Python
process that uses it, without changing one line of application code.

When you need this: ``pip install walpatch`` already puts ``walpatch.pth`` into site-packages,
so ``WALPATCH=1`` in the environment is enough for interpreters of *that* environment. A
sitecustomize is for the other cases: walpatch on by default without setting a variable
everywhere (systemd units, cron, CI runners), installs that process no ``.pth`` files
(``pip install --target``, zipapps, ``PYTHONPATH`` deployments), and Python versions that
ignore ``import`` lines in ``.pth`` files (PEP 829: 3.18 and later).

Where it goes: the first ``sitecustomize.py`` on ``sys.path`` is the one Python runs at start.
``python -c "import sitecustomize; print(sitecustomize.__file__)"`` shows whether one exists
already (Debian/Ubuntu ship ``/usr/lib/python3.X/sitecustomize.py``): add the block below to
it rather than shadowing it. For one virtualenv, ``<venv>/lib/python3.X/site-packages/``.

Cost: ``import walpatch`` runs at every interpreter start (about 10-20 ms; it does not import
sqlite3 or wrapt: those load only when the application imports sqlite3). The ``WALPATCH``
variable with the ``.pth`` file is cheaper (well under 1 ms until sqlite3 is imported).

Python 2-era tools that parse this file are not a concern: it is plain Python 3.8+.
"""

# ---- walpatch: keep SQLite WAL databases from being silently downgraded -------------------
# On unless WALPATCH says 0/off/false/no (or is empty); WALPATCH=observe only logs. Settings
# come from the WALPATCH_* environment variables (README, "Settings"); an invalid value gives
# one warning and the default, and protection stays on. Never breaks interpreter start.
import os as _os

if _os.environ.get("WALPATCH", "1").strip().lower() not in ("", "0", "off", "false", "no"):
    try:
        import walpatch

        walpatch.install()  # or walpatch.install(retry_attempts=8, ...) to fix settings here
    except Exception as _exc:  # fail open: the application runs on, unprotected
        import sys as _sys

        _sys.stderr.write(f"walpatch: not active, sqlite3 is NOT guarded: {_exc!r}\n")
# ---- end walpatch --------------------------------------------------------------------------
