"""Find ``PRAGMA [schema.]journal_mode = MODE`` requests in SQL text, the way SQLite does.

Mirrors SQLite's tokenizer (src/tokenize.c) and the pragma grammar (src/parse.y) closely
enough to agree with SQLite's own parser on every statement that SQLite accepts; the tests
check that against the authorizer, which reports each pragma as SQLite parsed it.

``scan()`` sits on the hot path of every ``execute`` and is memoized in a bounded dict:
ordinary statements cost one dict lookup. A statement that SQLite would reject (a syntax
error) is never a request, because SQLite runs nothing from it.
"""
from __future__ import annotations

import re
from typing import Dict, List, NamedTuple, Optional, Tuple

#: SQLite's journal modes in the order pragma.c tries them; a value matches by prefix.
JOURNAL_MODES = ("delete", "persist", "off", "truncate", "memory", "wal")
WAL = "wal"

_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}

# Token kinds
_WORD, _STRING, _NUMBER, _PUNCT, _SEMI, _ILLEGAL = range(6)

_IDCHAR = r"0-9A-Za-z_$\u0080-\U0010ffff"
_TOKEN_RE = re.compile(
    r"""
      (?P<space>[ \t\n\f\r]+)
    | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<blob>[xX]'[^']*')
    | (?P<sq>'(?:[^']|'')*')
    | (?P<dq>"(?:[^"]|"")*")
    | (?P<bq>`(?:[^`]|``)*`)
    | (?P<br>\[[^\]]*\])
    | (?P<word>[A-Za-z_\u0080-\U0010ffff][IDCHARS]*)
    | (?P<number>(?:[0-9]|\.[0-9])[IDCHARS.]*(?:[eE][+-][0-9]+)?)
    | (?P<semi>;)
    | (?P<eq>==?)
    | (?P<punct>[().,+\-])
    | (?P<other>.)
    """.replace("IDCHARS", _IDCHAR),
    re.VERBOSE | re.DOTALL,
)


class Request(NamedTuple):
    """One journal-mode change request: ``schema`` is None when the pragma names none."""

    schema: Optional[str]
    mode: str  # one of JOURNAL_MODES
    statement: str  # the statement's own text, for running it alone

    @property
    def is_wal(self) -> bool:
        return self.mode == WAL


class Plan(NamedTuple):
    """What a piece of SQL asks of the journal mode."""

    requests: Tuple[Request, ...]
    #: every statement in the text is a journal-mode pragma (a request or a query)
    only_journal_pragmas: bool


def ascii_lower(text: str) -> str:
    """Lower-case ASCII letters only, as SQLite's sqlite3StrICmp does."""
    return text.translate(_ASCII_LOWER)


def mode_for_value(value: str) -> Optional[str]:
    """The journal mode SQLite picks for ``= value``, or None when SQLite treats it as a query.

    pragma.c compares strlen(value) characters case-insensitively against each mode name in
    order, so the value must be a prefix: 'w' -> wal, 'd' -> delete, '' -> delete, 'wall' -> None.
    """
    value = ascii_lower(value.split("\0", 1)[0])
    for mode in JOURNAL_MODES:
        if mode.startswith(value):
            return mode
    return None


def _dequote(kind: str, text: str) -> str:
    if kind == "sq":
        return text[1:-1].replace("''", "'")
    if kind == "dq":
        return text[1:-1].replace('""', '"')
    if kind == "bq":
        return text[1:-1].replace("``", "`")
    if kind == "br":
        return text[1:-1]
    return text


_Token = Tuple[int, str]  # (kind, text: dequoted for names and strings)


def _statements(sql: str) -> List[Tuple[List[_Token], str]]:
    """Split into statements of significant tokens, each with its own source text."""
    out: List[Tuple[List[_Token], str]] = []
    tokens: List[_Token] = []
    start = 0
    for m in _TOKEN_RE.finditer(sql):
        kind = m.lastgroup
        if kind in ("space", "comment"):
            continue
        text = m.group()
        if kind == "semi":
            out.append((tokens, sql[start : m.end()]))
            tokens = []
            start = m.end()
        elif kind == "word":
            tokens.append((_WORD, text))
        elif kind in ("sq",):
            tokens.append((_STRING, _dequote(kind, text)))
        elif kind in ("dq", "bq", "br"):
            tokens.append((_WORD, _dequote(kind, text)))
        elif kind == "number":
            tokens.append((_NUMBER, text))
        elif kind == "eq":
            tokens.append((_PUNCT, "="))
        elif kind == "punct":
            tokens.append((_PUNCT, text))
        else:  # blob literal or a character SQLite does not accept here
            tokens.append((_ILLEGAL, text))
    out.append((tokens, sql[start:]))
    return out


def _is_name(tok: _Token) -> bool:
    return tok[0] in (_WORD, _STRING)


def _parse_journal_pragma(tokens: List[_Token]) -> Tuple[bool, Optional[str], Optional[str]]:
    """(is a journal_mode pragma, schema, value or None) for one statement's tokens.

    Grammar (parse.y): PRAGMA nm [. nm] [ (= | ==) nmnum | ( nmnum ) ]
    where nmnum is a name, a string, ON/DELETE/DEFAULT, or [+|-] number.
    """
    n = len(tokens)
    if n < 2 or tokens[0][0] != _WORD or ascii_lower(tokens[0][1]) != "pragma":
        return False, None, None
    i = 1
    schema: Optional[str] = None
    if not _is_name(tokens[i]):
        return False, None, None
    name = tokens[i][1]
    i += 1
    if i < n and tokens[i] == (_PUNCT, "."):
        if i + 1 >= n or not _is_name(tokens[i + 1]):
            return False, None, None
        schema, name = name, tokens[i + 1][1]
        i += 2
    if ascii_lower(name) != "journal_mode":
        return False, None, None
    if i == n:
        return True, schema, None
    if tokens[i] == (_PUNCT, "="):
        value, i = _parse_nmnum(tokens, i + 1)
    elif tokens[i] == (_PUNCT, "("):
        value, i = _parse_nmnum(tokens, i + 1)
        if value is None or i >= n or tokens[i] != (_PUNCT, ")"):
            return False, None, None
        i += 1
    else:
        return False, None, None
    if value is None or i != n:
        return False, None, None
    return True, schema, value


def _parse_nmnum(tokens: List[_Token], i: int) -> Tuple[Optional[str], int]:
    n = len(tokens)
    if i >= n:
        return None, i
    kind, text = tokens[i]
    if kind in (_WORD, _STRING):
        return text, i + 1
    if kind == _NUMBER:
        return text, i + 1
    if kind == _PUNCT and text in "+-" and i + 1 < n and tokens[i + 1][0] == _NUMBER:
        return (text if text == "-" else "") + tokens[i + 1][1], i + 2
    return None, i


def scan_uncached(sql: str) -> Optional[Plan]:
    """Plan for ``sql``, or None when it asks nothing of the journal mode."""
    if "journal_mode" not in ascii_lower(sql):
        return None
    requests: List[Request] = []
    only_pragmas = True
    for tokens, text in _statements(sql):
        if not tokens:
            continue
        is_pragma, schema, value = _parse_journal_pragma(tokens)
        if not is_pragma:
            only_pragmas = False
            continue
        mode = mode_for_value(value) if value is not None else None
        if mode is not None:
            requests.append(Request(schema, mode, text))
    if not requests:
        return None
    return Plan(tuple(requests), only_pragmas)


_CACHE: Dict[str, Optional[Plan]] = {}
CACHE_MAX_ENTRIES = 2048
CACHE_MAX_SQL_LENGTH = 4096


def scan(sql: object) -> Optional[Plan]:
    """Memoized ``scan_uncached``. Never raises: non-text SQL is left for sqlite3 to reject.

    The cache is bounded both in entries (cleared when full, so f-string SQL that is unique
    every time cannot grow it) and in key size (long scripts are scanned, not stored).
    """
    try:
        return _CACHE[sql]  # type: ignore[index]
    except KeyError:
        pass
    except TypeError:  # unhashable: sqlite3 raises its own error for it
        return None
    if not isinstance(sql, str):
        return None
    plan = scan_uncached(sql)
    if len(sql) <= CACHE_MAX_SQL_LENGTH:
        if len(_CACHE) >= CACHE_MAX_ENTRIES:
            _CACHE.clear()
        _CACHE[sql] = plan
    return plan


def cache_size() -> int:
    return len(_CACHE)
