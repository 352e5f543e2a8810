"""Small helpers shared by the stress processes (no sqlite3 import here)."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional

#: The checkout root (holds ``walpatch/`` and ``stress/``): children get it on PYTHONPATH.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TABLE = "stress_rows"
SCHEMA = (f"CREATE TABLE IF NOT EXISTS {TABLE}("
          "k TEXT PRIMARY KEY, writer TEXT NOT NULL, payload BLOB NOT NULL)")


def db_uri(path: str, vfs: Optional[str] = None) -> str:
    """``file:`` URI for ``path`` (``?``, ``#``, ``%`` percent-encoded, design.md section 5)."""
    quoted = path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
    return "file:" + quoted + (f"?vfs={vfs}" if vfs else "")


def child_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for a child: checkout root first on PYTHONPATH, no inherited ``WALPATCH*``
    (each child decides itself whether walpatch is on), no inherited LD_PRELOAD."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WALPATCH") and k != "LD_PRELOAD"}
    env.pop("PYTHONHOME", None)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")
    env["PYTHONIOENCODING"] = "utf-8"
    if extra:
        env.update(extra)
    return env


def open_append(path: str) -> int:
    """An O_APPEND descriptor (one ``write()`` per record: records from several processes
    do not interleave). Never a database file."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                   0o644)


def append_json(fd: int, record: Mapping[str, Any]) -> None:
    os.write(fd, (json.dumps(record, sort_keys=True, default=str) + "\n").encode())


def read_json_lines(path: str) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    value = json.loads(line)
                except ValueError:
                    continue  # a line torn by SIGKILL
                if isinstance(value, dict):
                    out.append(value)
    except FileNotFoundError:
        pass
    return out


def last_per(records: Iterable[Mapping[str, Any]], key: str) -> Dict[Any, Dict[str, Any]]:
    """The last record for each value of ``key`` (cumulative counters: last one wins)."""
    out: Dict[Any, Dict[str, Any]] = {}
    for rec in records:
        out[rec.get(key)] = dict(rec)
    return out


def python() -> str:
    return sys.executable
