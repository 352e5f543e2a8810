"""Settings: ``install(**settings)`` and ``WALPATCH_*`` environment variables -> a frozen Config.

A hotfix must never take down the application it protects, so nothing here raises on bad
input: every invalid value yields one warning (naming the setting, the value and what is
accepted) and the default is used instead. Protection stays on.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

ENFORCE = "enforce"
OBSERVE = "observe"

#: Values of ``WALPATCH`` that switch walpatch on (enforce), on in observe mode, or off.
ENABLE_WORDS = ("1", "on", "true", "yes", "enforce")
OBSERVE_WORDS = ("observe",)
DISABLE_WORDS = ("", "0", "off", "false", "no")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


_DEFAULTS: Dict[str, Any] = {
    "mode": ENFORCE,
    "retry_attempts": 5,
    "retry_initial_delay": 0.05,
    "retry_max_delay": 1.0,
    "retry_total_timeout": 5.0,
    "allow_downgrade": False,
    "allow_downgrade_paths": (),
    "include_paths": (),
    "exclude_paths": (),
    "unsupported_markers": (),
    "log_level": None,
    "event_file": None,
    "wal_reset_bug": "warn",
    "on_refusal": "raise",
    "lock_guard": "protect",
}


class Config:
    """Everything that changes walpatch's behaviour. Immutable: a new install makes a new one.

    A plain class with __slots__ rather than a dataclass: it is built when the application
    first imports sqlite3, and importing ``dataclasses`` plus generating the class cost about
    3 ms there (benchmarks/startup.py).
    """

    __slots__ = tuple(_DEFAULTS) + ("sources",)

    mode: str
    retry_attempts: int
    retry_initial_delay: float
    retry_max_delay: float
    retry_total_timeout: float
    allow_downgrade: bool
    allow_downgrade_paths: Tuple[str, ...]
    include_paths: Tuple[str, ...]
    exclude_paths: Tuple[str, ...]
    unsupported_markers: Tuple[str, ...]
    log_level: Optional[str]
    event_file: Optional[str]
    wal_reset_bug: str
    on_refusal: str
    lock_guard: str
    #: Not a setting: which settings came from where, for `walpatch status`.
    sources: Tuple[Tuple[str, str], ...]

    def __init__(self, **settings: Any) -> None:
        unknown = set(settings) - set(_DEFAULTS) - {"sources"}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        for name, default in _DEFAULTS.items():
            object.__setattr__(self, name, settings.get(name, default))
        object.__setattr__(self, "sources", settings.get("sources", ()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is immutable: use replace()")

    def replace(self, **changes: Any) -> "Config":
        values = self.as_dict()
        values["sources"] = self.sources
        values.update(changes)
        return Config(**values)

    def as_dict(self) -> Dict[str, Any]:
        """The settings (not ``sources``) as a plain dict."""
        return {name: getattr(self, name) for name in _DEFAULTS}

    def __eq__(self, other: object) -> bool:  # ``sources`` does not count
        return isinstance(other, Config) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"Config({inner})"

    @property
    def observe(self) -> bool:
        return self.mode == OBSERVE


def _parse_mode(raw: str) -> str:
    word = raw.strip().lower()
    if word in ENABLE_WORDS:
        return ENFORCE
    if word in OBSERVE_WORDS:
        return OBSERVE
    raise ValueError("one of enforce, observe (or 1/on/true for enforce)")


# ASCII digits only: int() and float() also accept other scripts' digits ("١٢", "５") and
# underscores ("1_000"), which nobody means in a setting (issue 10, item 17).
_INT_RE = re.compile(r"[+]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")


def _parse_int_at_least_1(raw: Any) -> int:
    expected = "a whole number from 1 to 1000 in ASCII digits, such as 5"
    if isinstance(raw, bool):
        raise ValueError(expected)
    if isinstance(raw, int):
        value = raw
    else:
        text = str(raw).strip()
        if not _INT_RE.match(text):
            raise ValueError(expected)
        value = int(text)
    if value < 1 or value > 1000:
        raise ValueError(expected)
    return value


def _parse_seconds(raw: Any) -> float:
    expected = "a number of seconds from 0 to 3600 in ASCII digits, such as 0.05"
    if isinstance(raw, bool):
        raise ValueError(expected)
    if isinstance(raw, (int, float)):
        value = float(raw)
    else:
        text = str(raw).strip()
        if not _FLOAT_RE.match(text):
            raise ValueError(expected)
        value = float(text)
    if not (0.0 <= value <= 3600.0):  # also rejects nan
        raise ValueError(expected)
    return value


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word in ("1", "on", "true", "yes"):
        return True
    if word in ("", "0", "off", "false", "no"):
        return False
    raise ValueError("a boolean: 1/true/on/yes or 0/false/off/no")


def _parse_globs(raw: Any) -> Tuple[str, ...]:
    """Path globs: a list from Python, or an os.pathsep-separated string from the environment."""
    if isinstance(raw, (list, tuple)):
        items = [str(x) for x in raw]
    elif isinstance(raw, str):
        items = raw.split(os.pathsep)
    else:
        raise ValueError(f"a list of path globs or a string of globs separated by {os.pathsep!r}")
    return tuple(_anchor(os.path.expanduser(x.strip())) for x in items if x.strip())


def _anchor(glob: str) -> str:
    """A relative glob (``a.db``, ``data/*.db``) names files under the working directory at
    install time, as a relative path would: the guard matches absolute paths, so unanchored it
    would match nothing (issue 10, item 4). A glob that starts with a wildcard (``*.db``)
    already matches anywhere (``*`` matches ``/``) and is kept as it is."""
    if os.path.isabs(glob) or glob[:1] in ("*", "?", "["):
        return glob
    try:
        return os.path.join(os.getcwd(), glob)
    except OSError:  # the working directory is gone: keep it (it can match nothing)
        return glob


def _parse_markers(raw: Any) -> Tuple[str, ...]:
    """Extra message fragments that mean "WAL is unsupported here" (comma-separated in env)."""
    if isinstance(raw, (list, tuple)):
        items = [str(x) for x in raw]
    elif isinstance(raw, str):
        items = raw.split(",")
    else:
        raise ValueError("a list of strings or a comma-separated string")
    return tuple(x.strip().lower() for x in items if x.strip())


def _parse_log_level(raw: Any) -> Optional[str]:
    word = str(raw).strip().upper()
    if word == "":
        return None
    if word not in _LOG_LEVELS:
        raise ValueError("one of " + ", ".join(_LOG_LEVELS))
    return word


def _parse_event_file(raw: Any) -> Optional[str]:
    text = os.fspath(raw) if not isinstance(raw, str) else raw
    text = str(text).strip()
    if not text:
        return None
    return os.path.abspath(os.path.expanduser(text))


def _parse_wal_reset_bug(raw: Any) -> str:
    """What to do on an SQLite with the WAL-reset bug (walpatch/sqliteinfo.py)."""
    word = str(raw).strip().lower()
    if word not in ("warn", "avoid", "accept"):
        raise ValueError("one of warn, avoid, accept")
    return word


def _parse_on_refusal(raw: Any) -> str:
    """What a refused downgrade gives the caller: the exception, or the mode that stays."""
    word = str(raw).strip().lower()
    if word not in ("raise", "keep"):
        raise ValueError("one of raise, keep")
    return word


def _parse_lock_guard(raw: Any) -> str:
    """The lock guard (walpatch/lockguard.py): protect, detect or off."""
    word = str(raw).strip().lower()
    if word not in ("protect", "detect", "off"):
        raise ValueError("one of protect, detect, off")
    return word


# setting name -> (environment variable, parser)
SETTINGS: Dict[str, Tuple[str, Callable[[Any], Any]]] = {
    "mode": ("WALPATCH", _parse_mode),
    "retry_attempts": ("WALPATCH_RETRY_ATTEMPTS", _parse_int_at_least_1),
    "retry_initial_delay": ("WALPATCH_RETRY_INITIAL_DELAY", _parse_seconds),
    "retry_max_delay": ("WALPATCH_RETRY_MAX_DELAY", _parse_seconds),
    "retry_total_timeout": ("WALPATCH_RETRY_TOTAL_TIMEOUT", _parse_seconds),
    "allow_downgrade": ("WALPATCH_ALLOW_DOWNGRADE", _parse_bool),
    "allow_downgrade_paths": ("WALPATCH_ALLOW_DOWNGRADE_PATHS", _parse_globs),
    "include_paths": ("WALPATCH_INCLUDE_PATHS", _parse_globs),
    "exclude_paths": ("WALPATCH_EXCLUDE_PATHS", _parse_globs),
    "unsupported_markers": ("WALPATCH_UNSUPPORTED_MARKERS", _parse_markers),
    "log_level": ("WALPATCH_LOG_LEVEL", _parse_log_level),
    "event_file": ("WALPATCH_EVENT_FILE", _parse_event_file),
    "wal_reset_bug": ("WALPATCH_WAL_RESET_BUG", _parse_wal_reset_bug),
    "on_refusal": ("WALPATCH_ON_REFUSAL", _parse_on_refusal),
    "lock_guard": ("WALPATCH_LOCK_GUARD", _parse_lock_guard),
}


#: WALPATCH_* variables that are not settings but are read elsewhere (walpatch/speedups.py).
_OTHER_VARIABLES = frozenset({"WALPATCH_DISABLE_EXTENSIONS"})


def _misspelled_variables(env: Mapping[str, str]) -> List[str]:
    """A WALPATCH_* variable whose name is close to a setting's but is none: most likely a
    typo (WALPATCH_ON_REFUSL), which would otherwise be ignored in silence. One warning each,
    naming the variable that would be right; other WALPATCH_* names (test switches) pass."""
    import difflib

    known = [var for var, _ in SETTINGS.values()]
    out = []
    for var in env:
        if not var.startswith("WALPATCH_") or var in known or var in _OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(var, known, n=1, cutoff=0.85)
        if close:
            out.append(f"walpatch: ignoring {var}: not a walpatch setting; did you mean "
                       f"{close[0]}? (protection stays on with that setting's default)")
    return out


def build_config(
    settings: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None
) -> Tuple[Config, List[str]]:
    """Merge defaults < environment < keyword settings; return the config and the warnings.

    ``WALPATCH`` itself decides *whether* walpatch starts (see ``walpatch._bootstrap``); here an
    unset or "off" ``WALPATCH`` simply leaves the mode at its default, since whoever called
    ``install()`` already decided to turn it on.
    """
    env = os.environ if environ is None else environ
    warnings: List[str] = []
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}

    for name, (var, parse) in SETTINGS.items():
        raw = env.get(var)
        if raw is None:
            continue
        if name == "mode" and raw.strip().lower() in DISABLE_WORDS:
            continue
        try:
            values[name] = parse(raw)
            sources[name] = var
        except ValueError as exc:
            warnings.append(
                f"walpatch: ignoring {var}={raw!r}: expected {exc}; "
                f"using the default ({_DEFAULTS[name]!r}), protection stays on"
            )

    warnings.extend(_misspelled_variables(env))

    for name, raw in settings.items():
        if name not in SETTINGS:
            known = ", ".join(sorted(SETTINGS))
            warnings.append(
                f"walpatch: ignoring unknown setting {name}={raw!r}: known settings are {known}"
            )
            continue
        try:
            values[name] = SETTINGS[name][1](raw)
            sources[name] = "install()"
        except ValueError as exc:
            fallback = values.get(name, _DEFAULTS[name])
            warnings.append(
                f"walpatch: ignoring setting {name}={raw!r}: expected {exc}; "
                f"using {fallback!r}, protection stays on"
            )

    config = Config(**values)
    if config.retry_max_delay < config.retry_initial_delay:
        warnings.append(
            f"walpatch: retry_max_delay ({config.retry_max_delay}) is below retry_initial_delay "
            f"({config.retry_initial_delay}); using retry_initial_delay for both"
        )
        config = config.replace(retry_max_delay=config.retry_initial_delay)
    return config.replace(sources=tuple(sorted(sources.items()))), warnings


def describe(config: Config) -> Dict[str, Any]:
    """The settings as a plain dict (for `walpatch status` and the startup event)."""
    return config.as_dict()
