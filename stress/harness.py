"""``python -m stress``: the walpatch stress harness (docs/stress.md).

Scenarios:
  faults  one database, 1 long-lived gateway + (processes - 1) loops of short-lived CLI
          processes, each running the legacy "try WAL, fall back to DELETE on disk I/O error"
          setup on every connect; seeded random EIO (libfiu) into the fault points; SIGKILLs
          (writers kill themselves mid-transaction with --kill-rate, the harness kills a random
          writer every --kill-every seconds on average); an observer samples header bytes
          18/19; at the end integrity_check, the ledger of committed rows, the header.
  no-wal  the same on a VFS that cannot host WAL (default --vfs unix-dotfile: no shared
          memory, but real locks); no kills (a killed unix-dotfile writer leaves its lock
          directory behind and every other writer then waits forever).
  locks   lock safety in one protected process (threads, connections, guard checks) against
          a watcher process (design.md section 5); with the naive-read control.
  all     faults + no-wal (with and without walpatch) + locks (wal and delete, with control).

Exit code: 0 when every run with walpatch passed (and, with --require-controls, every control
run showed what it must: downgrades without walpatch, violations with the naive read); 1 when
one failed; 2 when the harness cannot run here (libfiu missing for a fault run, bad usage).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from . import report
from .common import ROOT, child_env, python
from .scenario import DEFAULT_POINTS, FaultRun, run_fault_scenario

EXIT_OK, EXIT_FAILED, EXIT_CANNOT_RUN = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stress", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--scenario", choices=("faults", "no-wal", "locks", "all"), default="faults")
    p.add_argument("--processes", type=int, default=4,
                   help="concurrent writers: 1 gateway + N-1 CLI loops (default 4)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per run (default 30)")
    p.add_argument("--fault-rate", type=float, default=0.02,
                   help="probability that one call of a fault point fails with EIO "
                        "(default 0.02; 0 = no faults)")
    p.add_argument("--points", default=",".join(DEFAULT_POINTS),
                   help="libfiu points, comma-separated short names (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    wp = p.add_mutually_exclusive_group()
    wp.add_argument("--walpatch", dest="walpatch", action="store_const", const="on",
                    help="only runs with walpatch (default: with and without)")
    wp.add_argument("--no-walpatch", dest="walpatch", action="store_const", const="off",
                    help="only runs without walpatch (the controls)")
    p.add_argument("--kill-rate", type=float, default=0.02,
                   help="per transaction: the writer SIGKILLs itself before COMMIT")
    p.add_argument("--kill-every", type=float, default=3.0,
                   help="mean seconds between harness SIGKILLs of a random writer (0: none)")
    p.add_argument("--gateway-txns", type=int, default=0,
                   help="stop the gateway after N transactions (0: run for --duration); with "
                        "--processes 1 and no kills a seeded run is then exactly reproducible")
    p.add_argument("--vfs", default=None,
                   help="SQLite VFS for the writers (no-wal scenario: default unix-dotfile)")
    p.add_argument("--threads", type=int, default=8, help="locks: threads (default 8)")
    p.add_argument("--lock-mode", choices=("wal", "delete", "both"), default="both")
    p.add_argument("--lock-variant", choices=("guarded", "naive", "both"), default=None,
                   help="locks: the guarded run, the naive-read control, or both (default: "
                        "both; guarded only with --walpatch, naive only with --no-walpatch)")
    p.add_argument("--require-controls", action="store_true",
                   help="also fail when a control run did not show what it must")
    p.add_argument("--json", metavar="FILE", help="write every run's full figures here")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--keep", action="store_true", help="keep each run's directory")
    p.add_argument("--workdir", default=None, help="where run directories go (default: $TMPDIR)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _variants(args: argparse.Namespace) -> List[bool]:
    return {"on": [True], "off": [False]}.get(args.walpatch, [True, False])


def fault_command(args: argparse.Namespace, scenario: str, walpatch: bool,
                  vfs: Optional[str], kill_rate: float, kill_every: float) -> str:
    parts = ["python", "-m", "stress", "--scenario", scenario,
             "--processes", str(args.processes), "--duration", f"{args.duration:g}",
             "--fault-rate", f"{args.fault_rate:g}", "--points", args.points,
             "--seed", str(args.seed), "--kill-rate", f"{kill_rate:g}",
             "--kill-every", f"{kill_every:g}"]
    if args.gateway_txns:
        parts += ["--gateway-txns", str(args.gateway_txns)]
    if vfs and not (scenario == "no-wal" and vfs == "unix-dotfile"):
        parts += ["--vfs", vfs]
    parts.append("--walpatch" if walpatch else "--no-walpatch")
    return " ".join(shlex.quote(x) for x in parts)


def lock_command(args: argparse.Namespace, mode: str, naive: bool) -> str:
    return (f"python -m stress --scenario locks --lock-mode {mode} --duration "
            f"{args.duration:g} --threads {args.threads} --seed {args.seed} "
            f"--lock-variant {'naive' if naive else 'guarded'}")


def run_faults(args: argparse.Namespace, scenario: str) -> List[Dict[str, Any]]:
    rows = []
    no_wal = scenario == "no-wal"
    vfs = args.vfs or ("unix-dotfile" if no_wal else None)
    kill_rate = 0.0 if no_wal else args.kill_rate
    kill_every = 0.0 if no_wal else args.kill_every
    points = tuple(p.strip() for p in args.points.split(",") if p.strip())
    for walpatch in _variants(args):
        cmd = fault_command(args, scenario, walpatch, vfs, kill_rate, kill_every)
        _progress(args, f"running: {cmd}")
        row = run_fault_scenario(FaultRun(
            processes=args.processes, duration=args.duration, rate=args.fault_rate,
            points=points, seed=args.seed, walpatch=walpatch, kill_rate=kill_rate,
            kill_every=kill_every, vfs=vfs, gateway_txns=args.gateway_txns,
            workdir=args.workdir, keep=args.keep,
            command=cmd))
        row["kind"] = "faults"
        rows.append(row)
    return rows


def run_lock(mode: str, duration: float, threads: int, seed: int, naive: bool,
             workdir: Optional[str] = None, keep: bool = False, command: str = "",
             lock_guard: str = "off") -> Dict[str, Any]:
    """One lock-safety run: create the database, run the protected process (which starts
    the watcher), then verify integrity and the holders' ledger in a clean process.

    ``lock_guard``: WALPATCH_LOCK_GUARD for the protected process. ``off`` by default, so that
    the naive control really loses locks (with ``protect`` walpatch's lock guard keeps the
    naive reader's close from releasing them: the run with ``naive=True,
    lock_guard="protect"`` shows that)."""
    env = child_env()
    env["WALPATCH_LOCK_GUARD"] = lock_guard
    d = tempfile.mkdtemp(prefix="walpatch-locks-", dir=workdir)
    db, ledger = os.path.join(d, "locks.db"), os.path.join(d, "ledger.txt")

    def run(argv: List[str], timeout: float) -> Dict[str, Any]:
        out = subprocess.run([python(), "-m"] + argv, env=env, cwd=ROOT, timeout=timeout,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    run(["stress.verify", "--create", db, mode], 60)
    argv = ["stress.locks", "run", db, ledger, mode, str(duration), str(threads), str(seed)]
    row = run(argv + (["--naive"] if naive else []), duration + 120)
    ver = run(["stress.verify", db, ledger], 300)
    row.update(kind="locks", integrity=ver.get("integrity"), lost=ver.get("lost"),
               committed=ver.get("ledger_rows"), header=ver.get("header"), command=command)
    problems = []
    if naive and lock_guard == "protect":
        if row["violations"]:
            problems.append(f"{row['violations']} of {row['probes']} held locks lost although "
                            "the lock guard protects the naive reader")
        if row["naive_unprotected"]:
            problems.append(f"{row['naive_unprotected']} of {row['naive_reads']} naive reads "
                            "got a descriptor that their close() really closed")
        row["ok"] = not problems and row["integrity"] == "ok" and not row["lost"]
    elif naive:
        if not row["violations"]:
            problems.append("the naive read lost no lock: the watcher cannot see lost locks")
        else:
            problems.append(f"{row['violations']} of {row['probes']} held locks lost")
        if row["integrity"] != "ok" or row["lost"]:
            problems.append(f"integrity {row['integrity']}, lost {row['lost']}")
        row["ok"] = None
    else:
        if row["violations"]:
            problems.append(f"{row['violations']} held locks lost")
        if not row["probes"] or row["holds_without_check"] > max(2, row["probes"] // 20):
            problems.append(f"{row['holds_without_check']} of {row['probes']} holds saw no "
                            "guard check")
        if row["unexpected_errors"] or row["hung_threads"]:
            problems.append(f"unexpected errors {row['unexpected']}, hung threads "
                            f"{row['hung_threads']}")
        if row["integrity"] != "ok" or row["lost"] != 0:
            problems.append(f"integrity {row['integrity']}, lost {row['lost']}")
        row["ok"] = not problems
    row["problems"] = problems
    if keep or row["ok"] is False:
        row["kept_dir"] = d
    else:
        shutil.rmtree(d, ignore_errors=True)
    return row


def run_locks(args: argparse.Namespace) -> List[Dict[str, Any]]:
    variant = args.lock_variant or {"on": "guarded", "off": "naive"}.get(args.walpatch, "both")
    modes = ["wal", "delete"] if args.lock_mode == "both" else [args.lock_mode]
    naives = {"guarded": [False], "naive": [True], "both": [False, True]}[variant]
    rows = []
    for mode in modes:
        for naive in naives:
            cmd = lock_command(args, mode, naive)
            _progress(args, f"running: {cmd}")
            rows.append(run_lock(mode, args.duration, args.threads, args.seed, naive,
                                 args.workdir, args.keep, cmd))
    return rows


def _progress(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(f"[stress {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _controls_ok(rows: List[Dict[str, Any]]) -> bool:
    for r in rows:
        if r["ok"] is not None:
            continue
        if r["kind"] == "faults" and r["scenario"] == "faults" and not r["downgrades"]:
            return False
        if r["kind"] == "locks" and not r["violations"]:
            return False
    return True


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.processes < 1 or args.duration <= 0 or not 0 <= args.fault_rate <= 1:
        print("stress: --processes >= 1, --duration > 0, 0 <= --fault-rate <= 1",
              file=sys.stderr)
        return EXIT_CANNOT_RUN
    scenarios = ["faults", "no-wal", "locks"] if args.scenario == "all" else [args.scenario]
    if args.fault_rate > 0 and set(scenarios) & {"faults", "no-wal"}:
        from walpatch import faults

        usable, why = faults.available()
        if not usable:
            print(f"stress: cannot inject faults here: {why}", file=sys.stderr)
            return EXIT_CANNOT_RUN
    rows: List[Dict[str, Any]] = []
    for scenario in scenarios:
        rows += run_locks(args) if scenario == "locks" else run_faults(args, scenario)
    print(report.render(rows, markdown=args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, sort_keys=True, default=str)
    failed = any(r["ok"] is False for r in rows)
    if args.require_controls and not _controls_ok(rows):
        failed = True
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
