"""The seed case end to end: six streamed chat calls through ``loopguard serve`` to a fake
OpenAI-style model whose responses carry the app's ``x-loopguard-app-*`` decisions, then
``loopguard report --json`` (a subprocess) on the records that serve wrote."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from monitor_seed import APP_HEADERS, BAD, MODEL, POLICY_TOML, TOKENS
from proxy_harness import loopguard_serve, wait_for
from servers import free_port, run_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

REPO = Path(__file__).resolve().parents[2]


def seed_model() -> Starlette:
    """Streams a short answer; call N (from the user message) gets the seed's Nth
    decision headers and token usage."""

    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        n = int(body["messages"][-1]["content"].split()[-1])
        inp, cached, out = TOKENS[n - 1]

        def sse(data: dict) -> bytes:
            return f"data: {json.dumps(data)}\n\n".encode()

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return sse(
                {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk",
                 "created": 1700000000, "model": body["model"], "choices": [choice]}
            )  # fmt: skip

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            await asyncio.sleep(0.02)
            for word in ("Your", " parcel", " is", " in", " transit."):
                yield chunk({"content": word})
                await asyncio.sleep(0.005)
            yield chunk({}, "stop")
            yield sse({"id": f"chatcmpl-{n}", "object": "chat.completion.chunk",
                       "created": 1700000000, "model": body["model"], "choices": [],
                       "usage": {"prompt_tokens": inp, "completion_tokens": out,
                                 "total_tokens": inp + out,
                                 "prompt_tokens_details": {"cached_tokens": cached}}})  # fmt: skip
            yield b"data: [DONE]\n\n"

        headers = {f"x-loopguard-app-{k}": v for k, v in APP_HEADERS[n - 1].items()}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_seed_case_through_loopguard_serve(tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY_TOML)
    port = free_port()
    with run_server(seed_model()) as upstream:
        config = tmp_path / "loopguard.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\n'
            f'[telemetry]\nrecords = "{records}"\n'
            f'[[routes]]\nprefix = "/openai"\nupstream = "{upstream}"\nadapter = "openai"\n'
        )
        with loopguard_serve(config, port) as (_proc, url), httpx.Client(timeout=10) as client:
            for n in range(1, 7):
                ask = {"role": "user", "content": f"where is my parcel, call {n}"}
                body = {"model": MODEL, "stream": True,
                        "stream_options": {"include_usage": True}, "messages": [ask]}  # fmt: skip
                with client.stream("POST", f"{url}/openai/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    text = "".join(r.iter_text())
                    assert "[DONE]" in text
                    # the app's decision headers are loopguard's to record, not the agent's
                    assert not [h for h in r.headers if h.startswith("x-loopguard-app-")]
            assert wait_for(lambda: len(records.read_text().splitlines()) >= 6, timeout=10)

    written = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(written) == 6
    proc = subprocess.run(
        # one window for the whole input: six calls may straddle a 5-minute boundary
        [sys.executable, "-m", "guard.cli", "report", str(records), "--policy", str(policy),
         "--window", "all", "--json"],
        capture_output=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr.decode()  # the PAGE
    report = json.loads(proc.stdout)
    [w] = report["windows"]
    assert w["requests"] == 6
    assert w["routes"] == {"serve": 6}
    assert w["unsafe_serves"] == 2 and round(w["unsafe_serve_rate"] * 100, 1) == 33.3
    assert w["abstentions"] == 3
    assert w["failure_stages"] == {
        "claim_generation": 2, "serving_gate": 2, "evidence_admission": 1,
    }  # fmt: skip
    # the tokens: 188+196+192+160+198+201, 80*5+64, 27+20+21+15+29+30
    assert w["tokens"] == {"input": 1135, "cached_input": 464, "output": 142}
    assert round(w["cost_usd"], 6) == 0.001427  # 1427.4 per million, as in the unit test
    assert w["ttft_ms"]["streamed_calls"] == 6 and w["ttft_ms"]["p95"] is not None
    [f] = report["findings"]
    assert f["headline"] == "PAGE unsafe_claim_served=2/6"
    # the fifth call loopguard recorded is the exemplar, with its real trace id
    assert f["exemplar"]["request_id"] == written[4]["request_id"]
    assert f["exemplar"]["trace_id"] == written[4]["trace_id"]
    assert f["exemplar"]["template"] == BAD and f["exemplar"]["model"] == MODEL
