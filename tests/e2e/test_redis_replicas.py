"""Two loopguard replicas behind a load balancer share their sessions through Redis.

A looping agent whose calls alternate between the replicas is stopped on the call
after ``max_repeats`` all the same, and the tool never sees that call. With Redis
down, calls are served (fail open) and recorded with failure stage ``store``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess

import httpx
from proxy_harness import ToolServer, guarded_proxy, loopguard_serve, proxy_config
from servers import dead_port, free_port, run_server


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
    dead = f"redis://127.0.0.1:{dead_port()}/0"
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


def test_loopguard_serve_workers_share_sessions_and_stop_cleanly(redis_url: str, tmp_path) -> None:
    """``loopguard serve`` with ``workers = 2``: two processes on one socket, sessions in
    Redis. Every agent is stopped on its 4th identical call whichever worker takes it
    (fresh connections, so calls spread over the workers), and SIGTERM ends both with
    every call's record on disk, one whole JSON line each."""
    tools = ToolServer()
    port = free_port()
    records = tmp_path / "records.jsonl"
    config = tmp_path / "loopguard.toml"
    with run_server(tools.app()) as upstream:
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\nworkers = 2\n'
            f'[store]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "workers:"\n'
            f'[telemetry]\nrecords = "{records}"\n'
            f'[[routes]]\nprefix = "/tools"\nupstream = "{upstream}"\nadapter = "http-tool"\n'
        )
        with loopguard_serve(config, port, timeout=30, ready=_two_workers) as (proc, url):
            routes: dict[int, set[str]] = {}
            for call in range(4):
                for agent in range(20):
                    response = httpx.post(  # a new connection each time
                        f"{url}/tools/lookup_tracking",
                        json={"order_id": "#A10234"},
                        headers={"x-loopguard-session": f"worker-agent-{agent}"},
                        timeout=10,
                    )
                    routes.setdefault(call, set()).add(response.headers["x-loopguard-route"])
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    log = proc.communicate()[1].decode()
    assert log.count("Started server process") == 2, log
    assert routes == {0: {"serve"}, 1: {"serve"}, 2: {"serve"}, 3: {"stop_and_review"}}
    assert tools.hits["lookup_tracking"] == 60
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 80 and sum(r["route"] == "stop_and_review" for r in rows) == 20


def _two_workers(proc: subprocess.Popen[bytes]) -> bool:
    return len(_children(proc.pid)) >= 2


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found
