"""Find ``PRAGMA [schema.]journal_mode = MODE`` requests in SQL text, the way SQLite does.

This is a port of the parts of SQLite that decide it (checked against SQLite 3.40.1):

* the tokenizer, src/tokenize.c ``sqlite3GetToken``: white space includes a UTF-8 BOM at the
  start of a token and ``\\v`` after another white-space character; ``--`` and ``/* */``
  comments (an unterminated ``/*`` runs to the end, but a ``/*`` that ends the text is a slash);
  ``'strings'``; ``"names"``, ```names``` and ``[names]``; numbers, where ``1abc`` or ``0x`` is
  an unrecognized token; Tcl-style variables such as ``$a(;)``, which may hold a semicolon;
* the statement loop of ``executescript()``: statements run one at a time, and the first one
  that SQLite rejects (an unrecognized token, a word that starts no statement, a malformed
  PRAGMA) stops the script, so nothing from there on is a request; empty statements (``;;``)
  belong to the statement after them, as in ``sqlite3_sql()``; a ``CREATE TRIGGER`` body holds
  semicolons up to ``; END``, and only DML may start a statement inside it;
* the PRAGMA grammar, src/parse.y: ``PRAGMA nm [. nm] [(= | ==) nmnum | ( nmnum )]`` where nm
  is a word, a quoted name or a string, nmnum also allows ON, DELETE, DEFAULT and [+|-]number,
  and the reserved words (SELECT, TABLE, ...) cannot be names;
* the journal-mode lookup, src/pragma.c: a value selects the first mode of which it is an
  ASCII-case-insensitive prefix; anything else is a query. EXPLAIN runs nothing.

Names are compared with ASCII-only case folding, like ``sqlite3StrICmp``: the Kelvin sign does
not fold to ``k`` and a Turkish dotted I does not fold to ``i``.

What the scanner cannot see: semantic errors, and the grammar of statements other than PRAGMA.
A request naming a schema that is not attached, or coming after a statement that SQLite
rejects for such a reason (``SELECT * FROM no_such_table``, ``SELECT 1 SELECT 2``), is still
reported. That errs on the side of guarding a statement that will not run, never of missing
one that will. The same holds for ``PRAGMA journal_mode=OFF`` on a connection in defensive
mode, where SQLite treats OFF as a query.

Python's part: ``executescript()`` on 3.8-3.10 stops silently at the first NUL character;
3.11+ refuse a script holding one (and ``execute()`` refuses NUL everywhere). A lone surrogate
cannot be encoded, so such text never reaches SQLite.

``scan()`` sits on the hot path of every ``execute`` and is memoized in a bounded dict:
ordinary statements cost one dict lookup.
"""
from __future__ import annotations

import re
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple, Union, cast

#: SQLite's journal modes in the order pragma.c tries them; a value matches by prefix.
JOURNAL_MODES = ("delete", "persist", "off", "truncate", "memory", "wal")
WAL = "wal"

_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}

#: Python < 3.11 passes executescript()'s text to SQLite NUL-terminated: the script ends there.
_NUL_ENDS_SCRIPT = sys.version_info < (3, 11)

# Token kinds (white space and comments are dropped)
_SEMI, _WORD, _QNAME, _STRING, _NUMBER, _EQ, _LP, _RP, _DOT, _PLUS, _MINUS, _OTHER, _ILLEGAL = (
    range(13))

# IdChar(): alphanumerics, '_', '$' and every non-ASCII character. Written as the complement
# of the other ASCII characters: a class spanning U+0080..U+10FFFF costs sre ~15 ms to compile,
# its complement ~0.1 ms, and this module is imported at a process's first connect().
_IDC = r"^\x00-\x23\x25-\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f"
_ID_START = r"[^\x00-\x40\x5b-\x5e\x60\x7b-\x7f]"  # letters, '_' and non-ASCII
_NUM_TAIL = "[" + _IDC + "]*"
_TOKEN_RE = re.compile(
    r"""
      (?P<space>[\t\n\f\r\x20][\t\n\v\f\r\x20]*|\ufeff)
    | (?P<word>(?![xX]')IDSTART[IDC]*)
    | (?P<comment>--[^\n]*|/\*(?:.*?\*/|.+))
    | (?P<string>'[^']*(?:''[^']*)*'(?!'))
    | (?P<dq>"[^"]*(?:""[^"]*)*"(?!"))
    | (?P<bq>`[^`]*(?:``[^`]*)*`(?!`))
    | (?P<br>\[[^\]]*\])
    | (?P<unterminated>['"`\[].*)
    | (?P<blob>[xX]'(?:[0-9a-fA-F]{2})*')
    | (?P<badblob>[xX]'[^']*'?)
    | (?P<number>(?:0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?
                  |\.[0-9]+(?:[eE][+-]?[0-9]+)?)NUMTAIL)
    | (?P<var>\?[0-9]*|[$@\#:](?:[IDC]|::)*(?:\([^\t\n\v\f\r\x20)]*\)?)?)
    | (?P<semi>;)
    | (?P<eq>==?)
    | (?P<lp>\()
    | (?P<rp>\))
    | (?P<dot>\.)
    | (?P<plus>\+)
    | (?P<op>->>?|<<|<[=>]?|>>|>=?|!=|\|\|?|[*/%,&~])
    | (?P<minus>-)
    | (?P<illegal>.)
    """.replace("NUMTAIL", "(?P<numtail>" + _NUM_TAIL + ")")
    .replace("IDC", _IDC)
    .replace("IDSTART", _ID_START),
    re.VERBOSE | re.DOTALL,
)
_VAR_NAME_RE = re.compile("[$@#:]((?:[" + _IDC + "]|::)*)(.*)", re.DOTALL)

_SIMPLE_KINDS = {
    "semi": _SEMI, "eq": _EQ, "lp": _LP, "rp": _RP, "dot": _DOT, "plus": _PLUS,
    "minus": _MINUS, "op": _OTHER, "blob": _OTHER, "word": _WORD, "string": _STRING,
    "dq": _QNAME, "bq": _QNAME, "br": _QNAME, "unterminated": _ILLEGAL,
    "badblob": _ILLEGAL, "illegal": _ILLEGAL,
}

#: Keywords the grammar never accepts as a name (no %fallback to ID), SQLite 3.40.
_RESERVED = frozenset("""
    add all alter and as autoincrement between case check collate commit constraint create
    default deferrable delete distinct drop else escape except exists foreign from group having
    in index insert intersect into is isnull join limit not nothing notnull null on or order
    primary references returning select set table then to transaction union unique update
    using values when where
""".split())
#: Reserved words that a pragma value may still be (``nmnum ::= ON | DELETE | DEFAULT``).
_VALUE_KEYWORDS = frozenset(("on", "delete", "default"))
#: Words that can start a statement (``cmd`` in parse.y).
_COMMANDS = frozenset("""
    alter analyze attach begin commit create delete detach drop end explain insert pragma
    reindex release replace rollback savepoint select update vacuum values with
""".split())
#: Words that can start a statement inside a trigger body (``trigger_cmd``), or end it.
_TRIGGER_BODY = frozenset(("update", "insert", "replace", "delete", "select", "with",
                           "values", "end"))

_Token = Tuple[int, str, int]  # (kind, text: dequoted for names and strings, end offset)


class Request(NamedTuple):
    """One journal-mode change request: ``schema`` is None when the pragma names none."""

    schema: Optional[str]
    mode: str  # one of JOURNAL_MODES
    statement: str  # the statement's own text (as sqlite3_sql() gives it), for running it alone

    @property
    def is_wal(self) -> bool:
        return self.mode == WAL


class Plan(NamedTuple):
    """What a piece of SQL asks of the journal mode."""

    requests: Tuple[Request, ...]
    #: every statement in the text is a journal-mode *request* (no query, no other statement)
    #: and SQLite accepts them all: the script can be run one request at a time, losing nothing
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


def _tokenize(sql: str) -> List[_Token]:
    """SQLite's tokens, without white space and comments."""
    out: List[_Token] = []
    append = out.append
    for m in _TOKEN_RE.finditer(sql):
        kind = m.lastgroup
        if kind == "space" or kind == "comment":
            continue
        text = m.group()
        if kind == "number":
            append((_ILLEGAL if m.group("numtail") else _NUMBER, text, m.end()))
        elif kind == "var":
            append((_var_kind(text), text, m.end()))
        elif kind == "string" or kind == "dq" or kind == "bq":
            q = text[0]
            append((_SIMPLE_KINDS[kind], text[1:-1].replace(q + q, q), m.end()))
        elif kind == "br":
            append((_QNAME, text[1:-1], m.end()))
        else:
            append((_SIMPLE_KINDS[kind], text, m.end()))  # type: ignore[index]
    return out


def _var_kind(text: str) -> int:
    if text[0] == "?":
        return _OTHER
    m = _VAR_NAME_RE.match(text)
    assert m is not None
    if not m.group(1).replace("::", ""):
        return _ILLEGAL  # no name: "$", ":" or "@" alone
    if m.group(2) and not m.group(2).endswith(")"):
        return _ILLEGAL  # "$a(" without its ")"
    return _OTHER


def _word(tok: _Token) -> Optional[str]:
    return ascii_lower(tok[1]) if tok[0] == _WORD else None


_ERROR = object()  # the statement fails: it and everything after it never run
_PragmaFound = Tuple[Optional[str], Optional[str]]  # (schema, value or None)
_Found = Union[None, object, _PragmaFound]


def _name(tok: _Token) -> Optional[str]:
    kind, text, _ = tok
    if kind == _WORD:
        return None if ascii_lower(text) in _RESERVED else text
    if kind == _QNAME or kind == _STRING:
        return text
    return None


def _value(toks: List[_Token], i: int) -> Tuple[Optional[str], int]:
    """``nmnum`` or ``minus_num`` at i: (value text as pragma.c sees it, next index)."""
    if i >= len(toks):
        return None, i
    kind, text, _ = toks[i]
    if kind == _WORD:
        low = ascii_lower(text)
        if low in _RESERVED and low not in _VALUE_KEYWORDS:
            return None, i
        return text, i + 1
    if kind == _QNAME or kind == _STRING or kind == _NUMBER:
        return text, i + 1
    if (kind == _PLUS or kind == _MINUS) and i + 1 < len(toks) and toks[i + 1][0] == _NUMBER:
        return ("-" if kind == _MINUS else "") + toks[i + 1][1], i + 2
    return None, i


def _pragma(toks: List[_Token], i: int) -> Tuple[int, _Found]:
    """The tokens after PRAGMA: (index of the ending ';' or len, (schema, value) / None)."""
    n = len(toks)
    name = _name(toks[i]) if i < n else None
    if name is None:
        return n, _ERROR
    i += 1
    schema: Optional[str] = None
    if i < n and toks[i][0] == _DOT:
        second = _name(toks[i + 1]) if i + 1 < n else None
        if second is None:
            return n, _ERROR
        schema, name = name, second
        i += 2
    value: Optional[str] = None
    if i < n and toks[i][0] == _EQ:
        value, i = _value(toks, i + 1)
        if value is None:
            return n, _ERROR
    elif i < n and toks[i][0] == _LP:
        value, i = _value(toks, i + 1)
        if value is None or i >= n or toks[i][0] != _RP:
            return n, _ERROR
        i += 1
    if i < n and toks[i][0] != _SEMI:
        return n, _ERROR
    if ascii_lower(name) != "journal_mode":
        return i, None
    return i, (schema, value)


def _trigger(toks: List[_Token], i: int) -> Tuple[int, _Found]:
    """CREATE TRIGGER: its body holds ';'s; it ends at '; END' followed by ';' or the end."""
    n = len(toks)
    while i < n:
        kind = toks[i][0]
        if kind == _ILLEGAL:
            return n, _ERROR
        if kind == _SEMI:
            word = _word(toks[i + 1]) if i + 1 < n else None
            if word not in _TRIGGER_BODY:
                return n, _ERROR
            if word == "end":
                if i + 2 >= n:
                    return n, None
                if toks[i + 2][0] == _SEMI:
                    return i + 2, None
                return n, _ERROR
        i += 1
    return n, _ERROR  # incomplete input


def _statement(toks: List[_Token], i: int) -> Tuple[int, _Found]:
    """The statement starting at toks[i]: (index of its ';' or len, what it is).

    What it is: _ERROR when SQLite rejects it, (schema, value or None) for a journal_mode
    pragma, None for anything else.
    """
    n = len(toks)
    word = _word(toks[i])
    explain = word == "explain"
    if explain:
        i += 1
        if i < n and _word(toks[i]) == "query":
            if i + 1 < n and _word(toks[i + 1]) == "plan":
                i += 2
            else:
                return n, _ERROR
        word = _word(toks[i]) if i < n else None
        if word == "explain":
            return n, _ERROR
    if word not in _COMMANDS:
        return n, _ERROR
    if word == "pragma":
        end, found = _pragma(toks, i + 1)
        if explain and found is not _ERROR:
            return end, None  # EXPLAIN runs nothing
        return end, found
    if word == "create":
        j = i + 1
        if j < n and _word(toks[j]) in ("temp", "temporary"):
            j += 1
        if j < n and _word(toks[j]) == "trigger":
            return _trigger(toks, j + 1)
    # Another statement: its grammar is not checked here, but a token SQLite cannot read
    # fails it.
    while i < n and toks[i][0] != _SEMI:
        if toks[i][0] == _ILLEGAL:
            return n, _ERROR
        i += 1
    return i, None


def scan_uncached(sql: str) -> Optional[Plan]:
    """Plan for ``sql``, or None when it asks nothing of the journal mode."""
    # str.lower() is the fastest pre-check and finds every ASCII-case variant (it may also
    # find a few non-ASCII ones, which the parse below then rejects).
    if "journal_mode" not in sql.lower():
        return None
    if not sql.isascii():
        try:
            sql.encode("utf-8")
        except UnicodeEncodeError:
            return None  # sqlite3 raises before SQLite sees anything
    if "\0" in sql:
        if not _NUL_ENDS_SCRIPT:
            return None  # ValueError before anything runs
        sql = sql[: sql.index("\0")]
    toks = _tokenize(sql)
    n = len(toks)
    requests: List[Request] = []
    only_pragmas = True
    start = 0  # where the current statement's text begins
    i = 0
    while i < n:
        if toks[i][0] == _SEMI:  # an empty statement: SQLite reads on into the next one
            i += 1
            continue
        end, found = _statement(toks, i)
        if found is _ERROR:
            only_pragmas = False
            break  # SQLite stops the script here
        stop = toks[end][2] if end < n else len(sql)
        text = sql[start:stop]
        start = stop
        i = end + 1
        if found is None:
            only_pragmas = False
            continue
        schema, value = cast(_PragmaFound, found)
        mode = mode_for_value(value) if value is not None else None
        if mode is not None:
            requests.append(Request(schema, mode, text))
        else:
            only_pragmas = False  # a query: it has effects (errors) of its own
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
    except Exception:  # unhashable (or a hash that raises): sqlite3 raises its own error
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
