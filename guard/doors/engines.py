"""The engine a front door builds when it is given none (proxy, middleware, Guard)."""

from __future__ import annotations

from pathlib import Path

from guard.engine.config import Config
from guard.engine.core import Engine
from guard.telemetry import build as build_telemetry


def door_engine(config: Config | str | Path | None) -> Engine:
    """An engine from a config, or from the TOML file it names (defaults when None),
    with the telemetry that config asks for."""
    if not isinstance(config, Config):
        config = Config.load(config)
    return Engine(config, make_telemetry=build_telemetry)
