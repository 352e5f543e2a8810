"""One fault run: a gateway and CLI loops on one database, real faults, kills, then checks.

The parent process (this module) never opens the database while writers run: a setup process
creates it, the writers and the observer are children, and the verification process reads
it after every writer has exited.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .common import ROOT, child_env, last_per, open_append, python, read_json_lines

#: VFSes with no shared memory: WAL cannot be hosted, the file must stay in rollback mode.
NO_SHM_VFS = ("unix-none", "unix-dotfile")
DEFAULT_POINTS = ("pwrite", "fdatasync", "pread", "open")


@dataclass
class FaultRun:
    processes: int = 4          # concurrent writers: 1 gateway + (processes - 1) CLI loops
    duration: float = 30.0      # seconds of writing
    rate: float = 0.02          # probability that one call of a fault point fails with EIO
    points: Tuple[str, ...] = DEFAULT_POINTS
    seed: int = 1
    walpatch: bool = True
    kill_rate: float = 0.02     # per transaction: SIGKILL itself after its INSERTs
    kill_every: float = 3.0     # mean seconds between SIGKILLs sent by the harness (0: none)
    vfs: Optional[str] = None   # e.g. unix-dotfile: a VFS that cannot host WAL
    rows_max: int = 4
    payload: int = 600
    cli_txns: int = 2
    gateway_txns: int = 0       # stop the gateway after this many transactions (0: duration)
    gateway_pause: float = 0.01
    recycle: int = 25
    busy_timeout: float = 5.0
    observer_interval: float = 0.002
    workdir: Optional[str] = None
    keep: bool = False
    label: str = ""
    command: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def expects_wal(self) -> bool:
        return self.vfs not in NO_SHM_VFS


class _Proc:
    def __init__(self, name: str, role: str, popen: "subprocess.Popen[bytes]") -> None:
        self.name, self.role, self.popen = name, role, popen
        self.killed_by_harness = False
        self.reaped = False


class Runner:
    def __init__(self, opts: FaultRun) -> None:
        self.o = opts
        self.dir = tempfile.mkdtemp(prefix="walpatch-stress-", dir=opts.workdir)
        self.db = os.path.join(self.dir, "stress.db")
        self.ledger = os.path.join(self.dir, "ledger.txt")
        self.stats = os.path.join(self.dir, "stats.jsonl")
        self.stop = os.path.join(self.dir, "STOP")
        self.env = child_env()
        self.stderr_fd = open_append(os.path.join(self.dir, "writers.stderr"))
        self.exits: Dict[str, int] = {}
        self.launches = 0
        self.harness_kills = 0
        self.hung = 0
        self.deadline = 0.0
        self.kill_rng = random.Random(f"{opts.seed}/harness-kills")

    # --- processes --------------------------------------------------------------------------

    def _prefix(self) -> List[str]:
        if self.o.rate <= 0:
            return []
        from walpatch import faults

        return faults.command_prefix()

    def spawn(self, role: str, name: str) -> _Proc:
        o = self.o
        cfg = dict(
            role=role, name=name, db=self.db, vfs=o.vfs, ledger=self.ledger, stats=self.stats,
            stop=self.stop, seed_key=f"{o.seed}/{name}", rate=o.rate, points=list(o.points),
            walpatch=o.walpatch, kill_rate=o.kill_rate, rows_max=o.rows_max,
            payload=o.payload, txns=o.cli_txns, max_txns=o.gateway_txns, pause=o.gateway_pause,
            recycle=o.recycle,
            busy_timeout=o.busy_timeout, restart_pause=0.05, deadline=self.deadline)
        cmd = self._prefix() + [python(), "-m", "stress.writer", json.dumps(cfg)]
        popen = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=self.stderr_fd)
        self.launches += 1
        return _Proc(name, role, popen)

    def _reap(self, proc: _Proc) -> bool:
        if proc.reaped:
            return True
        rc = proc.popen.poll()
        if rc is None:
            return False
        proc.reaped = True
        key = "killed" if rc == -signal.SIGKILL else f"exit {rc}"
        self.exits[key] = self.exits.get(key, 0) + 1
        return True

    def _setup(self) -> Dict[str, Any]:
        mode = "wal" if self.o.expects_wal else "delete"
        args = [python(), "-m", "stress.verify", "--create", self.db, mode]
        if self.o.vfs:
            args.append(self.o.vfs)
        out = subprocess.run(args, env=self.env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"creating the database failed:\n{out.stderr}")
        return json.loads(out.stdout)

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        o = self.o
        setup = self._setup()
        obs_out = os.path.join(self.dir, "observer.json")
        observer = subprocess.Popen(
            [python(), "-m", "stress.observer", self.db, self.stop, obs_out,
             str(o.observer_interval)], env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self.stderr_fd)
        started = time.monotonic()
        self.deadline = time.time() + o.duration
        end = started + o.duration
        gateways = 0
        gateway = self.spawn("gateway", "g0")
        slots = [self.spawn("cli", f"c{i}.0") for i in range(max(0, o.processes - 1))]
        launched = [1] * len(slots)
        next_kill = started + (self.kill_rng.expovariate(1.0 / o.kill_every)
                               if o.kill_every > 0 else float("inf"))
        while time.monotonic() < end:
            if self._reap(gateway):
                if gateway.popen.returncode == 0 and not slots:
                    break  # a lone gateway that finished its transactions: the run is over
                if gateway.popen.returncode != 0 and end - time.monotonic() > 0.5:
                    gateways += 1  # killed or crashed: the supervisor restarts it
                    gateway = self.spawn("gateway", f"g{gateways}")
            for i, proc in enumerate(slots):
                if self._reap(proc):
                    slots[i] = self.spawn("cli", f"c{i}.{launched[i]}")
                    launched[i] += 1
            now = time.monotonic()
            if now >= next_kill:
                running = sorted((p for p in [gateway] + slots if p.popen.poll() is None),
                                 key=lambda p: p.name)
                if running:
                    victim = self.kill_rng.choice(running)
                    victim.popen.send_signal(signal.SIGKILL)
                    victim.killed_by_harness = True
                    self.harness_kills += 1
                next_kill = now + self.kill_rng.expovariate(1.0 / o.kill_every)
            time.sleep(0.02)
        with open(self.stop, "w"):
            pass
        for proc in [gateway] + slots:
            try:
                proc.popen.wait(timeout=o.busy_timeout + 15)
            except subprocess.TimeoutExpired:
                self.hung += 1
                proc.popen.kill()
                proc.popen.wait()
            self._reap(proc)
        elapsed = time.monotonic() - started
        try:
            observer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            observer.kill()
        os.close(self.stderr_fd)
        with open(obs_out) as f:
            obs = json.load(f)
        verify = self._verify()
        row = self._row(setup, obs, verify, elapsed)
        if not o.keep and row.get("ok") is not False:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            row["kept_dir"] = self.dir
        return row

    def _verify(self) -> Dict[str, Any]:
        args = [python(), "-m", "stress.verify", self.db, self.ledger]
        if self.o.vfs:
            args.append(self.o.vfs)
        out = subprocess.run(args, env=self.env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        if out.returncode != 0:
            return {"integrity": f"verification failed: {out.stderr.strip()[-300:]}",
                    "lost": None, "header": None}
        return json.loads(out.stdout)

    # --- the row of the summary table ---------------------------------------------------------

    def _aggregate(self) -> Dict[str, Any]:
        per_pid = last_per(read_json_lines(self.stats), "pid")
        app: Dict[str, Any] = {}
        errors: Dict[str, int] = {}
        wp: Dict[str, int] = {}
        faults_by_point: Dict[str, int] = {}
        phases: Dict[str, int] = {}
        calls = 0
        for rec in per_pid.values():
            for k, v in rec.get("counters", {}).items():
                if k == "errors":
                    for ek, ev in v.items():
                        errors[ek] = errors.get(ek, 0) + ev
                elif isinstance(v, int) and k != "exit":
                    app[k] = app.get(k, 0) + v
            for k, v in (rec.get("walpatch") or {}).items():
                wp[k] = wp.get(k, 0) + v
            for point, f in (rec.get("faults") or {}).items():
                short = point.rsplit("/", 1)[-1]
                faults_by_point[short] = faults_by_point.get(short, 0) + f["fired"]
                calls += f["calls"]
                for ph, n in f.get("by_phase", {}).items():
                    phases[ph] = phases.get(ph, 0) + n
        return dict(processes_reporting=len(per_pid), app=app, errors=errors, walpatch=wp,
                    faults_by_point=faults_by_point, fault_phases=phases, fault_calls=calls)

    def _row(self, setup: Dict[str, Any], obs: Dict[str, Any], ver: Dict[str, Any],
             elapsed: float) -> Dict[str, Any]:
        o = self.o
        agg = self._aggregate()
        app, wp = agg["app"], agg["walpatch"]
        header = ver.get("header")
        expected = [2, 2] if o.expects_wal else [1, 1]
        row: Dict[str, Any] = dict(
            scenario="faults" if o.expects_wal else f"no-WAL vfs={o.vfs}",
            label=o.label, walpatch=o.walpatch, processes=o.processes,
            duration=round(elapsed, 1), rate=o.rate, points=list(o.points), seed=o.seed,
            vfs=o.vfs, launches=self.launches, exits=self.exits,
            kills=self.harness_kills + app.get("self_killed", 0),
            kills_harness=self.harness_kills, kills_self=app.get("self_killed", 0),
            hung=self.hung, faults=sum(agg["faults_by_point"].values()),
            faults_by_point=agg["faults_by_point"], fault_phases=agg["fault_phases"],
            fault_calls=agg["fault_calls"],
            retries=wp.get("wal_retries", 0), refusals=wp.get("downgrades_refused", 0),
            wal_failed=wp.get("wal_failed", 0), wal_recovered=wp.get("wal_recovered", 0),
            wal_unsupported=wp.get("wal_unsupported", 0) + wp.get("wal_silently_refused", 0),
            app_fallbacks=app.get("fallbacks", 0),
            app_downgrades=app.get("fallback_accepted", 0),
            downgrades=obs["downgrades"], upgrades=obs["upgrades"],
            raw_downgrades=obs["raw_downgrades"], observer=obs,
            integrity=ver.get("integrity"), integrity_vfs=ver.get("integrity_via_vfs"),
            committed=ver.get("ledger_rows"),
            table_rows=ver.get("table_rows"), lost=ver.get("lost"),
            lost_sample=ver.get("lost_sample"),
            header=header, header_left=ver.get("header_left"),
            sidecars_left=ver.get("sidecars_left"), setup=setup,
            errors=agg["errors"], app=app, walpatch_stats=wp,
            command=o.command, options=asdict(o))
        row["final_mode"] = ("wal" if header == [2, 2] else "rollback" if header == [1, 1]
                             else str(header))
        problems: List[str] = []
        if row["integrity"] != "ok":
            problems.append(f"integrity: {row['integrity']}")
        if row["lost"] != 0:
            problems.append(f"committed rows lost: {row['lost']}")
        if row["downgrades"]:
            problems.append(f"downgrades seen: {row['downgrades']}")
        if header != expected:
            problems.append(f"final header {header}, expected {expected}")
        if not o.expects_wal and (row["upgrades"] or obs.get("states_seen", {}).get("wal")):
            problems.append("the file reached WAL on a VFS that cannot host it")
        if self.hung:
            problems.append(f"{self.hung} writer(s) hung at the end")
        if not row["committed"]:
            problems.append("no row was committed")
        if o.rate > 0 and not row["faults"]:
            problems.append("no fault was injected")
        row["problems"] = problems
        if o.walpatch:
            row["ok"] = not problems
        else:
            row["ok"] = None  # a control run: it shows what happens without walpatch
        return row


def run_fault_scenario(opts: FaultRun) -> Dict[str, Any]:
    return Runner(opts).run()
