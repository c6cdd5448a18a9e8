"""``loopguard report --html`` in a real headless Chromium: no console errors, the plots
drawn (plotly's SVG in the DOM after its JS ran), and a screenshot that is not blank.

Skipped on a machine without Chromium; under CI (``CI`` set) a missing browser fails,
as the ``redis_url`` fixture does for Redis.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from monitor_seed import POLICY_TOML, seed_records

from guard.cli import main

# Collects uncaught errors and console.error calls into an attribute --dump-dom shows.
_CATCHER = (
    "<script>(function(){var errs=[];function keep(m){errs.push(String(m));"
    "document.documentElement.setAttribute('data-page-errors',JSON.stringify(errs));}"
    "addEventListener('error',function(e){keep(e.message||'resource error')},true);"
    "addEventListener('unhandledrejection',function(e){keep(e.reason)});"
    "var ce=console.error;console.error=function(){keep([].join.call(arguments,' '));"
    "ce.apply(console,arguments)};})();</script>"
)


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run must install it")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return binary


def browse(chromium: str, page: Path, tmp: Path) -> tuple[str, bytes, str]:
    """(DOM after scripts ran, screenshot PNG, browser log) for ``page``, offline."""
    instrumented = tmp / f"instrumented-{page.name}"
    instrumented.write_text(
        page.read_text(encoding="utf-8").replace("<head>", "<head>" + _CATCHER, 1),
        encoding="utf-8",
    )
    base = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr",
        "--v=0", "--window-size=1280,2000", "--virtual-time-budget=10000",
        # offline: any network request would fail (and show up as an error)
        "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
    ]  # fmt: skip
    url = instrumented.as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, timeout=120)
    shot = tmp / "shot.png"
    snap = subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    log = dom.stderr.decode(errors="replace") + snap.stderr.decode(errors="replace")
    return dom.stdout.decode(errors="replace"), shot.read_bytes(), log


def png_colours(data: bytes, step: int = 7) -> set[tuple[int, ...]]:
    """Distinct colours of a sample of pixels of an 8-bit RGB/RGBA PNG (zlib only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, ctype = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    bpp = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, colours, i = bytearray(stride), set(), 0
    for y in range(height):
        ftype, line = raw[i], bytearray(raw[i + 1 : i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            if ftype == 1:
                line[x] = (line[x] + a) & 0xFF
            elif ftype == 2:
                line[x] = (line[x] + b) & 0xFF
            elif ftype == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pred) & 0xFF
        if y % step == 0:
            for x in range(0, width, step):
                colours.add(tuple(line[x * bpp : x * bpp + 3]))
        prev = line
    return colours


def check_page(dom: str, png: bytes, log: str) -> list[str]:
    """What is wrong with a rendered page (empty: nothing)."""
    problems = []
    errors = re.search(r'data-page-errors="([^"]*)"', dom)
    if errors:
        problems.append(f"page errors: {errors.group(1)}")
    console = [
        ln for ln in log.splitlines() if "CONSOLE" in ln and ("rror" in ln or "Uncaught" in ln)
    ]
    if console:
        problems.append(f"console: {console}")
    if len(png_colours(png)) < 8:
        problems.append("blank screenshot")
    return problems


@pytest.fixture
def report_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY_TOML)
    records = seed_records()
    records += [{**r, "ts": r["ts"].replace("T09:00", "T09:07"), "request_id": f"b-{i}"}
                for i, r in enumerate(seed_records()[:4])]  # fmt: skip
    records.append({**records[0], "ts": "2026-05-27T09:12:00Z", "route": "stop_and_review",
                    "tool": "lookup_tracking", "stall_rule": "stalled_repeat"})  # fmt: skip
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    html = tmp_path / "report.html"
    assert main(["report", str(path), "--policy", str(policy), "--html", str(html)]) == 2
    capsys.readouterr()
    return html


def test_html_report_renders_in_chromium(chromium: str, report_html: Path, tmp_path: Path) -> None:
    text = report_html.read_text(encoding="utf-8")
    # self-contained: no external script, stylesheet or font (plotly.js's own source,
    # inline, mentions URLs in strings: look at the page outside the scripts)
    assert not re.search(r"<script[^>]+src=", text)
    text = re.sub(r"<script>.*?</script>", "", text, flags=re.S)
    assert not re.search(r"""(href|src)=["']?(https?:)?//""", text)
    assert "@import" not in text and "@font-face" not in text
    dom, png, log = browse(chromium, report_html, tmp_path)
    assert check_page(dom, png, log) == []
    # four plotly charts drawn by plotly.js (its SVG exists only after the JS ran)
    assert dom.count('class="plot-container plotly"') == 4
    assert dom.count('class="main-svg"') >= 4
    # findings with their exemplar come first
    assert dom.index("PAGE unsafe_claim_served=2/6") < dom.index('class="plot-container')
    assert "req-5" in dom and "internal-fixture-2026-05-27" in dom


def test_the_browser_check_catches_a_broken_page(chromium: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.html"
    broken.write_text("<html><head></head><body><script>undefinedThing()</script></body></html>")
    dom, png, log = browse(chromium, broken, tmp_path)
    problems = check_page(dom, png, log)
    assert any("undefinedThing" in p for p in problems)
    assert "blank screenshot" in problems
