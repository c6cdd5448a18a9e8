"""Test harness: loopguard in front of the fake model upstreams (``guard.devtools.fakes``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from guard.devtools.fakes import CACHED_TOKENS, INPUT_TOKENS, Behaviour, FakeModels, Reply

__all__ = [
    "CACHED_TOKENS",
    "INPUT_TOKENS",
    "Behaviour",
    "FakeModels",
    "Guarded",
    "Reply",
    "guarded",
    "wait_records",
]


# -- loopguard in front of the fakes, on real sockets -------------------------------------


@dataclass
class Guarded:
    """A running fake upstream and a loopguard proxy in front of it."""

    fake: FakeModels
    upstream: str
    proxy: str
    records: list[dict[str, Any]]

    @property
    def openai_base(self) -> str:
        return self.proxy + "/openai/v1"

    @property
    def anthropic_base(self) -> str:
        return self.proxy + "/anthropic"

    def fresh(self) -> Guarded:
        """The same servers, with the fake model's defaults and no requests or records
        (module-scoped stacks, per-test state)."""
        self.fake.reply, self.fake.behaviour = Reply(), Behaviour()
        self.fake.requests.clear()
        self.records.clear()
        return self


@contextlib.contextmanager
def guarded(
    fake: FakeModels | None = None, *, loop: dict[str, Any] | None = None, **route: Any
) -> Iterator[Guarded]:
    """``with guarded(FakeModels(), on_stop="error") as g:`` -- route options apply to both.

    Records come from the real telemetry through its record sink.
    """
    from servers import run_server

    from guard.doors.proxy import ProxyApp
    from guard.engine.config import Config
    from guard.engine.core import Engine
    from guard.telemetry import Telemetry

    fake = fake or FakeModels()
    records: list[dict[str, Any]] = []
    with run_server(fake.app()) as upstream:
        config = Config.from_mapping(
            {
                "telemetry": {"records": ""},
                "loop": loop or {},
                "routes": [
                    {"prefix": "/openai", "upstream": upstream, "adapter": "openai", **route},
                    {"prefix": "/anthropic", "upstream": upstream, "adapter": "anthropic", **route},
                ],
            }
        )
        telemetry = Telemetry(
            config.telemetry, config.redaction.policy_id, record_sink=records.append
        )
        engine = Engine(config, telemetry=telemetry)
        with run_server(ProxyApp(config, engine=engine)) as proxy:
            yield Guarded(fake, upstream, proxy, records)


def wait_records(g: Guarded, n: int, timeout: float = 3.0) -> list[dict[str, Any]]:
    """The first ``n`` records, waiting for them (a client may stop reading at [DONE])."""
    deadline = time.monotonic() + timeout
    while len(g.records) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(g.records) >= n, f"expected {n} records, got {len(g.records)}"
    return g.records[:n]
