"""The summary tables: plain text for the terminal, Markdown for docs/stress.md."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

Row = Dict[str, Any]
Column = Tuple[str, Callable[[Row], Any]]


def _yn(v: bool) -> str:
    return "yes" if v else "no"


def _verdict(row: Row) -> str:
    if row.get("ok") is True:
        return "PASS"
    if row.get("ok") is False:
        return "FAIL: " + "; ".join(row.get("problems") or ["?"])
    return "control: " + ("; ".join(row.get("problems") or []) or "nothing seen")


def _faults(row: Row) -> str:
    ph = row.get("fault_phases") or {}
    return f"{row['faults']} ({ph.get('setup', 0)}/{ph.get('write', 0)})"


def _integrity(row: Row) -> str:
    text = str(row.get("integrity"))
    via = row.get("integrity_vfs")
    if via and via != "ok":
        short = "malformed" if "malformed" in via else via
        text += f" (through {row.get('vfs')} before recovery: {short})"
    return text


FAULT_COLUMNS: Sequence[Column] = (
    ("run", lambda r: r["scenario"]),
    ("walpatch", lambda r: _yn(r["walpatch"])),
    ("procs", lambda r: r["processes"]),
    ("secs", lambda r: r["duration"]),
    ("launches", lambda r: r["launches"]),
    ("faults (setup/write)", _faults),
    ("retries", lambda r: r["retries"]),
    ("refusals", lambda r: r["refusals"]),
    ("fallbacks run/accepted", lambda r: f"{r['app_fallbacks']}/{r['app_downgrades']}"),
    ("downgrades seen", lambda r: r["downgrades"]),
    ("kills", lambda r: r["kills"]),
    ("integrity", _integrity),
    ("committed", lambda r: r["committed"]),
    ("lost", lambda r: r["lost"]),
    ("final", lambda r: r["final_mode"]),
    ("verdict", _verdict),
)

LOCK_COLUMNS: Sequence[Column] = (
    ("run", lambda r: "locks" + (" (naive control)" if r["naive"] else "")),
    ("walpatch", lambda r: _yn(r["walpatch"])),
    ("mode", lambda r: r["mode"]),
    ("threads", lambda r: r["threads"]),
    ("secs", lambda r: r["seconds"]),
    ("connections", lambda r: r["connections"]),
    ("holds probed", lambda r: r["probes"]),
    ("header checks during holds", lambda r: r["checks_during_holds"]),
    ("refusals", lambda r: r["refusals"]),
    ("violations (fcntl/sql)",
     lambda r: f"{r['violations']} ({r['fcntl_violations']}/{r['sql_violations']})"),
    ("integrity", lambda r: r["integrity"]),
    ("lost", lambda r: r["lost"]),
    ("verdict", _verdict),
)


def _cells(rows: List[Row], columns: Sequence[Column]) -> List[List[str]]:
    return [[str(get(r)) for _, get in columns] for r in rows]


def text_table(rows: List[Row], columns: Sequence[Column]) -> str:
    head = [name for name, _ in columns]
    body = _cells(rows, columns)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa
    return "\n".join([fmt(head), line] + [fmt(c) for c in body])


def markdown_table(rows: List[Row], columns: Sequence[Column], command: bool = True) -> str:
    head = [name for name, _ in columns] + (["command"] if command else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, cells in zip(rows, _cells(rows, columns)):
        if command:
            cells = cells + [f"`{r.get('command', '')}`"]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def render(rows: List[Row], markdown: bool = False) -> str:
    fault_rows = [r for r in rows if r.get("kind") == "faults"]
    lock_rows = [r for r in rows if r.get("kind") == "locks"]
    parts = []
    for subset, columns in ((fault_rows, FAULT_COLUMNS), (lock_rows, LOCK_COLUMNS)):
        if subset:
            parts.append(markdown_table(subset, columns) if markdown
                         else text_table(subset, columns))
    if not markdown:
        commands = [f"  [{i + 1}] {r.get('command', '')}"
                    for i, r in enumerate(fault_rows + lock_rows)]
        parts.append("reproduce (in the table's order, faults first):\n" + "\n".join(commands))
    return "\n\n".join(parts)
