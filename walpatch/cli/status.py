"""Say whether walpatch is active in this interpreter, in which mode, with which settings,
which modules are hooked, and how it got switched on (or why it is off).

``walpatch status`` runs in a Python interpreter of the environment it is installed in, so
what it reports for itself is what every interpreter of that environment gets with the same
environment variables: with ``WALPATCH`` set, walpatch is armed at start and installs when the
application first imports sqlite3 (or pysqlite3 / sqlean).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def collect() -> Dict[str, Any]:
    """``walpatch.status()`` plus the activation facts and the settings the environment
    gives (with their warnings), also before walpatch has installed."""
    import walpatch
    from walpatch import _bootstrap
    from walpatch.config import build_config, describe

    info: Dict[str, Any] = dict(walpatch.status())
    info["activation"] = _bootstrap.info()
    if info.get("settings") is None:
        config, warnings = build_config({})
        info["environment_settings"] = describe(config)
        info["environment_setting_sources"] = dict(config.sources)
    else:
        _, warnings = build_config({})
    info["setting_warnings"] = list(warnings)
    settings = info.get("settings") or info.get("environment_settings") or {}
    info["sqlite"] = _sqlite(str(settings.get("wal_reset_bug", "warn")))
    return info


def _sqlite(setting: str) -> List[Dict[str, Any]]:
    """Each DB-API module's SQLite: version, source id, library, WAL-reset-bug verdict."""
    from walpatch import sqliteinfo

    try:
        return sqliteinfo.collect(setting)
    except Exception as exc:  # never a traceback from `status`
        return [{"module": "sqlite3", "error": f"{type(exc).__name__}: {exc}"}]


_VERDICT_TEXT = {
    "affected": "AFFECTED",
    "fixed": "fixed",
    "accepted": "accepted by the operator (WALPATCH_WAL_RESET_BUG=accept)",
    "not-applicable": "not applicable (this SQLite predates WAL, 3.7.0)",
    "unknown": "UNKNOWN (the version cannot be read; treated as affected)",
}


def _describe_sqlite(entries: List[Dict[str, Any]]) -> List[str]:
    lines = ["SQLite (what each DB-API module really loaded):"]
    for e in entries:
        if e.get("error"):
            lines.append(f"  {e['module']}: cannot be inspected: {e['error']}")
            continue
        lines.append(f"  {e['module']}: SQLite {e['version']} ({e['source_id']})")
        lines.append(f"    library        {e['library'] or 'unknown'}"
                     + (f"  ({e['library_how']})" if e.get("library_how") else ""))
        verdict = e["wal_reset_bug"]
        text = _VERDICT_TEXT.get(verdict, verdict)
        if verdict in ("affected", "unknown"):
            text += (f": 3.7.0 to 3.51.2 are affected, fixed in {', '.join(e['fixed_in'])}; "
                     "upgrade (README, \"The WAL-reset bug\"), or set "
                     "WALPATCH_WAL_RESET_BUG=avoid or =accept")
        lines.append(f"    WAL-reset bug  {text}")
    return lines


_SOURCE_NAMES = {"pth": "walpatch.pth", "walpatch run": "walpatch run's sitecustomize"}


def _sources(act: Dict[str, Any]) -> str:
    return ", ".join(_SOURCE_NAMES.get(s, s) for s in act["activated_by"])


def _describe_activation(info: Dict[str, Any]) -> List[str]:
    act = info["activation"]
    env = act["env_value"]
    env_text = "WALPATCH is unset" if env is None else f"WALPATCH={env!r}"
    lines: List[str] = []
    if info["installed"]:
        by = _sources(act) or "walpatch.install()"
        how = f"by {by}" + (f" ({env_text})" if act["activated_by"] else "")
        lines.append(f"walpatch {info['version']} is active, mode: {info['mode']} ({how})")
    elif act["armed"] and act["waiting_for_import"]:
        mode = info["environment_settings"]["mode"]
        lines.append(
            f"walpatch {info['version']} is armed by {_sources(act)} "
            f"({env_text}), mode: {mode}: it installs when the application first imports "
            "sqlite3, pysqlite3 or sqlean (none is imported in this interpreter yet)")
    else:
        lines.append(f"walpatch {info['version']} is not active in this interpreter "
                     f"({env_text})")
        if act["error"]:
            lines.append(f"  activation failed: {act['error']}")
        elif act["env_requests_walpatch"] and not act["pth_files"]:
            lines.append("  WALPATCH is set, but no walpatch.pth is installed for this "
                         "interpreter: use `walpatch run` or a sitecustomize "
                         "(sitecustomize_example.py)")
        else:
            lines.append("  switch it on: WALPATCH=1 (or observe) in the environment, "
                         "`walpatch run -- COMMAND`, or walpatch.install() in code")
    pth = act["pth_files"]
    lines.append("walpatch.pth: " + (", ".join(pth) if pth else "not installed here"))
    return lines


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    for line in _describe_activation(info):
        print(line)
    print(f"speedups: {info['speedups']} (the execute hot path: compiled C extension, or pure "
          "Python; WALPATCH_DISABLE_EXTENSIONS=1 forces Python)")
    hooked = info["hooked_modules"]
    print("hooked modules: " + (", ".join(hooked) if hooked else "none yet "
                                "(hooked when sqlite3, pysqlite3 or sqlean is imported)"))
    if info.get("settings") is not None:
        settings, sources, title = info["settings"], info["setting_sources"], "settings"
    else:
        settings = info["environment_settings"]
        sources = info["environment_setting_sources"]
        title = ("settings from the environment" if info["activation"]["armed"]
                 else "settings it would use (from the environment)")
    print(f"{title}:")
    for key, value in sorted(settings.items()):
        print(f"  {key} = {value!r}  ({sources.get(key, 'default')})")
    for line in _describe_sqlite(info["sqlite"]):
        print(line)
    for warning in info["setting_warnings"]:
        print(f"warning: {warning}")
    return 0
