"""Seeded random EIO on libfiu fault points, built on ``walpatch.faults.Fault``.

``walpatch.faults.Fault`` (the package's libfiu wrapper, also used by ``walpatch demo``) asks
a ctypes callback on every call of an enabled point; :class:`SeededRandomFault` only replaces
that callback's decision: call *n* of the point fails when the *n*-th draw of a
``random.Random`` seeded with ``"<seed>/<process key>/<point>"`` is below ``rate``. So the
fault decisions of a seeded run are reproducible call by call; which SQLite operation the
*n*-th call belongs to depends on scheduling (lock waits, retries, kills), which is not.

libfiu's own ``fiu_enable_random`` draws from an unseeded generator, hence this.
Runs inside the writer process (under ``fiu-run -x``); ``phase`` lets the writer attribute
each injected fault to "setup" (the legacy WAL setup on connect) or "write".
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Sequence

from walpatch import faults as _faults


class SeededRandomFault(_faults.Fault):
    """Fail each call of ``point`` with probability ``rate`` (errno ``err``), seeded."""

    def __init__(self, point: str, rate: float, seed_key: str, err: str = "EIO") -> None:
        super().__init__(point, err, once=False)  # persistent: our _decide picks the calls
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")
        self.rate = rate
        self.seed_key = f"{seed_key}/{self.point}"
        self._rng = random.Random(self.seed_key)  # str seeds hash with sha512: stable
        self.phase = "setup"
        self.by_phase: Dict[str, int] = {}
        self.paused = False  # the process's own bookkeeping I/O (ledger, stats) is never hit

    def _decide(self, name: Any, failnum: Any, failinfo: Any, flags: Any) -> int:
        with self._lock:
            if self.paused:
                return 0
            self.calls += 1
            if self._rng.random() >= self.rate:
                return 0
            self.fired += 1
            self.by_phase[self.phase] = self.by_phase.get(self.phase, 0) + 1
            return 1

    def summary(self) -> Dict[str, Any]:
        out = super().summary()
        out.update(rate=self.rate, by_phase=dict(self.by_phase))
        return out


class FaultSet:
    """All random faults of one process; enable/disable together, set the phase."""

    def __init__(self, points: Sequence[str], rate: float, seed_key: str) -> None:
        self.faults: List[SeededRandomFault] = [
            SeededRandomFault(p, rate, seed_key) for p in points] if rate > 0 else []

    def enable(self) -> None:
        _faults.libfiu()  # load and initialise before the first fault can fire
        for f in self.faults:
            f.enable()

    def disable(self) -> None:
        for f in self.faults:
            f.disable()

    def set_phase(self, phase: str) -> None:
        for f in self.faults:
            f.phase = phase

    def pause(self, paused: bool) -> None:
        """While paused, calls pass and draw nothing (the seeded sequence is unaffected)."""
        for f in self.faults:
            f.paused = paused

    def fired(self) -> int:
        return sum(f.fired for f in self.faults)

    def summary(self) -> Dict[str, Any]:
        return {f.point: f.summary() for f in self.faults}
