"""Invalid settings: one clear warning each, the default used, protection still on."""
from __future__ import annotations

import pytest

from walpatch.config import Config, build_config

from .dbutil import last_json, make_db, run_py


def test_defaults():
    config, warnings = build_config({}, environ={})
    assert config == Config() and warnings == []
    assert config.mode == "enforce" and config.retry_attempts == 5


def test_environment_and_keywords_merge_keywords_win():
    env = {"WALPATCH": "observe", "WALPATCH_RETRY_ATTEMPTS": "7",
           "WALPATCH_ALLOW_DOWNGRADE_PATHS": "/a/*.db:/b/*.db"}
    config, warnings = build_config({"retry_attempts": 2}, environ=env)
    assert warnings == []
    assert config.mode == "observe" and config.retry_attempts == 2
    assert config.allow_downgrade_paths == ("/a/*.db", "/b/*.db")
    assert dict(config.sources)["retry_attempts"] == "install()"
    assert dict(config.sources)["mode"] == "WALPATCH"


@pytest.mark.parametrize("var,value,accepted", [
    ("WALPATCH_RETRY_ATTEMPTS", "five", "a whole number from 1 to 1000 in ASCII digits"),
    ("WALPATCH_RETRY_ATTEMPTS", "0", "a whole number from 1 to 1000"),
    ("WALPATCH_RETRY_INITIAL_DELAY", "-1", "a number of seconds from 0 to 3600"),
    ("WALPATCH_RETRY_TOTAL_TIMEOUT", "soon", "a number of seconds from 0 to 3600"),
    ("WALPATCH_ALLOW_DOWNGRADE", "maybe", "a boolean"),
    ("WALPATCH_LOG_LEVEL", "LOUD", "one of DEBUG, INFO"),
    ("WALPATCH", "enforec", "one of enforce, observe"),
])
def test_invalid_environment_value_names_variable_value_and_accepted(var, value, accepted):
    config, warnings = build_config({}, environ={var: value})
    assert len(warnings) == 1
    assert var in warnings[0] and repr(value) in warnings[0] and accepted in warnings[0]
    assert "protection stays on" in warnings[0]
    assert config == Config()


def test_unknown_and_invalid_keywords():
    config, warnings = build_config({"retry_attempt": 3, "retry_max_delay": "x"}, environ={})
    assert len(warnings) == 2
    assert "unknown setting retry_attempt" in warnings[0] and "retry_attempts" in warnings[0]
    assert "retry_max_delay='x'" in warnings[1]
    assert config == Config()


def test_max_delay_below_initial_is_corrected():
    config, warnings = build_config({"retry_initial_delay": 0.5, "retry_max_delay": 0.1}, {})
    assert config.retry_max_delay == 0.5 and len(warnings) == 1


APP = """
import json, sqlite3, sys, walpatch
walpatch.install()
walpatch.install()  # a second install must not repeat the warnings
c = sqlite3.connect(sys.argv[1])
try:
    c.execute("PRAGMA journal_mode=DELETE")
    out = "downgraded"
except walpatch.WalDowngradeRefused:
    out = "refused"
print(json.dumps({"outcome": out, "attempts": walpatch.status()["settings"]["retry_attempts"]}))
"""


def test_typo_in_environment_warns_once_and_keeps_protecting(tmp_path):
    db = tmp_path / "app.db"
    make_db(db, "wal")
    proc = run_py(APP, str(db), env={"WALPATCH_RETRY_ATTEMPTS": "lots",
                                     "WALPATCH_LOG_LEVEL": "verbose"})
    assert proc.returncode == 0, proc.stderr
    result = last_json(proc.stdout)
    assert result == {"outcome": "refused", "attempts": 5}
    warnings = [line for line in proc.stderr.splitlines() if "ignoring" in line]
    assert len(warnings) == 2, proc.stderr
    assert any("WALPATCH_RETRY_ATTEMPTS='lots'" in w for w in warnings)
    assert any("WALPATCH_LOG_LEVEL='verbose'" in w for w in warnings)


def test_a_misspelled_variable_name_is_warned_about_once_and_protection_stays() -> None:
    """WALPATCH_ON_REFUSL=keep used to be ignored in silence (found by a README trial). Now one
    warning names the variable that would be right; the setting keeps its default. Control:
    the right name gives no warning; test switches (WALPATCH_REQUIRE_FAULTS) give none."""
    config, warnings = build_config({}, {"WALPATCH_ON_REFUSL": "keep",
                                         "WALPATCH_REQUIRE_FAULTS": "1"})
    assert warnings == ["walpatch: ignoring WALPATCH_ON_REFUSL: not a walpatch setting; did you "
                        "mean WALPATCH_ON_REFUSAL? (protection stays on with that setting's "
                        "default)"]
    assert config.on_refusal == "raise" and config.mode == "enforce"
    config, warnings = build_config({}, {"WALPATCH_ON_REFUSAL": "keep"})
    assert warnings == [] and config.on_refusal == "keep"
