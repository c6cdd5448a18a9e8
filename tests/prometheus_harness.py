"""Prometheus for the live-monitoring tests: the binaries, a real server, scrape parsing.

The binaries come from Debian's ``prometheus`` package (``prometheus`` and
``promtool``). A developer's machine without them skips those tests; under CI (``CI``
set) a missing binary fails instead, so a green CI always means they ran.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port

T = TypeVar("T")


def require_binary(name: str) -> str:
    """The binary's path; skipped when missing, failed when missing under CI."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: .ci/run must install Debian's prometheus")
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text -> {(sample name, labels without the otel scope ones): value}.

    An empty label is no label, as Prometheus reads it (the exporter writes ``""`` for
    an attribute that one point of a family lacks)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset(
                (k, v) for k, v in sample.labels.items() if v and not k.startswith("otel_scope_")
            )
            out[(sample.name, labels)] = sample.value
    return out


def poll(probe: Callable[[], T | None], deadline_s: float = 60.0, every_s: float = 0.25) -> T:
    """``probe()`` until it returns something other than None; fails at the deadline.

    The deadline is generous on purpose: it bounds a broken test, it measures nothing.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {deadline_s:.0f} s waiting for {probe.__name__}")
        time.sleep(every_s)


@contextlib.contextmanager
def run_prometheus(target: str, rules: Path, workdir: Path) -> Iterator[str]:
    """A real Prometheus scraping ``target`` (host:port, path /metrics) every second and
    evaluating ``rules`` every second; yields its base URL once it is ready."""
    binary = require_binary("prometheus")
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {rules}\n"
        "scrape_configs:\n  - job_name: loopguard\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool | None:
        assert proc.poll() is None, (workdir / "prometheus.log").read_text()
        try:
            return True if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200 else None
        except httpx.TransportError:
            return None

    try:
        poll(ready, deadline_s=30)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def api(url: str, path: str, **params: Any) -> Any:
    """``GET {url}/api/v1/{path}``'s ``data``."""
    response = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]
