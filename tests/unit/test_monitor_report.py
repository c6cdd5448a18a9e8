"""``loopguard report`` on record files: the seed case's figures, by hand, and the inputs.

Expected values are computed in the comments from the issue's numbers, never copied
from the program's output.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import random
import tomllib
from fractions import Fraction
from pathlib import Path
from typing import Any

import duckdb
import pytest
from monitor_seed import BAD, EVIDENCE, MODEL, POLICY_TOML, seed_records

from guard.cli import main
from guard.engine.timing import percentile
from guard.monitor import LiveMonitor
from guard.monitor import definitions as d
from guard.monitor.policy import PolicyError, glob_regex, load_policy, policy_from_mapping
from guard.monitor.report import Options, build_report

POLICY = policy_from_mapping(tomllib.loads(POLICY_TOML))


def write(path: Path, records: list[dict[str, Any]], extra: list[str] = ()) -> Path:  # type: ignore[assignment]
    lines = [json.dumps(r) for r in records] + list(extra)
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any] | str, str]:
    code = main(["report", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv else out), err


# -- the seed case ------------------------------------------------------------------------


def test_seed_case(tmp_path: Path, policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = write(tmp_path / "r.jsonl", seed_records())
    code, report, _ = run(capsys, str(records), "--policy", str(policy_file), "--json")
    assert isinstance(report, dict)
    assert code == 2  # a PAGE fired
    assert report["policy_id"] == "delivery-grounding-slo-v1"
    assert report["rate_card"] == "internal-fixture-2026-05-27"
    [w] = report["windows"]
    assert (w["start"], w["end"]) == ("2026-05-27T09:00:00Z", "2026-05-27T09:05:00Z")
    assert w["requests"] == 6
    # two unsafe serves of six: 2/6 = 33.3 %; safe-route 4/6 = 66.7 %
    assert w["unsafe_serves"] == 2
    assert round(w["unsafe_serve_rate"] * 100, 1) == 33.3
    assert round(w["safe_route_rate"] * 100, 1) == 66.7
    assert w["abstentions"] == 3  # shown, and no finding of its own
    assert w["failure_stages"] == {
        "claim_generation": 2, "serving_gate": 2, "evidence_admission": 1,
    }  # fmt: skip
    # TTFTs 172 181 188 205 218 240; nearest rank: p50 = ceil(3)rd = 188,
    # p95 = ceil(5.7) = 6th = 240, p99 = ceil(5.94) = 6th = 240
    assert w["ttft_ms"] == {"p50": 188.0, "p95": 240.0, "p99": 240.0, "streamed_calls": 6}
    # the last call: (30 - 1) tokens / (455 - 240) ms = 29 / 0.215 s = 134.88 tok/s, the
    # fastest of the six (the others: 26/.238=109.2, 19/.214=88.8, 20/.214=93.5,
    # 14/.177=79.1, 28/.212=132.1), so the window's nearest-rank p95 (6th of 6) too
    assert round(w["output_tps"]["p95"], 1) == 134.9
    assert w["output_tps"]["malformed_timings"] == 0
    # (in - cached) * 1 + cached * 0.10 + out * 5 per million, per call:
    # 108+8+135=251, 116+8+100=224, 112+8+105=225, 96+6.4+75=177.4, 118+8+145=271,
    # 121+8+150=279 -> 1427.4 / 1e6 = 0.0014274 USD
    assert w["tokens"] == {"input": 1135, "cached_input": 464, "output": 142}
    assert round(w["cost_usd"], 6) == 0.001427
    assert w["rate_card"] == "internal-fixture-2026-05-27"
    # exactly one finding: p95 240 <= 500 and 0.0014274 <= 0.002 stay quiet
    assert [f["headline"] for f in w["findings"]] == ["PAGE unsafe_claim_served=2/6"]
    [f] = report["findings"]
    assert (f["severity"], f["metric"], f["value"], f["threshold"]) == (
        "PAGE", "unsafe_claim_served", 2, 0,
    )  # fmt: skip
    assert f["exemplar"]["request_id"] == "req-5"  # the fifth request, the first unsafe
    assert f["exemplar"]["trace_id"] == f"{5:032x}"
    assert f["exemplar"]["template"] == BAD
    assert f["exemplar"]["evidence_version"] == EVIDENCE
    assert f["exemplar"]["failure_stage"] == "serving_gate"
    assert f["first_check"] == "Compare serving-gate template with tracking-answerer-v1."
    [incident] = report["incidents"]
    assert incident["failing_template"] == BAD


def test_seed_last_request_cost_and_throughput(
    tmp_path: Path, policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = seed_records()[-1]
    # 121 uncached * 1 + 80 cached * 0.1 + 30 out * 5 = 279 per million
    card = POLICY.card_for(MODEL)
    assert round(d.cost(card, d.tokens(last)) or 0, 6) == 0.000279
    assert round(d.throughput(last).tps or 0, 1) == 134.9
    # the same from the report's SQL: a window holding only the last call
    records = write(tmp_path / "r.jsonl", seed_records())
    code, report, _ = run(
        capsys, str(records), "--policy", str(policy_file), "--json",
        "--since", "2026-05-27T09:00:06Z",
    )  # fmt: skip
    assert isinstance(report, dict)
    [w] = report["windows"]
    assert w["requests"] == 1 and round(w["cost_usd"], 6) == 0.000279
    assert round(w["output_tps"]["p50"], 1) == 134.9
    assert code == 2  # the sixth call is unsafe: 1 > 0


def test_malformed_timing_is_counted_never_divided(tmp_path: Path) -> None:
    bad = {**seed_records()[0], "request_id": "bad-timing", "ttft_ms": 240.0,
           "total_ms": 240.0, "output_tokens": 30}  # fmt: skip
    assert d.throughput(bad) == d.Throughput(None, True)
    report = build_report(Options([str(write(tmp_path / "r.jsonl", [bad]))], POLICY))
    [w] = report["windows"]
    assert w["output_tps"]["malformed_timings"] == 1
    assert w["output_tps"]["calls"] == 0 and w["output_tps"]["p50"] is None


def test_live_status_agrees_with_the_batch_report(tmp_path: Path) -> None:
    records = seed_records()
    records.append({**records[0], "request_id": "bad", "ttft_ms": 240.0, "total_ms": 240.0,
                    "output_tokens": 30})  # fmt: skip
    records += loop_records()
    batch = build_report(Options([str(write(tmp_path / "r.jsonl", records))], POLICY))
    live = LiveMonitor(POLICY)
    for record in records:
        live.add(record)
    status = live.status(now=__import__("datetime").datetime.fromisoformat("2026-05-27T09:01Z"))
    assert status["window_current"] == batch["windows"][0]
    assert status["findings"] == batch["findings"]


# -- loops -------------------------------------------------------------------------------


def loop_records() -> list[dict[str, Any]]:
    """Session L: three calls of lookup(h1), a stop, two more, another stop; noise between."""
    base = {"event": "call", "session": "s_loop", "tool": "lookup", "params_hash": "h1",
            "route": "serve", "failure_stage": "passed", "model": None, "app": {}}  # fmt: skip
    out = []
    for i, route in enumerate(["serve", "serve", "nudge", "stop_and_review", "serve", "serve",
                               "stop_and_review"]):  # fmt: skip
        out.append({**base, "ts": f"2026-05-27T09:01:{i:02d}Z", "request_id": f"loop-{i}",
                    "route": route, "input_tokens": 10, "output_tokens": 2,
                    "stall_rule": "stalled_repeat" if route == "stop_and_review" else None,
                    })  # fmt: skip
    # Same session, other params: not part of the streak.
    out.append({**base, "ts": "2026-05-27T09:01:30Z", "request_id": "other", "params_hash": "h2",
                "input_tokens": 100, "output_tokens": 100})  # fmt: skip
    return out


def test_loop_statistics(tmp_path: Path) -> None:
    report = build_report(Options([str(write(tmp_path / "r.jsonl", loop_records()))], POLICY))
    loops = report["windows"][0]["loops"]
    assert loops["nudges"] == 1
    assert loops["stops"] == 2
    assert loops["stops_by_rule"] == {"stalled_repeat": 2}
    assert loops["stops_by_tool"] == {"lookup": 2}
    assert loops["sessions_stopped"] == 1
    # first stop: the 3 calls before it (serve, serve, nudge); second: the 2 after the
    # first stop. 5 calls, 5 * 10 input and 5 * 2 output tokens; "other" is not counted
    assert loops["streak_calls"] == 5
    assert (loops["streak_input_tokens"], loops["streak_output_tokens"]) == (50, 10)


# -- inputs --------------------------------------------------------------------------------


def test_files_globs_gzip_and_stdin_give_the_same_report(
    tmp_path: Path, policy_file: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    records = seed_records()
    whole = write(tmp_path / "all.jsonl", records)
    write(tmp_path / "replica-a.jsonl", records[:2])
    write(tmp_path / "replica-b.jsonl", records[2:4])
    write(tmp_path / "replica-c.jsonl.gz", records[4:])

    def figures(*inputs: str, stdin: bytes | None = None) -> Any:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        code, report, _ = run(capsys, *inputs, "--policy", str(policy_file), "--json")
        assert isinstance(report, dict)
        return code, report["records"], report["windows"]

    expected = figures(str(whole))
    assert expected[1] == 6
    assert figures(str(tmp_path / "replica-*")) == expected
    assert figures(str(tmp_path / "replica-a.jsonl"), str(tmp_path / "replica-b.jsonl"),
                   str(tmp_path / "replica-c.jsonl.gz")) == expected  # fmt: skip
    assert figures("-", stdin=whole.read_bytes()) == expected
    assert figures("-", stdin=gzip.compress(whole.read_bytes())) == expected


def test_since_until_and_windows(tmp_path: Path, policy_file: Path) -> None:
    records = seed_records()
    # move the last two calls (the unsafe ones) ten minutes later
    for r in records[4:]:
        r["ts"] = r["ts"].replace("T09:00:", "T09:10:")
    path = str(write(tmp_path / "r.jsonl", records))
    five = build_report(Options([path], POLICY))
    assert [(w["start"], w["requests"], w["unsafe_serves"]) for w in five["windows"]] == [
        ("2026-05-27T09:00:00Z", 4, 0), ("2026-05-27T09:10:00Z", 2, 2),
    ]  # fmt: skip
    assert [f["window"]["start"] for f in five["findings"]] == ["2026-05-27T09:10:00Z"]
    whole = build_report(Options([path], POLICY, window="all"))
    [w] = whole["windows"]
    assert (w["requests"], w["start"], w["end"]) == (
        6, "2026-05-27T09:00:01Z", "2026-05-27T09:10:06Z",
    )  # fmt: skip
    parse = __import__("guard.monitor.cli", fromlist=["parse_time"]).parse_time
    early = build_report(Options([path], POLICY, until=parse("2026-05-27T09:05:00Z", "--until")))
    assert early["records"] == 4 and early["findings"] == [] and early["exit_code"] == 0
    late = build_report(Options([path], POLICY, since=parse("2026-05-27T09:10:05", "--since")))
    assert late["records"] == 2  # 09:10:05 (since is inclusive) and 09:10:06; naive is UTC


def test_malformed_lines_are_counted_with_their_line_numbers(
    tmp_path: Path, policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "r.jsonl", seed_records()[:2], [
        "not json", "[1, 2]", '{"no_ts": 1}', '{"ts": "yesterday"}', "",
        '{"ts": "2026-05-27T09:00:09Z"',
    ])  # fmt: skip
    code, report, err = run(capsys, str(path), "--policy", str(policy_file), "--json")
    assert isinstance(report, dict)
    assert code == 0 and report["records"] == 2
    bad = report["malformed_records"]
    assert bad["count"] == 5  # the blank line is not a record, nor a malformed one
    assert [(e["line"], e["reason"]) for e in bad["examples"]] == [
        (3, "not JSON"), (4, "not a JSON object"), (5, "no ts"),
        (6, "ts is not an ISO 8601 time"), (8, "not JSON"),
    ]  # fmt: skip
    assert all(e["file"] == str(path) for e in bad["examples"])
    assert "5 malformed" in err


def test_unpriced_models_are_counted_never_priced(tmp_path: Path) -> None:
    records = seed_records()
    records[0]["model"] = "claude-fixture"
    records.append({**records[1], "request_id": "tool", "model": None, "input_tokens": None,
                    "output_tokens": None, "cached_input_tokens": None})  # fmt: skip
    priced_gpt = policy_from_mapping({
        "monitor": {"policy_id": "p"},
        "rate_cards": [
            {"version": "v-gpt", "models": ["gpt-*"], "input_per_million": 1.0,
             "cached_input_per_million": 0.1, "output_per_million": 5.0},
        ],
    })  # fmt: skip
    path = str(write(tmp_path / "r.jsonl", records))
    [w] = build_report(Options([path], priced_gpt))["windows"]
    # the claude call (251 per million) is unpriced: 1427.4 - 251 = 1176.4 per million
    assert w["unpriced_calls"] == 1 and w["unpriced_models"] == ["claude-fixture"]
    assert round(w["cost_usd"], 7) == 0.0011764
    assert w["priced_calls"] == 5  # the tool call (no model, no tokens) is neither
    report = build_report(Options([path], None))
    assert report["rate_card"] is None and report["windows"][0]["cost_usd"] is None
    assert report["totals"]["cost_usd"] is None


# -- exit codes and bad input ---------------------------------------------------------------


def test_exit_codes(tmp_path: Path, policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    safe = write(tmp_path / "safe.jsonl", seed_records()[:4])
    unsafe = write(tmp_path / "unsafe.jsonl", seed_records())
    assert run(capsys, str(safe), "--policy", str(policy_file))[0] == 0
    assert run(capsys, str(unsafe), "--policy", str(policy_file))[0] == 2
    assert run(capsys, str(unsafe))[0] == 0  # no policy: figures, no rules
    code, _, err = run(capsys, str(tmp_path / "missing.jsonl"))
    assert code == 1 and "no such file" in err
    code, _, err = run(capsys, str(tmp_path / "nothing-*.jsonl"))
    assert code == 1 and "no record files match" in err
    bad_policy = tmp_path / "bad.toml"
    bad_policy.write_text(POLICY_TOML.replace("max_p95_ttft_ms = 500", 'max_p95_ttft_ms = "fast"'))
    code, _, err = run(capsys, str(safe), "--policy", str(bad_policy))
    assert code == 1 and "monitor.max_p95_ttft_ms" in err
    code, _, err = run(capsys, str(safe), "--since", "last tuesday")
    assert code == 1 and "--since" in err
    code, _, err = run(capsys, str(safe), "--window", "fortnight")
    assert code == 1 and "--window" in err
    code, _, err = run(capsys, str(safe), "--html", str(tmp_path / "no" / "such" / "r.html"))
    assert code == 1 and "cannot write" in err


def test_policy_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(POLICY_TOML.replace("output_per_million = 5.00", "output_per_milion = 5.00"))
    with pytest.raises(PolicyError, match=r"rate_cards\[0\]"):
        load_policy(path)
    path.write_text('[monitor]\npolicy_id = "x"\nwindow = "soon"\n')
    with pytest.raises(PolicyError, match=r"monitor\.window"):
        load_policy(path)
    path.write_text("[monitor\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(path)


def test_terminal_report_reads_well(
    tmp_path: Path, policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "r.jsonl", seed_records())
    code, out, _ = run(capsys, str(path), "--policy", str(policy_file))
    assert isinstance(out, str) and code == 2
    assert out.index("PAGE unsafe_claim_served=2/6") < out.index("windows")  # findings first
    assert "req-5" in out and "internal-fixture-2026-05-27" in out and "0.001427" in out


# -- one definition, two engines -----------------------------------------------------------


@pytest.mark.parametrize(
    "pattern", ["*", "gpt-*", "gpt-4o-mini-????-??-??", "claude-[0-9]*", "m[!x]del", "a.b*", "x+y"]
)
def test_globs_match_alike_in_python_and_duckdb(pattern: str) -> None:
    import fnmatch

    names = ["gpt-4o-mini-2024-07-18", "gpt-", "claude-3", "claude-x", "model", "mxdel",
             "a.bc", "aXbc", "x+y", "xxy", "", "line\nbreak"]  # fmt: skip
    rx = glob_regex(pattern)
    con = duckdb.connect()
    for name in names:
        (in_sql,) = con.execute("SELECT regexp_full_match(?, ?)", [name, rx]).fetchone() or (None,)
        assert in_sql == fnmatch.fnmatchcase(name, pattern), (pattern, name)
        assert bool(__import__("re").fullmatch(rx, name)) == in_sql


def test_nearest_rank_is_the_timing_modules_and_duckdbs() -> None:
    rng = random.Random(11)
    con = duckdb.connect()
    for n in (1, 2, 3, 6, 10, 20, 99, 100, 101):
        values = sorted(round(rng.uniform(1, 500), 3) for _ in range(n))
        for q in (0.05, 0.3, 0.5, 0.95, 0.99):
            ours = d.nearest_rank(values, q)
            # rank ceil(q * n), computed exactly as a fraction
            rank = max(1, math.ceil(Fraction(round(q * 100), 100) * n))
            assert ours == values[rank - 1]
            assert ours == percentile(values, round(q * 100)) or round(q * n, 9) == int(q * n)
            (sql,) = con.execute(
                f"SELECT {d.SQL.nearest_rank('v', q)} FROM (SELECT ?::DOUBLE[] AS v)", [values]
            ).fetchone() or (None,)
            assert sql == ours


def test_engine_memory_is_capped_and_retried_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guard.monitor import windows

    assert windows._megabytes("200MB") == 200 and windows._megabytes("1.5GiB") == 1536
    caps: list[str] = []
    real = windows._run

    def tight(*args: Any) -> Any:
        caps.append(args[2])
        if len(caps) == 1:
            raise duckdb.OutOfMemoryException("Out of Memory Error: window too large")
        return real(*args)

    monkeypatch.setattr(windows, "_run", tight)
    monkeypatch.setenv("LOOPGUARD_REPORT_MEMORY", "100MB")
    report = build_report(Options([str(write(tmp_path / "r.jsonl", seed_records()))], POLICY))
    assert caps == ["100MB", "800MB"]
    assert report["records"] == 6
    assert report["notes"] == ["engine memory raised from 100MB to 800MB for this input"]
