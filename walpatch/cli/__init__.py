"""The ``walpatch`` command: one parser, one module per subcommand (``walpatch/cli/<name>.py``).

Exit codes shared by every subcommand: 0 ok, 1 the check found a problem, 2 bad usage or
input (a clear one-line message, never a traceback), 127 the command to run was not found.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 127

# subcommand -> (module, one-line help). Each module has add_arguments(parser) and run(args).
SUBCOMMANDS = {
    "run": ("walpatch.cli.run", "run a command with walpatch active in it and its children"),
    "status": ("walpatch.cli.status", "say whether walpatch is active in this interpreter"),
    "check": ("walpatch.cli.check", "inspect database files: journal mode, header, sidecars"),
    "probe": ("walpatch.cli.probe", "can this directory's filesystem host a WAL database?"),
    "demo": ("walpatch.cli.demo", "show what walpatch does, with a real injected fault"),
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="walpatch",
        description="Keep SQLite WAL databases from being silently downgraded.",
    )
    parser.add_argument("--version", action="version", version=f"walpatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `walpatch check --json | head`: the reader left, not an error
        # Point stdout at /dev/null so that the interpreter's final flush cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
