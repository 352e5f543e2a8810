"""Say whether walpatch is active in this interpreter, in which mode, with which settings."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    import walpatch

    info = walpatch.status()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    if not info["installed"]:
        print("walpatch is not active in this interpreter")
        return 0
    print(f"walpatch {info['version']} is active, mode: {info['mode']}")
    print("hooked modules: " + (", ".join(info["hooked_modules"]) or "none yet "
                                "(sqlite3 not imported; hooked on import)"))
    for key, value in sorted((info["settings"] or {}).items()):
        source = info["setting_sources"].get(key, "default")
        print(f"  {key} = {value!r}  ({source})")
    return 0
