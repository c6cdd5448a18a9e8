"""Two loopguard replicas behind a load balancer share their sessions through Redis.

A looping agent whose calls alternate between the replicas is stopped on the call
after ``max_repeats`` all the same, and the tool never sees that call. With Redis
down, calls are served (fail open) and recorded with failure stage ``store``.
"""

from __future__ import annotations

import contextlib

import httpx
from proxy_harness import ToolServer, guarded_proxy, proxy_config
from servers import free_port, run_server


def redis_config(upstream: str, url: str, prefix: str):
    return proxy_config(upstream, store={"backend": "redis", "url": url, "key_prefix": prefix})


def test_replicas_share_the_session_history(redis_url: str) -> None:
    tools = ToolServer()
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(run_server(tools.app()))
        config = redis_config(upstream, redis_url, "replicas-1:")
        replicas = [stack.enter_context(guarded_proxy(config))[0] for _ in range(2)]
        statuses = []
        for n in range(4):  # round-robin, as a load balancer would
            response = httpx.post(
                f"{replicas[n % 2]}/tools/lookup_tracking",
                json={"order_id": "#A10234"},
                headers={"x-loopguard-session": "agent-7"},
            )
            statuses.append((response.status_code, response.headers["x-loopguard-route"]))
        other = httpx.post(
            f"{replicas[1]}/tools/lookup_tracking",
            json={"order_id": "#A10234"},
            headers={"x-loopguard-session": "agent-8"},
        )
    assert statuses == [(200, "serve")] * 3 + [(422, "stop_and_review")]
    assert tools.hits["lookup_tracking"] == 4  # three of agent-7, one of agent-8
    assert other.status_code == 200


def test_a_dead_store_fails_open_and_says_so() -> None:
    tools = ToolServer()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(run_server(tools.app()))
        proxy, records = stack.enter_context(guarded_proxy(redis_config(upstream, dead, "dead:")))
        responses = [
            httpx.post(
                f"{proxy}/tools/lookup_tracking",
                json={"order_id": "#A10234"},
                headers={"x-loopguard-session": "agent-9"},
                timeout=30,
            )
            for _ in range(4)
        ]
    assert [r.status_code for r in responses] == [200] * 4
    assert tools.hits["lookup_tracking"] == 4
    assert {r["failure_stage"] for r in records} == {"store"}
