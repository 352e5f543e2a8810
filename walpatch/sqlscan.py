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
#: Every keyword of SQLite 3.40 (tool/mkkeywordhash.c): as an ATTACH/DETACH operand a keyword
#: may be an expression (NULL, CURRENT_DATE), so its text is not taken as a name.
_KEYWORDS = frozenset("""
    abort action add after all alter always analyze and as asc attach autoincrement before
    begin between by cascade case cast check collate column commit conflict constraint create
    cross current current_date current_time current_timestamp database default deferred
    deferrable delete desc detach distinct do drop end each else escape except exclusive
    exclude exists explain fail filter first following for foreign from full generated glob
    group groups having if ignore immediate in index indexed initially inner insert instead
    intersect into is isnull join key last left like limit match materialized natural no not
    nothing notnull null nulls of offset on or order others outer over partition plan pragma
    preceding primary query raise range recursive references regexp reindex release rename
    replace restrict returning right rollback row rows savepoint select set table temp
    temporary then ties to transaction trigger unbounded union unique update using vacuum
    values view virtual when where window with within without
""".split())
#: Words that can start a statement (``cmd`` in parse.y).
_COMMANDS = frozenset("""
    alter analyze attach begin commit create delete detach drop end explain insert pragma
    reindex release replace rollback savepoint select update vacuum values with
""".split())
#: Words that can start a statement inside a trigger body (``trigger_cmd``), or end it.
_TRIGGER_BODY = frozenset(("update", "insert", "replace", "delete", "select", "with",
                           "values", "end"))

_Token = Tuple[int, str, int, int]  # (kind, text: dequoted for names and strings, end, start)


class Request(NamedTuple):
    """One journal-mode change request: ``schema`` is None when the pragma names none."""

    schema: Optional[str]
    mode: str  # one of JOURNAL_MODES
    statement: str  # the statement's own text (as sqlite3_sql() gives it), for running it alone

    @property
    def is_wal(self) -> bool:
        return self.mode == WAL


class Attach(NamedTuple):
    """An ``ATTACH`` that runs before a later request of the same script.

    ``file`` is the file name exactly as SQLite gets it (resolved against the working
    directory by the guard, when the script runs), ``schema`` the name it is attached as.
    Either is None when the text alone cannot tell (an expression, a parameter, a keyword, a
    statement too long to read): the guard then fails closed for downgrades.
    """

    schema: Optional[str]
    file: Optional[str]
    why: str = ""  # what could not be known, for the refusal message


class Detach(NamedTuple):
    """A ``DETACH`` before a later request; ``schema`` None when it cannot be known."""

    schema: Optional[str]


class Single(NamedTuple):
    """How ``execute()`` sees the text: its first statement is ``request``.

    ``clean``: nothing but white space and comments that every CPython accepts follows that
    statement, so sqlite3 will run it; otherwise sqlite3 may reject the whole text before
    running anything ("You can only execute one statement at a time"), which the guard asks
    sqlite3 itself. ``start``: offset of the statement's first token.
    """

    request: Request
    start: int
    clean: bool


Step = Union[Request, Attach, Detach]


class Plan(NamedTuple):
    """What a piece of SQL asks of the journal mode.

    Contract with connection.py (and any C fast path): ``_CACHE[sql]`` is either None
    ("nothing to guard") or a Plan, which is always truthy (``requests`` is never empty).
    """

    requests: Tuple[Request, ...]
    #: every statement in the text is a journal-mode *request* (no query, no other statement)
    #: and SQLite accepts them all: the script can be run one request at a time, losing nothing
    only_journal_pragmas: bool
    #: the requests with the ATTACH/DETACH statements before them, in script order
    steps: Tuple[Step, ...] = ()
    #: the text as ``execute()``/``executemany()`` take it: None when its first statement is
    #: no request, or when they refuse the text anyway (a NUL character)
    single: Optional[Single] = None


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
    kind, text = tok[0], tok[1]
    if kind == _WORD:
        return None if ascii_lower(text) in _RESERVED else text
    if kind == _QNAME or kind == _STRING:
        return text
    return None


def _value(toks: List[_Token], i: int) -> Tuple[Optional[str], int]:
    """``nmnum`` or ``minus_num`` at i: (value text as pragma.c sees it, next index)."""
    if i >= len(toks):
        return None, i
    kind, text = toks[i][0], toks[i][1]
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


# --- the cheap part: where could a request be at all? ------------------------------------
#
# Every request names the pragma journal_mode, and every ASCII-case spelling of that name has
# an underscore at offset 7. So: find underscores (str.find: memchr speed, no copy), look at
# each one, and switch to one compiled regex pass for the rest when there are many. A site
# counts only where SQLite could read ``journal_mode`` as a whole name (``journal_mode_log``,
# ``$journal_mode`` are not) that may follow ``PRAGMA`` or ``schema.`` (``, journal_mode``,
# ``SELECT journal_mode`` cannot): a superset of the real requests, checked exactly below.

_MODE_TAIL = re.compile("_[mM][oO][dD][eE](?![" + _IDC + "])")
_IDC_ASCII = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")
_GAP_CHARS = " \t\n\f\r\v\ufeff"
_OPEN_QUOTES = "\"'`["
_CONTEXT = 128  # characters looked at before a site
_FIND_HITS = 64  # underscores looked at one by one before the regex pass takes over
_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_idc(ch: str) -> bool:
    return ch in _IDC_ASCII or ch > "\x7f"


def _may_follow_pragma(sql: str, p: int) -> bool:
    """Superset test: can the name starting at ``p`` be the name of a PRAGMA statement?

    Before it, SQLite can only have ``PRAGMA`` or ``nm .``, then white space and comments. So
    the text before it (white space skipped) ends with "pragma", '.', the '/' of a comment, or
    a line whose ``--`` comment the newline ended; anything else (',', '(', "select") cannot.
    """
    if p > 0 and sql[p - 1] in _OPEN_QUOTES:
        p -= 1
    lo = max(0, p - _CONTEXT)
    window = sql[lo:p]
    body = window.rstrip(_GAP_CHARS)
    if not body:
        return lo > 0  # white space as far as we look (at the very start: no PRAGMA)
    if "\n" in window[len(body):]:
        line = body.rsplit("\n", 1)
        if "--" in line[-1] or (len(line) == 1 and lo > 0):
            return True
    if body[-1] in "/.":
        return True
    return ascii_lower(body[-6:]) == "pragma"


def _site(sql: str, underscore: int) -> int:
    """End offset of a possible request's pragma name whose underscore is at ``underscore``,
    or -1."""
    p = underscore - 7
    end = underscore + 5
    if p < 0 or (end < len(sql) and _is_idc(sql[end])):  # journal_mode_log, msg_id, ...
        return -1
    name = sql[p:end]
    if name != "journal_mode" and not (name.isascii() and name.lower() == "journal_mode"):
        return -1
    if p > 0 and _is_idc(sql[p - 1]) and sql[p - 1] != "\ufeff":  # a BOM may be white space
        return -1
    return end if _may_follow_pragma(sql, p) else -1


def last_site(sql: str) -> int:
    """End offset of the last place in ``sql`` where a journal-mode request could be, or -1.

    Cost: one memchr-speed pass when the text has no underscore; otherwise a look at each
    underscore (the first few) and one compiled-regex pass, never a copy of the text.
    """
    last = -1
    find = sql.find
    i = find("_", 7)
    hits = 0
    while i >= 0:
        hits += 1
        if hits > _FIND_HITS:
            for m in _MODE_TAIL.finditer(sql, i):
                site = _site(sql, m.start())
                if site > last:
                    last = site
            return last
        site = _site(sql, i)
        if site > last:
            last = site
        i = find("_", i + 1)
    return last


# --- the exact part: SQLite's statement loop, streamed -----------------------------------

_FullToken = _Token


class _Reader:
    """SQLite's significant tokens one at a time: no list of the whole text is ever built."""

    __slots__ = ("sql", "pos")

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.pos = 0

    def next(self) -> Optional[_FullToken]:
        sql = self.sql
        match = _TOKEN_RE.match
        while True:
            m = match(sql, self.pos)
            if m is None:
                return None
            start = self.pos
            self.pos = m.end()
            kind = m.lastgroup
            if kind == "space" or kind == "comment":
                continue
            return _make_token(m, kind, start)


def _make_token(m: "re.Match[str]", kind: Optional[str], start: int) -> _FullToken:
    text = m.group()
    if kind == "number":
        return (_ILLEGAL if m.group("numtail") else _NUMBER, text, m.end(), start)
    if kind == "var":
        return (_var_kind(text), text, m.end(), start)
    if kind == "string" or kind == "dq" or kind == "bq":
        q = text[0]
        return (_SIMPLE_KINDS[kind], text[1:-1].replace(q + q, q), m.end(), start)
    if kind == "br":
        return (_QNAME, text[1:-1], m.end(), start)
    return (_SIMPLE_KINDS[kind], text, m.end(), start)  # type: ignore[index]


_PRAGMA_MAX_TOKENS = 10  # PRAGMA a . b ( - 1 ) ; is the longest valid form
_ATTACH_MAX_TOKENS = 64  # a longer ATTACH is not read (its names are then unknown)
_Op = Optional[Union[Attach, Detach]]
_Stmt = Tuple[_Found, int, _Op]  # (what it is, end offset of its text, ATTACH/DETACH)
_FAILED: _Stmt = (_ERROR, 0, None)


def _skip(rd: _Reader) -> _Stmt:
    """The rest of a statement whose grammar is not checked: only a token SQLite cannot
    read fails it."""
    while True:
        t = rd.next()
        if t is None:
            return None, len(rd.sql), None
        if t[0] == _SEMI:
            return None, t[2], None
        if t[0] == _ILLEGAL:
            return _FAILED


def _collect(rd: _Reader, first: _FullToken, cap: int) -> Tuple[List[_Token], int, bool]:
    """Tokens from ``first`` up to and including ';': (tokens, end offset, complete).
    Not complete: more than ``cap`` tokens (the reader stands after the last one read)."""
    toks: List[_Token] = [first]
    while True:
        t = rd.next()
        if t is None:
            return toks, len(rd.sql), True
        toks.append(t)
        if t[0] == _SEMI:
            return toks, t[2], True
        if len(toks) > cap:
            return toks, 0, False


def _trigger_stream(rd: _Reader) -> _Stmt:
    """CREATE TRIGGER: its body holds ';'s; it ends at '; END' followed by ';' or the end."""
    while True:
        t = rd.next()
        if t is None or t[0] == _ILLEGAL:
            return _FAILED  # incomplete input, or a token SQLite cannot read
        if t[0] == _SEMI:
            following = rd.next()
            word = _word(following) if following is not None else None
            if word not in _TRIGGER_BODY:
                return _FAILED
            if word == "end":
                after = rd.next()
                if after is None:
                    return None, len(rd.sql), None
                if after[0] == _SEMI:
                    return None, after[2], None
                return _FAILED


def _attach_name(tok: _Token) -> Optional[str]:
    """The text SQLite makes of a one-token ATTACH/DETACH operand: a name or string is taken
    as text (resolveAttachExpr turns an identifier into a string); a keyword, number,
    variable or anything else is not known here."""
    kind, text, _ = tok[0], tok[1], tok[2]
    if kind == _STRING or kind == _QNAME:
        return text
    if kind == _WORD and ascii_lower(text) not in _KEYWORDS:
        return text
    return None


def _attach_op(toks: List[_Token], complete: bool) -> Union[Attach, Detach]:
    """ATTACH [DATABASE] file AS schema [KEY k] / DETACH [DATABASE] schema (tokens end with
    their ';' when there is one)."""
    if toks and toks[-1][0] == _SEMI:
        toks = toks[:-1]
    detach = _word(toks[0]) == "detach"
    i = 1
    if len(toks) > 2 and _word(toks[1]) == "database" and _word(toks[2]) != "as":
        i = 2
    if detach:
        if complete and len(toks) == i + 1:
            return Detach(_attach_name(toks[i]))
        return Detach(None)
    if not complete:
        return Attach(None, None, "an ATTACH statement too long to read")
    file: Optional[str] = None
    schema: Optional[str] = None
    why = []
    as_at = [k for k in range(i, len(toks)) if _word(toks[k]) == "as"]
    if as_at:
        if as_at[0] == i + 1:
            file = _attach_name(toks[i])
        rest = toks[as_at[-1] + 1:]
        if len(as_at) == 1:
            for k, tok in enumerate(rest):
                if _word(tok) == "key":
                    rest = rest[:k]
                    break
        if len(rest) == 1:
            schema = _attach_name(rest[0])
    if file is None:
        why.append("file is an expression, a parameter or a keyword")
    if schema is None:
        why.append("schema name is an expression or a keyword")
    return Attach(schema, file, "ATTACH whose " + " and ".join(why) if why else "")


def _statement_at(rd: _Reader, tok: _FullToken) -> _Stmt:
    """The statement whose first token is ``tok``."""
    word = _word(tok)
    explain = word == "explain"
    if explain:
        nxt = rd.next()
        if nxt is not None and _word(nxt) == "query":
            nxt = rd.next()
            if nxt is None or _word(nxt) != "plan":
                return _FAILED
            nxt = rd.next()
        if nxt is None:
            return _FAILED
        tok = nxt
        word = _word(tok)
        if word == "explain":
            return _FAILED
    if word not in _COMMANDS:
        return _FAILED
    if word == "pragma":
        toks, end, complete = _collect(rd, tok, _PRAGMA_MAX_TOKENS)
        if not complete:
            return _FAILED
        i, found = _pragma(toks, 1)
        if found is _ERROR:
            return _FAILED
        stop = toks[i][2] if i < len(toks) else end
        return (None if explain else found), stop, None
    if word == "create":
        nxt = rd.next()
        if nxt is not None and _word(nxt) in ("temp", "temporary"):
            nxt = rd.next()
        if nxt is not None and _word(nxt) == "trigger":
            return _trigger_stream(rd)
        if nxt is None:
            return None, len(rd.sql), None
        if nxt[0] == _SEMI:
            return None, nxt[2], None
        if nxt[0] == _ILLEGAL:
            return _FAILED
        return _skip(rd)
    if (word == "attach" or word == "detach") and not explain:
        toks, end, complete = _collect(rd, tok, _ATTACH_MAX_TOKENS)
        if any(t[0] == _ILLEGAL for t in toks):
            return _FAILED
        op = _attach_op(toks, complete)
        if not complete:
            found, end, _ = _skip(rd)
            if found is _ERROR:
                return _FAILED
        return None, end, op
    return _skip(rd)


def _tail_is_clean(sql: str, pos: int) -> bool:
    """Only white space (space, tab, CR, LF) and comments from ``pos`` on: what every
    CPython's "one statement at a time" check accepts."""
    match = _TOKEN_RE.match
    while True:
        m = match(sql, pos)
        if m is None:
            return True
        kind = m.lastgroup
        if kind == "comment":
            pass
        elif kind == "space":
            if m.group().strip(" \t\r\n"):
                return False
        else:
            return False
        pos = m.end()


def _scan_exact(sql: str, limit: int, nul: bool) -> Optional[Plan]:
    """SQLite's statement loop over ``sql`` up to the statement holding offset ``limit``
    (no request can come after it)."""
    rd = _Reader(sql)
    requests: List[Request] = []
    steps: List[Step] = []
    pending: List[Step] = []  # ATTACH/DETACH not yet followed by a request
    only_pragmas = True
    single: Optional[Single] = None
    first = True
    start = 0  # where the current statement's text begins
    while True:
        tok = rd.next()
        while tok is not None and tok[0] == _SEMI:  # empty statements: read on
            tok = rd.next()
        if tok is None:
            break
        if tok[2] > limit:
            only_pragmas = False  # another statement, and no request in or after it
            break
        found, stop, op = _statement_at(rd, tok)
        if found is _ERROR:
            only_pragmas = False
            break  # SQLite stops the script here
        begin, start = start, stop  # this statement's text is sql[begin:stop]
        was_first, first = first, False
        if op is not None:
            pending.append(op)
            only_pragmas = False
            continue
        if found is None:
            only_pragmas = False
            continue
        schema, value = cast(_PragmaFound, found)
        mode = mode_for_value(value) if value is not None else None
        if mode is None:
            only_pragmas = False  # a query: it has effects (errors) of its own
            continue
        request = Request(schema, mode, sql[begin:stop])
        requests.append(request)
        steps.extend(pending)
        pending = []
        steps.append(request)
        if was_first and not nul:
            single = Single(request, tok[3], _tail_is_clean(sql, stop))
    if not requests:
        return None
    return Plan(tuple(requests), only_pragmas, tuple(steps), single)


def scan_uncached(sql: str) -> Optional[Plan]:
    """Plan for ``sql``, or None when it asks nothing of the journal mode."""
    return _scan(sql)[0]


def _scan(sql: str) -> Tuple[Optional[Plan], bool]:
    """(plan, whether the exact scan ran: the text has a place a request could be)."""
    limit = last_site(sql)
    if limit < 0:
        return None, False
    nul = "\0" in sql
    if nul:
        if not _NUL_ENDS_SCRIPT:
            return None, False  # ValueError before anything runs
        sql = sql[: sql.index("\0")]
        limit = min(limit, len(sql))
    if not sql.isascii() and _SURROGATE.search(sql):
        return None, False  # sqlite3 cannot encode it: it raises before SQLite sees anything
    return _scan_exact(sql, limit, nul), True


_CACHE: Dict[str, Optional[Plan]] = {}
CACHE_MAX_ENTRIES = 2048
CACHE_MAX_SQL_LENGTH = 4096  # any result is kept for text up to this length
#: Longer text is kept only when the exact scan ran (the cheap prefilter found a place a
#: request could be; otherwise scanning again costs about what hashing it does), up to this
#: length each, and all keys together up to CACHE_MAX_CHARS characters: bounded by size,
#: not only by count.
CACHE_MAX_LONG_SQL_LENGTH = 256 * 1024
CACHE_MAX_CHARS = 4 * 1024 * 1024
_cache_chars = 0


def scan(sql: object) -> Optional[Plan]:
    """Memoized ``scan_uncached``. Never raises: non-text SQL is left for sqlite3 to reject.

    The cache is bounded in entries and in characters (cleared when either is full, so
    f-string SQL that is unique every time cannot grow it).
    """
    global _cache_chars
    try:
        return _CACHE[sql]  # type: ignore[index]
    except KeyError:
        pass
    except Exception:  # unhashable (or a hash that raises): sqlite3 raises its own error
        return None
    if not isinstance(sql, str):
        return None
    plan, exact = _scan(sql)
    size = len(sql)
    if size <= CACHE_MAX_SQL_LENGTH or (exact and size <= CACHE_MAX_LONG_SQL_LENGTH):
        if len(_CACHE) >= CACHE_MAX_ENTRIES or _cache_chars + size > CACHE_MAX_CHARS:
            _CACHE.clear()
            _cache_chars = 0
        _CACHE[sql] = plan
        _cache_chars += size
    return plan


def cache_size() -> int:
    return len(_CACHE)
