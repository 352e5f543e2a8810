"""Which file each schema names at each journal-mode statement of a script (pure, no I/O
but ``os.path.realpath``).

Why: ``executescript`` runs its statements one after another, and an ``ATTACH``/``DETACH``
in it changes the schema-to-file map for every later statement (design.md section 8). The
guard lists the attached databases once, before the script, and then replays the script's
ATTACH/DETACH statements (``sqlscan.Attach``/``Detach``) here, in order. Running the script
in pieces instead would break it: ``executescript`` COMMITs before it starts, so a
``BEGIN ... PRAGMA ... COMMIT`` split in two would commit half-way.

Fail closed: where the text does not say for certain which file or which name an ATTACH
means, the result holds an unknown candidate (``path`` None) that every later downgrade
must refuse. Where it could be one of several files (a ``file:`` name is a URI only when the
connection was opened with ``uri=True``, which a connection does not tell), every one of
them is a candidate.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from .sqlscan import Attach, Detach, ascii_lower


class Candidate(NamedTuple):
    schema: str  # as the script or database_list spells it ("?" when unknown)
    path: Optional[str]  # absolute file name; None: unknown (see why)
    why: str = ""


_PERCENT = re.compile("%([0-9A-Fa-f]{2})")


def _uri_file(name: str) -> Tuple[Optional[str], bool]:
    """The file a ``file:`` URI names, as sqlite3ParseUri reads it: (path or None, certain).

    None with certain=True: no file (an in-memory or temporary database, or a URI SQLite
    rejects, so the ATTACH fails). certain=False: a URI this function does not decode."""
    rest = name[5:]
    if rest.startswith("//"):
        slash = rest.find("/", 2)
        authority = rest[2:] if slash < 0 else rest[2:slash]
        authority = re.split("[?#]", authority, maxsplit=1)[0]
        if authority not in ("", "localhost"):
            return None, True  # "invalid uri authority": the ATTACH fails
        rest = "" if slash < 0 else rest[slash:]
    path, _, query = rest.split("#", 1)[0].partition("?")
    if "%00" in path or "%00" in query:
        return None, False
    params: Dict[str, str] = {}
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        params[_PERCENT.sub(lambda m: chr(int(m.group(1), 16)), key)] = _PERCENT.sub(
            lambda m: chr(int(m.group(1), 16)), value)
    if params.get("mode") == "memory":
        return None, True
    path = _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), path)
    if not path or path == ":memory:":
        return None, True
    return path, True


def resolve_file(name: str, cwd: Optional[str]) -> Tuple[List[str], str]:
    """Files SQLite may open for ``ATTACH name``: (absolute paths, why unknown or "").

    A relative name is relative to the working directory when the statement runs (SQLite's
    unix VFS, unixFullPathname, which also resolves symbolic links, like realpath). "" and
    ":memory:" are no file. A ``file:`` name is the literal file *and* the file of the URI."""
    if name == "" or name == ":memory:":
        return [], ""
    literal = [name]
    if name.startswith("file:"):
        uri_path, certain = _uri_file(name)
        if not certain:
            return [], f"ATTACH of the URI {name!r}, which walpatch does not decode"
        if uri_path is not None:
            literal.append(uri_path)
    out: List[str] = []
    for item in literal:
        if not os.path.isabs(item):
            if cwd is None:
                return [], f"ATTACH of the relative name {name!r}, and the working " \
                           "directory cannot be read"
            item = os.path.join(cwd, item)
        try:
            out.append(os.path.realpath(item))
        except (OSError, ValueError) as exc:
            return [], f"ATTACH of {name!r}, whose path cannot be resolved ({exc})"
    return out, ""


class ScriptMap:
    """The schema-to-file map of a connection while its script runs (a superset).

    ``named``: schema (ASCII-lowered) -> candidates. ``anywhere``: files attached under a
    name the text does not give; they may be behind any schema name."""

    def __init__(self, rows: Iterable[Tuple[str, str]]) -> None:
        self.named: Dict[str, List[Candidate]] = {}
        self.anywhere: List[Candidate] = []
        for schema, path in rows:
            self.named[ascii_lower(schema)] = [Candidate(schema, path)] if path else []

    def attach(self, op: Attach, cwd: Optional[str]) -> None:
        schema = op.schema if op.schema is not None else "?"
        if op.file is None:
            found = [Candidate(schema, None, op.why)]
        else:
            paths, why = resolve_file(op.file, cwd)
            found = ([Candidate(schema, None, why)] if why else
                     [Candidate(schema, p) for p in paths])
        if op.schema is None:
            self.anywhere.extend(found)
            return
        # Union with what the name held: if it was still attached, SQLite rejects the ATTACH
        # and stops the script, so the old file is kept only to err on the guarding side.
        key = ascii_lower(op.schema)
        self.named[key] = self.named.get(key, []) + found

    def detach(self, op: Detach) -> None:
        if op.schema is not None:  # an unknown DETACH removes nothing: a superset
            self.named.pop(ascii_lower(op.schema), None)

    def candidates(self, schema: Optional[str]) -> List[Candidate]:
        """The files a request for ``schema`` (None: every attached database) may reach."""
        if schema is None:
            out = [c for cands in self.named.values() for c in cands]
        else:
            out = list(self.named.get(ascii_lower(schema), []))
        return out + self.anywhere
