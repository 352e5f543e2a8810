#!/usr/bin/env python
"""Instructions per call of walpatch's hot path, counted by valgrind's callgrind.

    python benchmarks/callgrind_hotpath.py [--calls 20000] [--compare walpatch-NAME=DIR ...]

Timings on a shared machine move by tens of percent; instruction counts do not. For each
variant (unpatched sqlite3, walpatch from this work tree, the same with
WALPATCH_DISABLE_EXTENSIONS=1 as ``walpatch-python``, and any scratch copy given with
``--compare``) and each loop (``conn.execute("SELECT ?", (i,))``, ``cur.execute(...)``), a
fresh interpreter runs the loop under ``valgrind --tool=callgrind`` twice, with 0 and with
``--calls`` iterations (PYTHONHASHSEED=0); the difference divided by the calls is the
instructions per call, start-up excluded. Needs valgrind (Debian: apt-get install valgrind).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

LOOP = r'''
import sys
variant, loop, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if variant != "unpatched":
    import walpatch
    assert walpatch.install()
import sqlite3
conn = sqlite3.connect(":memory:")
cur = conn.cursor()
if variant != "unpatched":
    from walpatch import connection
    assert connection.is_guarded(conn) and connection.is_guarded(cur)
target = conn if loop == "conn" else cur
for i in range(300):  # warm the specializing interpreter and the caches
    target.execute("SELECT ?", (i,))
for i in range(n):
    target.execute("SELECT ?", (i,))
'''


def count(python: str, root: Optional[str], variant: str, loop: str, n: int, tmp: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
    env["PYTHONHASHSEED"] = "0"
    if variant == "walpatch-python":  # the pure-Python hot path (no walpatch._speedups)
        env["WALPATCH_DISABLE_EXTENSIONS"] = "1"
    if root is not None:
        env["PYTHONPATH"] = root
    else:
        env.pop("PYTHONPATH", None)
    script = os.path.join(tmp, "loop.py")
    with open(script, "w") as f:
        f.write(LOOP)
    out = os.path.join(tmp, f"cg.{variant}.{loop}.{n}")
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python, script,
         variant, loop, str(n)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env,
        cwd=tmp, timeout=900)
    m = re.search(r"Collected\s*:\s*([\d,]+)", proc.stderr)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"callgrind run failed ({variant}, {loop}, {n}):\n{proc.stderr[-3000:]}")
    return int(m.group(1).replace(",", ""))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--compare", action="append", default=[], metavar="walpatch-NAME=DIR")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter binary itself (not a pyenv shim)")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    variants: Dict[str, Optional[str]] = {"unpatched": None, "walpatch": REPO,
                                          "walpatch-python": REPO}
    for spec in args.compare:
        name, _, root = spec.partition("=")
        variants[name] = os.path.abspath(root)
    print(f"Python {sys.version.split()[0]} ({args.python}); {args.calls} calls; "
          "instructions per call (callgrind, start-up subtracted)\n")
    print("| loop | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    with tempfile.TemporaryDirectory(prefix="walpatch-callgrind-") as tmp:
        for loop in ("conn", "cursor"):
            per_call: Dict[str, float] = {}
            for variant, root in variants.items():
                full = count(args.python, root, variant, loop, args.calls, tmp)
                empty = count(args.python, root, variant, loop, 0, tmp)
                per_call[variant] = (full - empty) / args.calls
            base = per_call["unpatched"]
            cells = [f"{per_call['unpatched']:.0f}"] + [
                f"{v:.0f} ({v / base:.3f}x, {v - base:+.0f})"
                for k, v in per_call.items() if k != "unpatched"]
            print(f"| `{loop}.execute(\"SELECT ?\", (i,))` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
