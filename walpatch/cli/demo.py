"""See what walpatch does, in one command. A bundled legacy application (walpatch.demo_app: ask
for WAL, fall back to DELETE on "disk I/O error") runs against scratch databases, first without
and then with walpatch, while libfiu injects one real, transient EIO into its
`PRAGMA journal_mode=WAL` (pwrite fails once; the application runs under `fiu-run -x`).

  Scenario 1: a rollback-journal file; the WAL request meets the EIO.
  Scenario 2: the file is already WAL (its sibling processes use WAL); the WAL request meets
              the EIO and the application's fallback asks for DELETE. With
              `--on-refusal keep` walpatch answers that DELETE with 'wal' instead of
              raising WalDowngradeRefused, and the legacy application starts.

For each run it prints, side by side, the header bytes 18-19 before and after (1/1 rollback,
2/2 WAL), the fault, the application's own log lines and walpatch's events. Nothing is
simulated: without libfiu the demo says so and how to install it
(apt-get install -y fiu-utils libfiu-dev), and exits 2. The scratch files are removed
afterwards unless --keep is given.

Exit codes: 0 both scenarios behaved as documented (without walpatch the file left WAL or never
reached it; with walpatch it is WAL); 1 an outcome differed (the output says which);
2 the demo cannot run here (libfiu missing, no usable scratch directory) or bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from .. import faults, ondisk
from . import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE

JSON_VERSION = 1
FAULT_POINT = "pwrite"
FAULT_ERRNO = "EIO"

#: the folder that holds the walpatch package (walpatch/cli/demo.py -> three levels up)
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The application's process: `python -c LAUNCHER db --fault pwrite`. With walpatch, the two
# lines a user would put in sitecustomize run first; the application's code is the same.
# sqlite3 is imported first so that a failing install (wrapt missing) shows here, at once.
_LAUNCH_PLAIN = "import sys; from walpatch import demo_app; sys.exit(demo_app.main(sys.argv[1:]))"
_LAUNCH_WALPATCH = ("import sys, sqlite3, walpatch\n"
                    "if not walpatch.install() or 'sqlite3' not in "
                    "walpatch.status()['hooked_modules']: sys.exit(5)\n"
                    "from walpatch import demo_app; sys.exit(demo_app.main(sys.argv[1:]))")
EXIT_INSTALL_FAILED = 5

_SETUP = r"""
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
got = c.execute("PRAGMA journal_mode=" + sys.argv[2]).fetchone()[0]
assert got == sys.argv[2], got
c.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT)")
c.execute("INSERT INTO items(name) VALUES ('written before the app started')")
c.commit()
c.close()
"""


class Scenario(NamedTuple):
    name: str
    title: str
    initial_mode: str  # journal mode the file has before the application starts
    without_expect: Tuple[int, int]  # header after the run without walpatch
    with_expect: Tuple[int, int]
    summary_without: str
    summary_with: str
    persistent: bool = False  # the fault lasts for the whole WAL request (every retry fails)
    #: with --on-refusal keep (WALPATCH_ON_REFUSAL=keep), when it differs from summary_with
    summary_with_keep: str = ""


SCENARIOS = (
    Scenario(
        "transient-eio",
        "A rollback-journal file. The application asks for WAL; one pwrite() fails with EIO.",
        "delete", (1, 1), (2, 2),
        "one transient EIO sent the application to its DELETE fallback: this process now "
        "uses a rollback journal for good while its siblings set WAL on the same file "
        "(mixed WAL/rollback use of one file is what the field reports as corruption)",
        "the EIO was retried inside the WAL request and the file is in WAL mode; the "
        "application never saw an error",
    ),
    Scenario(
        "already-wal",
        "The file is already WAL, as when sibling processes use it. The application asks for "
        "WAL, pwrite() keeps failing with EIO for the whole request (every retry fails too), "
        "and its fallback asks for DELETE.",
        "wal", (1, 1), (2, 2),
        "the fallback took a WAL database in use by other processes back to a rollback "
        "journal (bytes 18-19 went from 2/2 to 1/1)",
        "the downgrade was refused because the header on disk says WAL: the file is "
        "untouched (2/2) and the application got walpatch.WalDowngradeRefused (an "
        "sqlite3.OperationalError) from its fallback instead of a silent downgrade",
        persistent=True,
        summary_with_keep=(
            "the downgrade was refused because the header on disk says WAL, and with "
            "WALPATCH_ON_REFUSAL=keep the fallback's PRAGMA journal_mode=DELETE was answered "
            "with the mode that stays in effect ('wal'), no exception: the legacy application "
            "started and wrote its row, and the file is untouched (2/2)"),
    ),
)
ON_REFUSAL = ("raise", "keep")
WAL_RESET_EVENT = "sqlite-wal-reset-bug"


class DemoError(Exception):
    """The demo cannot run here (exit code 2)."""


def _child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WALPATCH") and k != "LD_PRELOAD"}
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + old if old else "")
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra or {})
    return env


def _header(path: str) -> Optional[List[int]]:
    """Bytes 18/19 of ``path``. This process holds no connection to the file (the application
    ran in a child that has exited), so closing the descriptor cannot drop a lock."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        state = ondisk.parse_header(os.pread(fd, ondisk.HEADER_SIZE, 0))
    finally:
        os.close(fd)
    return list(state.header) if state.header else None


def _describe_header(h: Optional[List[int]]) -> str:
    if not h:
        return "no valid header"
    mode = {(1, 1): "rollback", (2, 2): "WAL"}.get((h[0], h[1]), "?")
    return f"bytes 18-19 = {h[0]}/{h[1]} ({mode})"


def _setup(db: str, mode: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _SETUP, db, mode], env=_child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DemoError(f"cannot create the scratch database {db}: {last}")


def _read_events(path: str) -> List[Dict[str, Any]]:
    events: List[Dict[str, Any]] = []
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:  # a log, not a database
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event") != "installed":
                    events.append(event)
    except OSError:
        pass
    return events


def _last_json(text: str) -> Optional[Dict[str, Any]]:
    return faults.last_json_object(text)


def run_app(scratch: str, scenario: Scenario, with_walpatch: bool,
            on_refusal: str = "raise") -> Dict[str, Any]:
    label = "with" if with_walpatch else "without"
    db = os.path.join(scratch, f"{scenario.name}-{label}-walpatch.db")
    _setup(db, scenario.initial_mode)
    before = _header(db)
    extra: Dict[str, str] = {}
    events_file = None
    if with_walpatch:
        events_file = os.path.join(scratch, f"{scenario.name}-events.jsonl")
        extra["WALPATCH_EVENT_FILE"] = events_file
        extra["WALPATCH_ON_REFUSAL"] = on_refusal
    launcher = _LAUNCH_WALPATCH if with_walpatch else _LAUNCH_PLAIN
    cmd = faults.command_prefix() + [sys.executable, "-c", launcher, db, "--fault", FAULT_POINT,
                                     "--errno", FAULT_ERRNO]
    if scenario.persistent:
        cmd.append("--persistent")
    try:
        proc = subprocess.run(cmd, env=_child_env(extra), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120,
                              cwd=scratch)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DemoError(f"cannot run the application under fiu-run: {exc}") from None
    if with_walpatch and proc.returncode == EXIT_INSTALL_FAILED:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise DemoError(f"walpatch cannot be activated in {sys.executable} ({last}); install "
                        "walpatch with its dependencies (pip install walpatch) and run the demo "
                        "again")
    app = _last_json(proc.stdout) or {}
    after = _header(db)
    run: Dict[str, Any] = {
        "walpatch": with_walpatch, "database": db, "exit_code": proc.returncode,
        "header_before": before, "header_after": after, "app": app,
        "app_log": app.get("log") or [], "events": _read_events(events_file) if events_file
        else [], "stderr": proc.stderr if not app else None,
    }
    # The WAL-reset-bug warning (once per process, about this machine's SQLite, not about the
    # scenario) is kept apart from the scenario's events and shown once above the tables.
    run["sqlite_events"] = [e for e in run["events"] if e.get("event") == WAL_RESET_EVENT]
    run["events"] = [e for e in run["events"] if e.get("event") != WAL_RESET_EVENT]
    fault = app.get("fault") or {}
    problems: List[str] = []
    if proc.returncode == 4 or not app:
        problems.append("the application did not run as expected: exit code "
                        f"{proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    elif not fault.get("fired"):
        problems.append("the injected fault never fired (libfiu saw no pwrite call)")
    expected = scenario.with_expect if with_walpatch else scenario.without_expect
    if after != list(expected):
        problems.append(f"expected {_describe_header(list(expected))} after the run, found "
                        f"{_describe_header(after)}")
    if with_walpatch and not (app.get("walpatch") or {}).get("active"):
        problems.append("walpatch was not active in the application")
    if with_walpatch and on_refusal == "keep" and app and (proc.returncode != 0
                                                           or app.get("final_mode") != "wal"):
        problems.append(f"with on_refusal=keep the application should start in WAL mode; it "
                        f"exited {proc.returncode} in mode {app.get('final_mode')}")
    run["problems"] = problems
    run["as_expected"] = not problems
    return run


# ---- output --------------------------------------------------------------------------------

def _short(run: Dict[str, Any], text: str, limit: int = 240) -> str:
    """The scratch path replaced by the file name; very long lines cut (JSON has them whole)."""
    db = run["database"]
    text = text.replace(db, os.path.basename(db))
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _fault_text(run: Dict[str, Any]) -> str:
    f = run["app"].get("fault")
    if not f:
        return "none"
    times = "once" if f.get("times") == 1 else "persistent"
    return (f"real (libfiu): {f['point'].rsplit('/', 1)[-1]}() -> {f['errno']}, {times}; "
            f"failed {f['fired']} of {f['calls']} call(s)")


def _wal_request_text(run: Dict[str, Any]) -> str:
    app = run["app"]
    err = app.get("wal_error")
    if err:
        return f"raised {err['type']}: {err['message']} ({err.get('errorname') or 'no code'})"
    if app.get("error") and not app.get("fallback"):
        return "raised (see the result)"
    return "succeeded"


def _result_text(run: Dict[str, Any]) -> str:
    app = run["app"]
    if app.get("error"):
        return f"exit {run['exit_code']}: failed with {app['error']['type']}"
    if not app:
        return f"exit {run['exit_code']}: no result"
    return f"exit {run['exit_code']}: started, journal_mode={app.get('final_mode')}"


def _events_text(run: Dict[str, Any]) -> List[str]:
    if not run["walpatch"]:
        return ["(walpatch not installed)"]
    if not run["events"]:
        return ["(none)"]
    out = []
    for e in run["events"]:
        message = str(e.get("message", "")).replace("walpatch: ", "", 1)
        out.append(_short(run, f"{e.get('event')}: {message}"))
    return out


def _after_text(run: Dict[str, Any]) -> str:
    text = _describe_header(run["header_after"])
    if run["header_before"] == [2, 2] and run["header_after"] == [1, 1]:
        text += "  <- DOWNGRADED"
    elif run["header_after"] == [1, 1]:
        text += "  <- not WAL"
    elif run["header_before"] == run["header_after"]:
        text += "  (unchanged)"
    return text


def _wrap(text: str, width: int) -> List[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False)


def _table(rows: List[Tuple[str, List[str], List[str]]], width: int) -> List[str]:
    label_w = 16
    col = max(28, (width - label_w - 3) // 2)
    lines = []
    for label, left, right in rows:
        lcol = [w for item in left for w in (_wrap(item, col) or [""])]
        rcol = [w for item in right for w in (_wrap(item, col) or [""])]
        for i in range(max(len(lcol), len(rcol), 1)):
            lab = label if i == 0 else ""
            lv = lcol[i] if i < len(lcol) else ""
            rv = rcol[i] if i < len(rcol) else ""
            lines.append(f"{lab:<{label_w}} {lv:<{col}}   {rv}".rstrip())
    return lines


def _print_human(result: Dict[str, Any]) -> None:
    width = min(max(shutil.get_terminal_size((110, 24)).columns, 90), 140)
    print("walpatch demo: a legacy application (ask for WAL, fall back to DELETE on "
          "\"disk I/O error\")")
    print(f"meets one real, transient EIO: libfiu makes {FAULT_POINT}() fail once with "
          f"{FAULT_ERRNO} (fiu-run -x) during its PRAGMA journal_mode=WAL.")
    print("Header bytes 18-19 of the database file: 1/1 = rollback journal, 2/2 = WAL.")
    warned = [e for sc in result["scenarios"] for e in sc["runs"]["with"]["sqlite_events"]]
    if warned:
        print(f"In each run with walpatch it also warned once ({WAL_RESET_EVENT}): SQLite "
              f"{warned[0].get('sqlite_version')} here has the WAL-reset bug (see `walpatch "
              "status`).")
    if result.get("on_refusal") == "keep":
        print("With walpatch, WALPATCH_ON_REFUSAL=keep: a refused downgrade is answered with "
              "the mode that stays in effect instead of an exception.")
    for i, sc in enumerate(result["scenarios"], 1):
        without, with_ = sc["runs"]["without"], sc["runs"]["with"]
        print()
        print(f"Scenario {i} ({sc['name']}): {sc['title']}")
        rows = [
            ("", ["WITHOUT walpatch"], ["WITH walpatch"]),
            ("file before", [_describe_header(without["header_before"])],
             [_describe_header(with_["header_before"])]),
            ("fault", [_fault_text(without)], [_fault_text(with_)]),
            ("WAL request", [_wal_request_text(without)], [_wal_request_text(with_)]),
            ("app's log", [_short(without, x) for x in without["app_log"]] or ["(nothing)"],
             [_short(with_, x) for x in with_["app_log"]] or ["(nothing)"]),
            ("walpatch events", _events_text(without), _events_text(with_)),
            ("app result", [_result_text(without)], [_result_text(with_)]),
            ("file after", [_after_text(without)], [_after_text(with_)]),
        ]
        for line in _table(rows, width):
            print(line)
        print()
        for label, run, text in (("without walpatch", without, sc["summary_without"]),
                                 ("with walpatch", with_, sc["summary_with"])):
            if run["as_expected"]:
                print(textwrap.fill(f"=> {label}: {text}.", width, subsequent_indent="   "))
            else:
                print(textwrap.fill(f"=> {label}: UNEXPECTED: " + "; ".join(run["problems"]),
                                    width, subsequent_indent="   "))
    print()
    if result["scratch_kept"]:
        print(f"The scratch files are kept in {result['scratch']}")
    if result["exit_code"] == EXIT_OK:
        print("Both scenarios behaved as documented.")
    else:
        print("Some outcome differed from the documented behaviour (see UNEXPECTED above).")


# ---- the command ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (shape in docs/cli.md)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch databases and the event files")
    parser.add_argument("--dir", metavar="DIR",
                        help="create the scratch directory inside DIR (default: the system "
                             "temporary directory)")
    parser.add_argument("--on-refusal", choices=ON_REFUSAL, default="raise",
                        help="walpatch's on_refusal setting in the application (keep: a "
                             "refused downgrade answers 'wal' instead of raising; default "
                             "raise)")


def demo(keep: bool = False, parent: Optional[str] = None, on_refusal: str = "raise"
         ) -> Dict[str, Any]:
    """The JSON object of ``walpatch demo`` (docs/cli.md). Raises DemoError when it cannot
    run here."""
    ok, how = faults.available()
    result: Dict[str, Any] = {"walpatch_demo": JSON_VERSION, "exit_code": EXIT_USAGE,
                              "on_refusal": on_refusal,
                              "fault_injection": {"available": ok, "detail": how,
                                                  "simulated": False},
                              "scenarios": [], "scratch": None, "scratch_kept": False}
    if not ok:
        raise DemoError(f"cannot inject a real fault here: {how}. Nothing is simulated; "
                        "install libfiu and run the demo again")
    if parent is not None and not os.path.isdir(parent):
        raise DemoError(f"--dir {parent}: " + ("not a directory (give the directory to create "
                                               "the scratch directory in)"
                                               if os.path.lexists(parent)
                                               else "no such directory"))
    try:
        scratch = tempfile.mkdtemp(prefix="walpatch-demo-", dir=parent)
    except OSError as exc:
        raise DemoError(f"cannot create a scratch directory in {parent or tempfile.gettempdir()}"
                        f": {(exc.strerror or str(exc)).lower()}") from None
    result["scratch"] = scratch
    try:
        for sc in SCENARIOS:
            runs = {"without": run_app(scratch, sc, False),
                    "with": run_app(scratch, sc, True, on_refusal)}
            result["scenarios"].append({
                "name": sc.name, "title": sc.title, "initial_mode": sc.initial_mode,
                "summary_without": sc.summary_without,
                "summary_with": (sc.summary_with_keep if on_refusal == "keep"
                                 and sc.summary_with_keep else sc.summary_with),
                "runs": runs, "as_expected": all(r["as_expected"] for r in runs.values()),
            })
    finally:
        if keep:
            result["scratch_kept"] = True
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    result["exit_code"] = EXIT_OK if all(s["as_expected"] for s in result["scenarios"]) \
        else EXIT_PROBLEM
    return result


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    try:
        result = demo(keep=args.keep, parent=args.dir, on_refusal=args.on_refusal)
    except DemoError as exc:
        print(f"walpatch demo: {exc}", file=sys.stderr)
        if args.json:
            ok, how = faults.available()
            print(json.dumps({"walpatch_demo": JSON_VERSION, "exit_code": EXIT_USAGE,
                              "error": str(exc), "fault_injection": {
                                  "available": ok, "detail": how, "simulated": False},
                              "scenarios": [], "scratch": None, "scratch_kept": False},
                             indent=2, sort_keys=True))
        return EXIT_USAGE
    except Exception as exc:  # never a traceback
        print(f"walpatch demo: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        _print_human(result)
    return int(result["exit_code"])
