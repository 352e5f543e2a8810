"""Generator, runner and judge of the differential harness (docs/differential.md).

* :func:`programs` is a hypothesis strategy of small programs: connect variants (factories,
  URIs, odd paths, text/row factories), entry points, ATTACH/DETACH, scripts, journal-mode
  requests in every spelling mixed with ordinary statements, threads sharing a connection,
  ``allow_downgrade()`` blocks and observe mode. A program is a dict of Python snippets (see
  tests/diffworker.py), so what ran is exactly what :func:`render` prints as a reproducer.
* :class:`WorkerPair` keeps two long-lived children (tests/diffworker.py), one plain and one
  with walpatch, and runs each program in both (one pair of interpreter starts per session).
* :func:`compare` judges a pair of results; every difference it lets through is decided by one
  function, :func:`allowed_difference`, which lists the documented refusals and retries.

``KNOWN_OPEN`` names the generator features that trigger defects listed in issue 10 and being
fixed on other branches. While a name is in it, the CI generator does not produce that
construct (the test prints which ones are left out). Empty it when the fixes are merged.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from typing import Any, Dict, FrozenSet, List, NamedTuple, Optional, Tuple

from hypothesis import assume
from hypothesis import strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "diffworker.py")

#: feature name -> issue-10 item (or doc reference) of the defect it triggers on today's main.
KNOWN_OPEN_ITEMS: Dict[str, str] = {
    "script_attach": "issue 10 item 1 (ATTACH/DETACH inside executescript not seen)",
    "factory_callable": "issue 10 item 4 (partial/lambda factory: unguarded connection)",
    "threads_text_factory": "issue 10 item 8 (text_factory swapped while another thread reads)",
    "execute_multi": "issue 10 item 12 (multi-statement execute: refusal instead of "
                     "ProgrammingError)",
    "pragma_bindings": "issue 10 item 12 (wrong bindings: refusal instead of ProgrammingError)",
    "uri_memdb": "issue 10 item 13 (vfs=memdb refused when a WAL file of that name exists)",
    "uri_immutable": "issue 10 item 13 (immutable=1 refused)",
    "lock_after_wal": "issue 10 item 16 (guard's read after a WAL request keeps a lock)",
    "text_factory_bytearray": "docs/transparency.md limit 12 (bytearray text_factory)",
    "fault_mmap": "issue 10 item 2 (one mmap ENOMEM during a WAL request: walpatch reverts the "
                  "file to DELETE where plain stays WAL)",
    "text_factory_callable": "README Limits (a documented limit, not a defect being fixed): "
                             "under a text_factory that is any other callable the guard reads "
                             "the database list as blobs, which loads the schema, so lock and "
                             "-wal/-shm state differ from the caller's statement alone",
    "attach_own_file": "fixed on branch attach-own (tests/test_attach_own_file.py): a failed "
                       "WAL request (frequent on a connection that has its own main file "
                       "attached) kept the caller's cursor alive, so close() left the "
                       "transaction open and a -journal (or -wal/-shm) behind; the BUSY that "
                       "walpatch retries there to 'wal' is the allowed contention-retried",
    "script_wal_then_down": "no issue-10 item, harness finding F5 (a mixed script's WAL "
                            "request is verified after the script: a later DELETE in it makes "
                            "walpatch record 'WAL failed' and refuse the next downgrade)",
}
#: Features left out of the CI generator. The lead empties this after merging the fixes.
KNOWN_OPEN: FrozenSet[str] = frozenset({"text_factory_callable"})


def known_open_from_env() -> FrozenSet[str]:
    """``WALPATCH_DIFF_KNOWN_OPEN``: unset -> KNOWN_OPEN; ``none`` -> nothing left out;
    else a comma-separated list of feature names."""
    raw = os.environ.get("WALPATCH_DIFF_KNOWN_OPEN")
    if raw is None:
        return KNOWN_OPEN
    if raw.strip().lower() in ("", "none", "0"):
        return frozenset()
    names = frozenset(x.strip() for x in raw.split(",") if x.strip())
    unknown = names - set(KNOWN_OPEN_ITEMS)
    if unknown:
        raise ValueError(f"unknown WALPATCH_DIFF_KNOWN_OPEN names: {sorted(unknown)}")
    return names


# ---------------------------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------------------------

PRELUDE = '''\
import functools, os, pathlib, sqlite3, threading
conns = {}
class Conn(sqlite3.Connection):
    pass
class Cur(sqlite3.Cursor):
    pass
class ConnCur(sqlite3.Connection):
    def cursor(self, factory=None):
        return super().cursor(factory or Cur)
def dict_rows(cursor, row):
    return {d[0]: v for d, v in zip(cursor.description, row)}
def upper_text(b):
    return b.decode("utf-8", "replace").upper()
'''

FILE_NAMES = ["db.sqlite", "a b.db", "ünï ☃.db", "q?x#y%z.db", "it's.db", "w"]
MODES_WAL = ["wal", "WAL", "w", "Wa"]
MODES_DOWN = ["delete", "DELETE", "d", "", "truncate", "persist", "memory", "off", "t", "p",
              "m", "o", "Trunc"]
MODES_UNKNOWN = ["wall", "bogus", "deletex"]


class Step(NamedTuple):
    code: str
    kind: str  # connect | stmt | script | threads | close
    conn: int
    entry: str = ""
    journal: str = ""  # "", "wal", "down", "query": what the SQL asks of the journal mode
    allow_downgrade: bool = False
    wal_before_down: bool = False  # a script with a WAL request before a downgrade


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@st.composite
def journal_request(draw: Any, kind: Optional[str] = None) -> Tuple[str, str]:
    """(sql, "wal"|"down"|"query") in one of SQLite's spellings."""
    kind = kind or draw(st.sampled_from(["wal", "down", "down", "query"]))
    schema = draw(st.sampled_from(["", "", "main.", "MAIN.", '"main".', "aux.", "temp.",
                                   "nosuch."]))
    if kind == "query":
        value = draw(st.sampled_from(["", "", "=" + draw(st.sampled_from(MODES_UNKNOWN))]))
    else:
        word = draw(st.sampled_from(MODES_WAL if kind == "wal" else MODES_DOWN))
        forms = ["='{}'", " = '{}'", "(\"{}\")", "('{}')"]
        if word:
            forms += ["={}", " == {}", "({})"]
        value = draw(st.sampled_from(forms)).format(word)
    lead = draw(st.sampled_from(["", "", "  ", "/* c */ ", "-- c\n"]))
    pragma = draw(st.sampled_from(["PRAGMA", "pragma", "Pragma"]))
    return f"{lead}{pragma} {schema}journal_mode{value}", kind


def _attach_sql(draw: Any, names: List[str]) -> str:
    target = draw(st.sampled_from(names + [":memory:", ""]))
    schema = draw(st.sampled_from(["aux", "aux", "AUX", '"aux"']))
    return f"ATTACH {_sql_str(target)} AS {schema}"


ORDINARY = [
    "CREATE TABLE IF NOT EXISTS t(x)",
    "CREATE TABLE IF NOT EXISTS aux.t(x)",
    "INSERT INTO t VALUES ('é'), (x'00ff'), (1.5), (NULL), (7)",
    "SELECT x, typeof(x) FROM t ORDER BY rowid",
    "SELECT count(*) FROM aux.t",
    "SELECT 'txt', x'6869', 3, 2.5, NULL",
    "BEGIN", "BEGIN IMMEDIATE", "COMMIT", "ROLLBACK",
    "DELETE FROM t WHERE rowid % 2 = 0",
    "SELEC 1", "SELECT * FROM nosuch",
    "PRAGMA user_version", "PRAGMA main.user_version=3",
    "DETACH aux", "DETACH DATABASE aux",
]


@st.composite
def ordinary_sql(draw: Any, names: List[str]) -> str:
    if draw(st.integers(0, 5)) == 0:
        return _attach_sql(draw, names)
    return draw(st.sampled_from(ORDINARY))


@st.composite
def any_sql(draw: Any, names: List[str]) -> Tuple[str, str]:
    if draw(st.booleans()):
        return draw(journal_request())
    return draw(ordinary_sql(names)), ""


ENTRIES = ["conn.execute", "conn.execute", "conn.executemany", "cursor.execute",
           "cursor.executemany", "cursor_cls.execute", "cursor_fn.execute",
           "reused_cursor.execute", "raw_cursor.execute", "closed_cursor.execute"]
#: Entry points the docs list as not guarded (docs/transparency.md limits 5, 6, 7): a plain C
#: cursor. A downgrade through them is as without walpatch.
UNGUARDED_ENTRIES = {"raw_cursor.execute", "reused_cursor.execute"}


def _entry_code(entry: str, c: str, sql: str, params: Optional[str]) -> str:
    args = repr(sql) + (f", {params}" if params is not None else "")
    many = repr(sql) + ", " + (params if params is not None else "[()]")
    return {
        "conn.execute": f"_r = {c}.execute({args})",
        "conn.executemany": f"_r = {c}.executemany({many})",
        "cursor.execute": f"_r = {c}.cursor().execute({args})",
        "cursor.executemany": f"_r = {c}.cursor().executemany({many})",
        "cursor_cls.execute": f"_r = {c}.cursor(Cur).execute({args})",
        "cursor_fn.execute": f"_r = {c}.cursor(factory=lambda k: Cur(k)).execute({args})",
        "reused_cursor.execute": f"_cur = {c}.execute('SELECT 1')\n_r = _cur.execute({args})",
        "raw_cursor.execute": f"_r = sqlite3.Cursor({c}).execute({args})",
        "closed_cursor.execute": f"_cur = {c}.cursor()\n_cur.close()\n_r = _cur.execute({args})",
        "conn.executescript": f"_r = {c}.executescript({sql!r})",
        "cursor.executescript": f"_r = {c}.cursor().executescript({sql!r})",
    }[entry]


@st.composite
def connect_step(draw: Any, k: int, names: List[str], off: FrozenSet[str],
                 threads: bool) -> Tuple[Step, Dict[str, Any]]:
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["file", "file", "file", "uri", "memory", "temp"]))
    kw: List[str] = ["timeout=0.05"]
    if kind == "file":
        form = draw(st.sampled_from(["rel", "abs", "bytes", "path"]))
        target = {"rel": repr(name), "abs": f"os.path.join(D, {name!r})",
                  "bytes": f"os.fsencode({name!r})", "path": f"pathlib.Path({name!r})"}[form]
    elif kind == "uri":
        params = ["", "mode=ro", "mode=rw", "mode=rwc", "vfs=unix-none", "vfs=unix-dotfile",
                  "nolock=1", "cache=shared"]
        if "uri_immutable" not in off:
            params.append("immutable=1")
        if "uri_memdb" not in off:
            params.append("vfs=memdb")
        param = draw(st.sampled_from(params))
        uri = "file:" + urllib.parse.quote(name) + ("?" + param if param else "")
        target = repr(uri)
        kw.append("uri=True")
    elif kind == "memory":
        target = "':memory:'"
    else:
        target = "''"
    factories = ["", "", "Conn", "ConnCur", "positional"]
    if "factory_callable" not in off:
        factories += ["functools.partial(Conn)", "lambda *a, **k: Conn(*a, **k)"]
    factory = draw(st.sampled_from(factories))
    iso = draw(st.sampled_from(["", "", "None", "'IMMEDIATE'"]))
    if iso and factory != "positional":
        kw.append(f"isolation_level={iso}")
    if threads:
        kw.append("check_same_thread=False")
    if factory == "positional":
        call = f"sqlite3.connect({target}, 0.05, 0, 'DEFERRED', {not threads}, Conn" + (
            ", uri=True)" if kind == "uri" else ")")
    else:
        if factory:
            kw.append(f"factory={factory}")
        call = f"sqlite3.connect({target}, {', '.join(kw)})"
    lines = [f"conns[{k}] = _r = {call}"]
    tfs = ["", "", "bytes"] + ([] if "text_factory_callable" in off else ["upper_text"])
    if "text_factory_bytearray" not in off:
        tfs.append("bytearray")
    tf = draw(st.sampled_from(tfs))
    if tf:
        lines.append(f"_r.text_factory = {tf}")
    rf = draw(st.sampled_from(["", "", "sqlite3.Row", "dict_rows"]))
    if rf:
        lines.append(f"_r.row_factory = {rf}")
    info = {"text_factory": tf, "kind": kind, "factory": factory}
    return Step("\n".join(lines), "connect", k), info


@st.composite
def statement_step(draw: Any, k: int, names: List[str], off: FrozenSet[str]) -> Step:
    c = f"conns[{k}]"
    choice = draw(st.integers(0, 9))
    allow = draw(st.integers(0, 7)) == 0
    if choice <= 5:  # one statement
        sql, journal = draw(any_sql(names))
        entry = draw(st.sampled_from(ENTRIES))
        params = None
        if "?" not in sql and journal and "pragma_bindings" not in off and \
                draw(st.integers(0, 5)) == 0:
            params = "(1,)"
        if sql.startswith("INSERT"):
            sql = "INSERT INTO t VALUES (?)"
            val = draw(st.sampled_from(["1", "'é'", "b'\\x00'", "2.5", "None"]))
            params = f"[({val},), (3,)]" if "executemany" in entry else f"({val},)"
        return Step(_entry_code(entry, c, sql, params), "stmt", k, entry, journal, allow)
    if choice <= 8:  # a script
        parts: List[Tuple[str, str]] = []
        for _ in range(draw(st.integers(1, 4))):
            parts.append(draw(any_sql(names)))
        if "script_attach" in off:
            # leave out ATTACH/DETACH when a journal request follows them in the script
            kept: List[Tuple[str, str]] = []
            for sql, journal in parts:
                is_attach = sql.startswith(("ATTACH", "DETACH"))
                later_journal = any(j for _, j in parts[len(kept) + 1:])
                if is_attach and later_journal:
                    continue
                kept.append((sql, journal))
            parts = kept or [("SELECT 1", "")]
        if "script_wal_then_down" in off and any(not j for _, j in parts):
            # a mixed script: no downgrade after a WAL request (finding F5)
            seen_wal = False
            kept = []
            for sql, journal in parts:
                if journal == "down" and seen_wal:
                    continue
                seen_wal = seen_wal or journal == "wal"
                kept.append((sql, journal))
            parts = kept
        sep = draw(st.sampled_from([";\n", "; ", " ;; "]))
        script = sep.join(p for p, _ in parts) + draw(st.sampled_from([";", ";\n", ""]))
        journal = next((j for _, j in parts if j in ("down", "wal")), "")
        kinds = [j for _, j in parts]
        wal_before_down = "wal" in kinds and "down" in kinds[kinds.index("wal"):]
        entry = draw(st.sampled_from(["conn.executescript", "cursor.executescript"]))
        return Step(_entry_code(entry, c, script, None), "script", k, entry, journal, allow,
                    wal_before_down)
    # several statements in one execute(): sqlite3 refuses them
    if "execute_multi" in off:
        return Step(_entry_code("conn.execute", c, "SELECT 1; SELECT 2", None), "stmt", k,
                    "conn.execute")
    sql, journal = draw(journal_request())
    other = draw(st.sampled_from(["SELECT 1", ";", "", "CREATE TABLE z(y)"]))
    text = draw(st.sampled_from(["{a}; {b}", "  ;;{a};;", "{b}; {a}"])).format(a=sql, b=other)
    entry = draw(st.sampled_from(["conn.execute", "cursor.execute"]))
    return Step(_entry_code(entry, c, text, None), "stmt", k, entry, journal, allow)


THREADS_CODE = '''\
def _reader(c, out):
    for _ in range(150):
        try:
            row = c.execute("SELECT 'abc', 1").fetchone()
            vals = list(row.values()) if isinstance(row, dict) else list(row)
            out.add(",".join(type(v).__name__ for v in vals))
        except Exception as e:
            out.add("exc " + type(e).__name__)
def _writer(c, sqls, out):
    for s in sqls * 3:
        try:
            c.execute(s).fetchall()
            out.add("ok")
        except Exception as e:
            out.add("exc " + type(e).__name__)
_rs = [set(), set()]
_ws = set()
_ts = [threading.Thread(target=_reader, args=({c}, s)) for s in _rs]
_ts.append(threading.Thread(target=_writer, args=({c}, {sqls!r}, _ws)))
for _t in _ts: _t.start()
for _t in _ts: _t.join(30)
_r = {{"readers": sorted(set().union(*_rs)), "writer": sorted(_ws),
      "alive": sum(_t.is_alive() for _t in _ts)}}
'''


@st.composite
def programs(draw: Any, off: FrozenSet[str] = KNOWN_OPEN) -> Dict[str, Any]:
    """A program: files made in a given state, then 1-3 connections and up to 8 steps."""
    names = draw(st.lists(st.sampled_from(FILE_NAMES), min_size=1, max_size=3, unique=True))
    setup: List[str] = []
    for name in names:
        init = draw(st.sampled_from(["wal", "wal", "delete", "delete", "absent", "empty",
                                     "junk"]))
        setup.append(setup_code(name, init))
    mode = "observe" if draw(st.integers(0, 9)) == 0 else "enforce"
    n_conns = draw(st.integers(1, 3))
    want_threads = draw(st.integers(0, 5)) == 0
    steps: List[Step] = []
    infos: Dict[int, Dict[str, Any]] = {}
    for k in range(n_conns):
        step, info = draw(connect_step(k, names, off, threads=want_threads and k == 0))
        steps.append(step)
        infos[k] = info
    for _ in range(draw(st.integers(1, 7))):
        k = draw(st.integers(0, n_conns - 1))
        if draw(st.integers(0, 12)) == 0:
            steps.append(Step(f"conns[{k}].close()\n_r = None", "close", k))
        else:
            steps.append(draw(statement_step(k, names, off)))
    if want_threads and not (infos[0]["text_factory"] and "threads_text_factory" in off):
        sqls = [draw(journal_request()) for _ in range(draw(st.integers(1, 3)))]
        steps.append(Step(THREADS_CODE.format(c="conns[0]", sqls=[s for s, _ in sqls]),
                          "threads", 0))
    if "lock_after_wal" in off and (mode == "observe" or any(s.allow_downgrade for s in steps)) \
            and n_conns > 1:
        # item 16 shows with two connections once downgrades are let through
        mode = "enforce"
        steps = [s._replace(allow_downgrade=False) for s in steps]
    if "attach_own_file" in off:
        # a connection attaching a file that a connection of the program has open as main
        opened = "".join(s.code for s in steps if s.kind == "connect")
        attached_files = [a.replace("''", "'") for a in re.findall(
            r"ATTACH '((?:[^']|'')*)'", "".join(s.code for s in steps))]
        assume(not any(a and (repr(a) in opened or urllib.parse.quote(a) in opened)
                       for a in attached_files))
    return {
        "mode": mode,
        "prelude": PRELUDE,
        "setup": "".join(setup),
        "steps": [s._asdict() for s in steps],
    }


def setup_code(name: str, init: str) -> str:
    """Code that makes file ``name`` in state ``init`` (wal, delete, empty, junk, absent)
    with plain ``sqlite3.Connection`` (never guarded) or raw writes."""
    if init in ("wal", "delete"):
        return (f"_c = sqlite3.Connection({name!r})\n"
                f"_c.execute('PRAGMA journal_mode={init}')\n"
                "_c.execute('CREATE TABLE t(x)')\n"
                "_c.executemany('INSERT INTO t VALUES (?)', [(i,) for i in range(3)])\n"
                "_c.commit()\n_c.close()\n")
    if init == "empty":
        return f"open({name!r}, 'wb').close()\n"
    if init == "junk":
        return f"with open({name!r}, 'wb') as _f: _f.write(b'not a database' * 9)\n"
    return ""


def program(files: Dict[str, str], steps: List[Step], mode: str = "enforce") -> Dict[str, Any]:
    """A hand-written program in the generator's format (control tests, reproducers)."""
    return {"mode": mode, "prelude": PRELUDE,
            "setup": "".join(setup_code(n, i) for n, i in files.items()),
            "steps": [s._asdict() for s in steps]}


FAULT_PRELUDE = '''\
import ctypes, errno
_fiu = ctypes.CDLL("libfiu.so.0")
_fiu.fiu_init(0)
def fault_on(point, err):
    """libfiu: the next call of ``point`` fails with ``err``, once (FIU_ONETIME)."""
    _fiu.fiu_enable(point.encode(), 1, ctypes.c_void_p(err), 1)
def fault_off(point):
    _fiu.fiu_disable(point.encode())
'''

#: (libfiu point, errno name): real syscall faults under ``fiu-run -x`` (docs/fault-injection.md)
FAULTS = [("posix/io/rw/pwrite", "EIO"), ("posix/io/sync/fdatasync", "EIO"),
          ("posix/io/rw/pread", "EIO"), ("posix/mm/mmap", "ENOMEM"),
          ("posix/io/oc/open", "EIO")]


@st.composite
def programs_with_faults(draw: Any, off: FrozenSet[str] = KNOWN_OPEN) -> Dict[str, Any]:
    """A program with one real fault (libfiu, once) around a WAL request, followed by the
    legacy fallback ("on an error, ask for DELETE") on the same connection."""
    prog = draw(programs(off))
    connects = [s for s in prog["steps"] if s["kind"] == "connect"]
    k = draw(st.sampled_from([s["conn"] for s in connects]))
    point, err = draw(st.sampled_from(
        [f for f in FAULTS if not (f[0] == "posix/mm/mmap" and "fault_mmap" in off)]))
    sql, _ = draw(journal_request("wal"))
    down, _ = draw(journal_request("down"))
    code = (f"fault_on({point!r}, errno.{err})\ntry:\n"
            f"    try:\n        _r = conns[{k}].execute({sql!r}).fetchall()\n"
            f"    finally:\n        fault_off({point!r})\n"
            f"except sqlite3.OperationalError:\n    _r = conns[{k}].execute({down!r})\n")
    at = draw(st.integers(len(connects), len(prog["steps"])))
    step = Step(code, "fault", k, "conn.execute", "wal")._asdict()
    prog["steps"] = prog["steps"][:at] + [step] + prog["steps"][at:]
    prog["prelude"] = PRELUDE + FAULT_PRELUDE
    prog["faults"] = True
    return prog


def render(prog: Dict[str, Any]) -> str:
    """A standalone script that runs ``prog`` and prints each step's outcome: run it as
    ``python repro.py`` (plain) and ``WALPATCH=1 python repro.py`` (with walpatch)."""
    out = [
        "# differential-harness program; plain: python repro.py; with walpatch: "
        "WALPATCH=1 python repro.py" + (" (both under fiu-run -x)" if prog.get("faults")
                                        else ""),
        "import os, sys, tempfile",
        "D = tempfile.mkdtemp(); os.chdir(D)",
        prog["prelude"].rstrip(),
        "# --- setup (plain sqlite3.Connection, not guarded) ---",
        prog["setup"].rstrip(),
        "if 'walpatch' in sys.modules:",
        f"    import walpatch; walpatch.install(mode={prog['mode']!r})",
        "def hdrs():",
        "    out = {}",
        "    for n in sorted(os.listdir(D)):",
        "        d = open(n, 'rb').read(100)  # fine in a repro; the harness reads lock-safely",
        "        out[n] = (d[18], d[19]) if d[:15] == b'SQLite format 3' else len(d)",
        "    return out",
    ]
    for i, step in enumerate(prog["steps"]):
        body = step["code"]
        if step.get("allow_downgrade"):
            body = ("import contextlib\n_ctx = walpatch.allow_downgrade() if 'walpatch' in "
                    "sys.modules else contextlib.nullcontext()\nwith _ctx:\n" +
                    "\n".join("    " + line for line in body.splitlines()))
        out.append(f"# step {i}: {step['kind']} {step.get('entry', '')}")
        out.append("try:")
        out.extend("    " + line for line in body.splitlines())
        out.append("    _v = _r.fetchall() if isinstance(_r, sqlite3.Cursor) else _r")
        out.append(f"    print('step {i}: ok', _v if not isinstance(_v, sqlite3.Connection) "
                   "else type(_v).__name__, hdrs())")
        out.append("except Exception as e:")
        out.append(f"    print('step {i}:', type(e).__name__, e, hdrs())")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def default_base() -> str:
    root = os.environ.get("WALPATCH_DIFF_DIR") or (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        else tempfile.gettempdir())
    return tempfile.mkdtemp(prefix="walpatch-diff-", dir=root)


class Worker:
    """One long-lived child running tests/diffworker.py."""

    def __init__(self, walpatch: bool, base: str, sabotage: Optional[str] = None,
                 timeout: float = 60.0, fiu: bool = False) -> None:
        self.fiu = fiu
        self.walpatch = walpatch
        self.base = base
        self.sabotage = sabotage
        self.timeout = timeout
        self.proc: Optional[subprocess.Popen] = None
        self.hello: Dict[str, Any] = {}
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.log = os.path.join(base, ("walpatch" if walpatch else "plain") + "-stderr.log")

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WALPATCH")}
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env["WALPATCH_DIFF_BASE"] = os.path.join(self.base, "w" if self.walpatch else "p")
        env["PYTHONIOENCODING"] = "utf-8"
        if os.environ.get("WALPATCH_DIFF_KEEP"):
            env["WALPATCH_DIFF_KEEP"] = "1"
        argv = [sys.executable, WORKER]
        if self.fiu:  # libfiu's POSIX wrappers preloaded, no fault enabled until a step asks
            argv = ["fiu-run", "-x", "-f", ""] + argv
        if self.walpatch:
            env["WALPATCH"] = "1"  # through walpatch.pth (the worker then calls install())
            argv.append("--walpatch")
            if self.sabotage:
                argv += ["--sabotage", self.sabotage]
        self.lines = queue.Queue()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, env=env, cwd=ROOT, text=True,
                                         encoding="utf-8", bufsize=1)
        threading.Thread(target=self._pump, args=(self.proc, self.lines), daemon=True).start()
        line = self.lines.get(timeout=self.timeout)
        if line is None:
            raise RuntimeError(f"diffworker did not start; see {self.log}")
        self.hello = json.loads(line)

    @staticmethod
    def _pump(proc: subprocess.Popen, lines: "queue.Queue[Optional[str]]") -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def send(self, prog: Dict[str, Any]) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(prog) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> Dict[str, Any]:
        try:
            line = self.lines.get(timeout=self.timeout)
        except queue.Empty:
            self.kill()
            return {"worker_failure": f"no result within {self.timeout}s (hang); killed"}
        if line is None:
            code = self.proc.wait() if self.proc else None
            self.proc = None
            return {"worker_failure": f"worker exited with {code} (crash); see {self.log}"}
        return json.loads(line)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


class WorkerPair:
    """A plain and a walpatch worker; :meth:`run` gives both results of one program."""

    def __init__(self, sabotage: Optional[str] = None, base: Optional[str] = None,
                 fiu: bool = False) -> None:
        self.base = base or default_base()
        self.plain = Worker(False, self.base, fiu=fiu)
        self.wp = Worker(True, self.base, sabotage, fiu=fiu)
        self.counter = itertools.count()
        self.programs_run = 0

    def start(self) -> "WorkerPair":
        self.plain.start()
        self.wp.start()
        return self

    def run(self, prog: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        prog = dict(prog, id=f"p{next(self.counter)}")
        self.plain.send(prog)
        self.wp.send(prog)
        self.programs_run += 1
        return self.plain.receive(), self.wp.receive()

    def close(self) -> None:
        self.plain.close()
        self.wp.close()
        if not os.environ.get("WALPATCH_DIFF_KEEP"):
            shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Judging
# ---------------------------------------------------------------------------------------------

class Difference(NamedTuple):
    kind: str  # a short, stable name: the hypothesis failure is distinguished by it
    step: Optional[int]
    detail: str


def _is_wal(state: Any) -> bool:
    return state == [2, 2]


def _basename(path: Optional[str]) -> Optional[str]:
    return os.path.basename(path) if path else None


def _refusal(outcome: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    exc = outcome.get("exc")
    return exc.get("refusal") if exc else None


#: Reasons of the documented fail-closed refusals of mixed scripts (guard._check_script).
_SCRIPT_FAIL_CLOSED = ("a script's downgrades are checked before it runs",
                       "cannot be known before it runs")


def allowed_difference(prog: Dict[str, Any], i: int, plain: Dict[str, Any],
                       wp: Dict[str, Any], wp_before: Dict[str, Any],
                       wp_history: List[Dict[str, Any]]) -> Optional[str]:
    """Why step ``i`` may differ between the plain run and the walpatch run, or None.

    The complete list of documented differences (README "The decision table", docs/
    transparency.md); anything else is a defect:

    1. ``refused-wal-on-disk``: walpatch raised WalDowngradeRefused for a downgrade of a file
       whose header was 2/2 (WAL) before the step, and no file changed in the walpatch run
       ("the database is untouched"). Plain sqlite3 downgraded it, or failed with an
       OperationalError/DatabaseError (a lock, a transaction) or on a closed cursor
       (transparency limit 10), or succeeded without changing it (SQLite's silent refusals:
       the refusal is decided by the header on disk). Not allowed: plain raised a usage
       error (ProgrammingError, ValueError, ...: sqlite3's own rejection comes first, issue
       10 item 12).
       Rules 2 and 3 have the same conditions on the plain outcome.
    2. ``refused-after-failed-wal``: WalDowngradeRefused carrying the error of this process's
       last failed WAL request for the file (``original_error``), after an earlier step of the
       walpatch run raised; nothing changed.
    3. ``refused-unknown-on-disk``: the file's header could not be read as SQLite (not a
       database), so a downgrade fails closed; nothing changed.
    4. ``fault-retried-or-fallback-refused``: a WAL request met a real fault (libfiu, once)
       and the program's legacy fallback asked for DELETE: walpatch may have retried to
       success, or raised the same error and refused the fallback; allowed as long as no file
       ends that step further from WAL than in the plain run.
    5. ``refused-wal-on-disk-after-wal-in-script``: a script of journal-mode pragmas with a
       WAL request before a downgrade runs statement by statement (README "Limits"); the
       downgrade is refused because the file is WAL on disk by then, and the file ends 2/2.
    6. ``refused-script-fail-closed``: a mixed script refused before any of it ran, for one of
       the documented fail-closed reasons (docs/transparency.md "Scripts": a downgrade after a
       WAL request on the same file in the same script, or after an ATTACH whose file cannot
       be known); nothing changed in the walpatch run. Same conditions on the plain outcome.
    7. ``contention-retried``: a WAL request on which plain sqlite3 failed with contention
       (SQLITE_BUSY/SQLITE_LOCKED) answered ``wal`` with walpatch: the decision table retries
       contention, and the retry succeeded.
    Never allowed: observe mode (nothing may differ) and steps inside ``allow_downgrade()``.
    """
    if prog.get("mode") == "observe" or prog["steps"][i].get("allow_downgrade"):
        return None
    step = prog["steps"][i]
    ref = _refusal(wp)
    if ref is not None and step.get("journal") == "down" or (
            ref is not None and step.get("kind") == "script"):
        name = _basename(ref.get("database"))
        before = wp_before.get(name or "", "missing")
        if step.get("kind") == "script" and step.get("wal_before_down") and \
                _is_wal(wp["after"].get(name or "")) and not _is_wal(before):
            # the script's own WAL request ran first (statement by statement), so the file
            # was WAL on disk when its downgrade came
            return "refused-wal-on-disk-after-wal-in-script"
        if _without_wal_index(wp["after"]) != _without_wal_index(wp_before):
            return None  # a refusal leaves every database file (and -journal) as it was
        pexc = plain.get("exc")
        if pexc is not None and not (
                pexc["type"] in ("sqlite3.OperationalError", "sqlite3.DatabaseError")
                or pexc["message"] == "Cannot operate on a closed cursor."):
            return None  # sqlite3 rejects the call itself: its error comes first
        if step.get("kind") == "script" and any(
                why in (ref.get("reason") or "") for why in _SCRIPT_FAIL_CLOSED):
            return "refused-script-fail-closed"
        if _is_wal(before):
            return "refused-wal-on-disk"
        if ref.get("original_error") and any("exc" in h for h in wp_history):
            return "refused-after-failed-wal"
        if before == "notdb" or (ref.get("database") == "?" and pexc is not None
                                 and pexc.get("errorname") == "SQLITE_NOTADB"):
            # (the database list itself could not be read: the file is not a database)
            return "refused-unknown-on-disk"
        return None
    pexc = plain.get("exc")
    if (step.get("journal") == "wal" and pexc is not None and wp.get("exc") is None
            and pexc.get("errorname") in ("SQLITE_BUSY", "SQLITE_LOCKED")
            and '"wal"' in json.dumps((wp.get("ok") or {}).get("rows"))):
        return "contention-retried"
    if step.get("kind") == "fault":
        # the WAL request met a real fault: plain may fail and fall back to DELETE, walpatch
        # may retry to success, or fail the same way and refuse the fallback. Either way
        # walpatch must not leave any file further from WAL than plain did.
        further = [n for n, v in plain["after"].items()
                   if _is_wal(v) and not _is_wal(wp["after"].get(n))]
        return None if further else "fault-retried-or-fallback-refused"
    return None


def _norm_outcome(o: Dict[str, Any]) -> Dict[str, Any]:
    return {k: o.get(k) for k in ("ok", "exc", "warnings", "in_tx")}


def _threads_same(p: Dict[str, Any], w: Dict[str, Any]) -> Optional[str]:
    pv = (p.get("ok") or {}).get("value") or {}
    wv = (w.get("ok") or {}).get("value") or {}
    if "exc" in p or "exc" in w:
        return None if p.get("exc") == w.get("exc") else "thread step raised differently"
    if wv.get("alive") or pv.get("alive"):
        return f"threads still running after 30 s: plain {pv.get('alive')}, " \
               f"walpatch {wv.get('alive')}"
    pr = {x for x in pv.get("readers", []) if not x.startswith("exc")}
    wr = {x for x in wv.get("readers", []) if not x.startswith("exc")}
    if pr != wr:
        return f"reader threads saw row types {sorted(pr)} plain, {sorted(wr)} with walpatch"
    return None


SIDECARS = ("-wal", "-shm", "-journal")


def _without_wal_index(snap: Dict[str, Any]) -> Dict[str, Any]:
    """Without -wal/-shm: which of them exist while connections are open is not a change of
    the database (a refused script may have run its WAL requests first)."""
    return {n: v for n, v in snap.items() if not n.endswith(("-wal", "-shm"))}


def _without_sidecars(snap: Dict[str, Any]) -> Dict[str, Any]:
    return {n: v for n, v in snap.items() if not n.endswith(SIDECARS)}


def compare(prog: Dict[str, Any], plain: Dict[str, Any], wp: Dict[str, Any],
            off: FrozenSet[str] = KNOWN_OPEN) -> List[Difference]:
    """Every difference between the two runs that :func:`allowed_difference` does not allow,
    plus walpatch-only invariants (a guarded step never takes a WAL file out of WAL).

    With ``lock_after_wal`` in ``off`` (issue 10 item 16, open), a difference only in which
    ``-wal``/``-shm`` files exist *between* steps is not reported (the guard's own read
    leaves the connection attached to the WAL); the final files are still compared."""
    diffs: List[Difference] = []
    for side, res in (("plain", plain), ("walpatch", wp)):
        if "worker_failure" in res:
            return [Difference(f"{side}-worker-failure", None, res["worker_failure"])]
        if "harness_error" in res:
            return [Difference("harness-error", None, f"{side}: {res['harness_error']}")]
    if plain.get("walpatch_loaded"):
        return [Difference("harness-error", None, "walpatch was loaded in the plain worker")]
    if plain["initial"] != wp["initial"]:
        return [Difference("setup", None, f"{plain['initial']} vs {wp['initial']}")]
    diverged = False
    w_before = wp["initial"]
    history: List[Dict[str, Any]] = []
    excused: set = set()
    for i, (ps, ws) in enumerate(zip(plain["steps"], wp["steps"])):
        step = prog["steps"][i]
        # invariant: with walpatch (enforce, not allowed, a guarded entry), WAL stays WAL
        guarded = (prog.get("mode") != "observe" and not step.get("allow_downgrade")
                   and step.get("entry") not in UNGUARDED_ENTRIES)
        for name, state in w_before.items():
            if _is_wal(state) and not _is_wal(ws["after"].get(name)) and not guarded:
                excused.add(name)  # left WAL where walpatch does not guard (documented)
        if guarded:
            for name, state in w_before.items():
                if _is_wal(state) and ws["after"].get(name) not in ([2, 2], None, "missing"):
                    diffs.append(Difference(
                        "missed-downgrade", i,
                        f"{name!r} went from 2/2 to {ws['after'].get(name)} with walpatch, "
                        f"no refusal (plain: {ps['after'].get(name)}); outcome {ws}"))
        wexc = ws.get("exc") or {}
        if ws.get("where") and (ps.get("exc") or {}).get("type") != wexc.get("type"):
            diffs.append(Difference("non-sqlite-exception", i,
                                    f"walpatch run raised {wexc}; plain {ps}"))
        if step["kind"] == "threads":
            why = _threads_same(ps, ws)
            if why:
                diffs.append(Difference("threads", i, why))
            if ps["after"] != ws["after"]:
                diverged = True
        elif not diverged:
            same_outcome = _norm_outcome(ps) == _norm_outcome(ws)
            same_files = ps["after"] == ws["after"]
            if not same_files and ("lock_after_wal" in off or _callable_text_factory(prog)):
                # README "Limits": under a text_factory that is any other callable, the guard
                # reads the database list as blobs, which loads the schema (and so opens the
                # WAL, creating -wal/-shm) where the caller's statement alone may not have.
                same_files = _without_sidecars(ps["after"]) == _without_sidecars(ws["after"])
            if not (same_outcome and same_files):
                reason = allowed_difference(prog, i, ps, ws, w_before, history)
                if reason is None:
                    kind = _kind(ps, ws, same_outcome)
                    diffs.append(Difference(kind, i, _explain(ps, ws)))
                    return diffs
                if reason == "refused-script-fail-closed":
                    excused.update(ps["after"])  # the refused script's WAL requests ran neither
                diverged = True
        history.append(ws)
        w_before = ws["after"]
    pf = {n: f["state"] for n, f in plain["files"].items()}
    wf = {n: f["state"] for n, f in wp["files"].items()}
    if not diverged:
        if plain["files"] != wp["files"]:
            diffs.append(Difference("final-files", None,
                                    f"plain {plain['files']}\nwalpatch {wp['files']}"))
        elif plain["digest"] != wp["digest"]:
            diffs.append(Difference("final-contents", None,
                                    f"plain {plain['digest']}\nwalpatch {wp['digest']}"))
    else:
        for name in sorted(set(pf) | set(wf)):
            if _is_wal(pf.get(name)) and not _is_wal(wf.get(name)) and name not in excused:
                diffs.append(Difference(
                    "further-from-wal", None,
                    f"{name!r}: plain ends 2/2, walpatch ends {wf.get(name)}"))
    return diffs


def _callable_text_factory(prog: Dict[str, Any]) -> bool:
    """A connection of the program has a text_factory other than str/bytes/bytearray."""
    return any("text_factory = upper_text" in step.get("code", "") for step in prog["steps"])


def _kind(ps: Dict[str, Any], ws: Dict[str, Any], same_outcome: bool) -> str:
    if same_outcome:
        if _without_sidecars(ps["after"]) == _without_sidecars(ws["after"]):
            return "sidecars-differ"
        return "files-differ"
    if ("exc" in ps) != ("exc" in ws):
        if _refusal(ws):
            return "unexpected-refusal"
        return "error-only-with-walpatch" if "exc" in ws else "error-only-without-walpatch"
    if "exc" in ps:
        return "different-exception"
    if ps.get("ok") != ws.get("ok"):
        return "different-result"
    if ps.get("in_tx") != ws.get("in_tx"):
        return "different-transaction-state"
    return "different-warnings"


def _explain(ps: Dict[str, Any], ws: Dict[str, Any]) -> str:
    lines = []
    for key in ("ok", "exc", "warnings", "in_tx", "after"):
        if ps.get(key) != ws.get(key):
            lines.append(f"  {key}: plain    {json.dumps(ps.get(key), ensure_ascii=False)}")
            lines.append(f"  {key}: walpatch {json.dumps(ws.get(key), ensure_ascii=False)}")
    return "\n".join(lines)


def report(prog: Dict[str, Any], diffs: List[Difference]) -> str:
    """The failure text: each difference and the program as a standalone script."""
    text = [f"{len(diffs)} difference(s) not allowed by allowed_difference():"]
    for d in diffs:
        text.append(f"- {d.kind} at step {d.step}:\n{d.detail}")
    text.append("--- reproducer (python repro.py; WALPATCH=1 python repro.py) ---")
    text.append(render(prog))
    return "\n".join(text)
