"""Multi-process stress harness for walpatch: real libfiu faults, SIGKILL, lock safety.

    python -m stress --help

Modules (each small, each a separate process role where it says so):

* ``harness``  -- the command: runs scenarios, prints the summary table (parent process).
* ``scenario`` -- one fault run: gateway + CLI loops + observer + kills, then verification.
* ``writer``   -- a writer process (gateway or CLI) under ``fiu-run -x``: legacy WAL setup on
  every connect, seeded random EIO, ledger of committed rows.
* ``randfault``-- seeded random fault decisions on top of ``walpatch.faults.Fault``.
* ``observer`` -- samples header bytes 18/19 of the database through the run (not a writer).
* ``verify``   -- end-of-run check in a clean process: integrity, ledger rows, header.
* ``locks``    -- lock safety: threads + connections + guard checks vs. a watcher process.
* ``report``   -- the summary table (text and Markdown).

Python 3.8 compatible.
"""
