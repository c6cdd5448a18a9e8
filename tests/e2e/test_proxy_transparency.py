"""The upstream client is transparent: what the upstream answers is what the agent gets,
what the agent sends is what the upstream sees.

A redirect is passed back, not followed; a cookie one agent's upstream sets is never
sent on another's call; an encoded body passes through as the encoded bytes; a path
and query are forwarded exactly as sent, no percent-escape re-quoted.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from proxy_harness import guarded_proxy, proxy_config
from servers import run_server

GZIPPED = gzip.compress(b'{"status":"in transit"}' * 20)


class Upstream:
    """A raw-ASGI upstream that keeps every request it gets (raw path, query, headers)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append(
            {"raw_path": scope["raw_path"], "query": scope["query_string"], "headers": headers}
        )
        status, extra, body = 200, [], json.dumps(self.seen[-1], default=repr).encode()
        if scope["path"] == "/redirect":
            status, body = 302, b""
            extra = [(b"location", b"/elsewhere"), (b"set-cookie", b"sid=agent-one; Path=/")]
        elif scope["path"] == "/gzip":
            body = GZIPPED
            extra = [(b"content-encoding", b"gzip"), (b"content-type", b"application/json")]
        head = [*extra, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def upstream() -> Iterator[tuple[Upstream, str]]:
    app = Upstream()
    with run_server(app) as url:
        yield app, url


def test_a_redirect_is_passed_back_and_its_cookie_never_reaches_another_call(
    upstream: tuple[Upstream, str],
) -> None:
    app, url = upstream
    # A host name: a cookie jar would keep no cookie set by an IP address.
    url = url.replace("127.0.0.1", "localhost")
    with guarded_proxy(proxy_config(url)) as (proxy, _):
        with httpx.Client(base_url=proxy, follow_redirects=False) as agent_one:
            redirect = agent_one.get("/tools/redirect")
        httpx.get(f"{proxy}/tools/next")
    assert redirect.status_code == 302
    assert redirect.headers["location"] == "/elsewhere"
    assert redirect.headers["set-cookie"] == "sid=agent-one; Path=/"
    # Not followed: the upstream saw the redirecting call, then the next agent's call ...
    assert [seen["raw_path"] for seen in app.seen] == [b"/redirect", b"/next"]
    # ... which carried no cookie the proxy could have kept from the first.
    assert "cookie" not in app.seen[1]["headers"]


def test_an_encoded_body_passes_through_as_the_encoded_bytes(
    upstream: tuple[Upstream, str],
) -> None:
    _, url = upstream
    with (
        guarded_proxy(proxy_config(url)) as (proxy, records),
        httpx.stream("GET", f"{proxy}/tools/gzip") as response,
    ):
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) == len(GZIPPED)
    assert raw == GZIPPED
    assert records[0]["failure_stage"] == "passed"


def test_the_path_and_query_are_forwarded_as_sent(upstream: tuple[Upstream, str]) -> None:
    app, url = upstream
    raw_path = "/tools/a%2Fb/%7e%20x/caf%C3%A9"
    with guarded_proxy(proxy_config(url)) as (proxy, _):
        # httpx would normalize the path of a URL string; the raw target goes as it is.
        request = httpx.Request("GET", f"{proxy}/tools/x?q=%2f+%7E&r=a%20b")
        request.url = request.url.copy_with(raw_path=f"{raw_path}?q=%2f+%7E&r=a%20b".encode())
        with httpx.Client() as client:
            assert client.send(request).status_code == 200
    assert app.seen[0]["raw_path"] == b"/a%2Fb/%7e%20x/caf%C3%A9"
    assert app.seen[0]["query"] == b"q=%2f+%7E&r=a%20b"
