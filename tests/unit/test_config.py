"""Config: defaults, TOML, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.engine.config import Config, ConfigError


def test_defaults() -> None:
    cfg = Config()
    assert cfg.loop.mode == "enforce"
    assert (cfg.loop.window, cfg.loop.max_repeats, cfg.loop.max_identical_calls) == (64, 3, 30)
    assert cfg.redaction.policy_id == "default-v1"
    assert Config.load(None) == cfg


def test_toml(tmp_path: Path) -> None:
    path = tmp_path / "loopguard.toml"
    path.write_text(
        """
[loop]
mode = "observe"
max_repeats = 2

[loop.tools.poll_status]
max_repeats = 10
progress_pointer = "/status"

[redaction]
policy = "acme"
version = 2

[[redaction.rules]]
name = "order"
pattern = '#A\\d{5}'
mode = "pseudonymize"
""",
        encoding="utf-8",
    )
    cfg = Config.load(path)
    assert cfg.loop.mode == "observe" and cfg.loop.max_repeats == 2
    assert cfg.loop.tools["poll_status"].progress_pointer == "/status"
    assert cfg.loop.tools["poll_status"].max_repeats == 10
    assert cfg.redaction.policy_id == "acme-v2"
    assert cfg.redaction.rules[0].pattern == r"#A\d{5}"


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data, source="t.toml")
    return str(info.value)


def test_unknown_key_names_the_dotted_key() -> None:
    message = _error({"loop": {"tools": {"poll": {"max_repeat": 3}}}})
    assert "loop.tools.poll.max_repeat: unknown key" in message
    assert message.startswith("t.toml:")


def test_bad_value_names_key() -> None:
    message = _error({"loop": {"max_repeats": 0}})
    assert "loop.max_repeats" in message and "0" in message
    assert "loop.mode" in _error({"loop": {"mode": "block"}})


def test_bad_regex() -> None:
    message = _error({"redaction": {"rules": [{"name": "x", "pattern": "([a-z"}]}})
    assert "redaction.rules.0.pattern" in message and "regular expression" in message
    assert "loop.volatile_patterns" in _error({"loop": {"volatile_patterns": ["("]}})


def test_progress_pointer_syntax() -> None:
    message = _error({"loop": {"tools": {"poll": {"progress_pointer": "status"}}}})
    assert "loop.tools.poll.progress_pointer" in message and "RFC 6901" in message


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[loop\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        Config.load(tmp_path / "missing.toml")


def test_several_workers_need_the_shared_store(capsys) -> None:
    message = _error({"server": {"workers": 2}})
    assert message.startswith("t.toml:") and "server.workers" in message and "redis" in message
    assert "server.workers" in _error({"server": {"workers": 0}})
    redis = Config.from_mapping({"server": {"workers": 4}, "store": {"backend": "redis"}})
    assert redis.server.workers == 4
    # The command line says the same, and serves nothing.
    from guard.cli import main

    assert main(["serve", "--workers", "2"]) == 2
    assert "server.workers" in capsys.readouterr().err


def test_every_adapter_the_config_accepts_is_registered_and_builds() -> None:
    from typing import get_args

    from adapters import ADAPTERS, get_adapter
    from guard.engine.config import AdapterName, RouteConfig

    assert set(get_args(AdapterName)) == set(ADAPTERS)
    for name in ADAPTERS:
        route = RouteConfig(prefix="/x", upstream="http://127.0.0.1:1", adapter=name)
        assert get_adapter(route).name == name


def test_an_engine_uses_the_store_it_is_given_even_an_empty_one() -> None:
    from guard.engine.core import Engine
    from guard.engine.store import MemoryStore

    store = MemoryStore()
    assert len(store) == 0  # falsy: "store or default" would have replaced it
    assert Engine(store=store).store is store
