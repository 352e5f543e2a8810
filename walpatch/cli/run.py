"""Run a command with walpatch active in it and in every Python subprocess it starts.
The command gets WALPATCH (the mode) and walpatch's bootstrap sitecustomize first on
PYTHONPATH, which arms walpatch in each Python interpreter that starts and then runs your own
sitecustomize exactly once. The command replaces this process (exec): same PID, so signals
reach it directly, and its exit status is the exit status. A command that is not found
exits 127, one that cannot be executed 126.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Dict, List, Mapping, Optional

from ..config import ENABLE_WORDS, OBSERVE_WORDS
from . import EXIT_NOT_FOUND, EXIT_USAGE

EXIT_CANNOT_EXECUTE = 126
_MODE_WORDS = ENABLE_WORDS + OBSERVE_WORDS


def bootstrap_dir() -> str:
    """The directory holding the bootstrap ``sitecustomize.py`` (and nothing importable)."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(package_dir, "_sitecustomize")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--observe", action="store_true",
                      help="log what walpatch would do, change nothing (WALPATCH=observe)")
    mode.add_argument("--enforce", action="store_true",
                      help="retry and refuse (WALPATCH=enforce); the default unless WALPATCH "
                           "in the environment already says observe")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS...]",
                        help="the command to run (put -- before it if it starts with -)")


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def child_environment(observe: bool, enforce: bool,
                      environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The command's environment: ``WALPATCH`` set, the bootstrap first on ``PYTHONPATH``."""
    env = dict(os.environ if environ is None else environ)
    current = env.get("WALPATCH", "").strip().lower()
    if observe:
        env["WALPATCH"] = "observe"
    elif enforce or current not in _MODE_WORDS:
        env["WALPATCH"] = "enforce"
    # else: keep the environment's own enabling value (e.g. WALPATCH=observe)
    here = bootstrap_dir()
    # Kept exactly, empty entries included: Python reads an empty entry as the current
    # directory (``PYTHONPATH=:``). Only an unset or empty variable means no entries at all.
    existing = env.get("PYTHONPATH", "")
    entries = existing.split(os.pathsep) if existing else []
    if not any(p and _same_dir(p, here) for p in entries):
        entries.insert(0, here)
    env["PYTHONPATH"] = os.pathsep.join(entries)
    return env


def _resolve(command: str, env: Mapping[str, str]) -> Optional[str]:
    if os.sep in command or (os.altsep and os.altsep in command):
        return command if os.path.exists(command) else None
    return shutil.which(command, path=env.get("PATH", os.defpath))


def run(args: argparse.Namespace) -> int:
    command: List[str] = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("walpatch run: no command given (usage: walpatch run [--observe] [--] "
              "COMMAND [ARGS...])", file=sys.stderr)
        return EXIT_USAGE
    env = child_environment(args.observe, args.enforce)
    program = _resolve(command[0], env)
    if program is None:
        print(f"walpatch run: command not found: {command[0]}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        print(f"walpatch run: cannot execute {command[0]}: permission denied or not a "
              "program", file=sys.stderr)
        return EXIT_CANNOT_EXECUTE
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name != "posix":  # no exec that keeps the process: wait and pass the status on
        import subprocess

        try:
            return subprocess.call([program] + command[1:], env=env)
        except KeyboardInterrupt:
            return 130
    try:
        os.execve(program, command, env)
    except OSError as exc:
        print(f"walpatch run: cannot execute {command[0]}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_CANNOT_EXECUTE
    return EXIT_CANNOT_EXECUTE  # not reached
