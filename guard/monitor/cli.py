"""The ``report`` and ``evaluate`` commands (``guard.cli`` parses, this runs them)."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson

from guard.monitor.policy import Policy, PolicyError, load_policy, parse_duration
from guard.monitor.report import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_PAGE,
    Options,
    ReportError,
    build_report,
    evaluate,
)
from guard.monitor.sources import SourceError


def parse_time(text: str, flag: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (naive means UTC) or a duration ago (``2h``: two hours before now)."""
    try:
        ts = datetime.fromisoformat(text)
        return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    except ValueError:
        pass
    try:
        return (now or datetime.now(UTC)) - parse_duration(text)
    except ValueError:
        raise ReportError(
            f"{flag}: {text!r} is neither an ISO 8601 time nor a duration (e.g. 2h)"
        ) from None


def _fail(message: str) -> int:
    print(f"loopguard: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _dump(obj: object) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2)


def run_report(args: argparse.Namespace) -> int:
    try:
        policy: Policy | None = load_policy(args.policy) if args.policy else None
        options = Options(
            inputs=args.records,
            policy=policy,
            window=args.window,
            since=parse_time(args.since, "--since") if args.since else None,
            until=parse_time(args.until, "--until") if args.until else None,
            candidate=args.candidate,
        )
        report = build_report(options)
    except (PolicyError, ReportError, SourceError) as exc:
        return _fail(str(exc))
    try:
        if args.incidents:
            _write_incidents(Path(args.incidents), report)
        if args.html:
            from guard.monitor.render_html import write_html

            write_html(report, Path(args.html))
    except OSError as exc:
        return _fail(f"cannot write {exc.filename}: {exc.strerror or exc}")
    if args.json:
        sys.stdout.buffer.write(_dump(report) + b"\n")
        sys.stdout.flush()
    else:
        from rich.console import Console

        from guard.monitor.render_terminal import render

        # Piped output (cron, CI logs) gets a wide table rather than 80 columns.
        render(report, Console(width=None if sys.stdout.isatty() else 140))
    for note in report["notes"]:
        print(f"loopguard: {note}", file=sys.stderr)
    if report["malformed_records"]["count"]:
        print(
            f"loopguard: {report['malformed_records']['count']} malformed record line(s) "
            "skipped (see malformed_records)",
            file=sys.stderr,
        )
    return EXIT_PAGE if report["exit_code"] == EXIT_PAGE else EXIT_OK


def _write_incidents(directory: Path, report: dict[str, object]) -> None:
    from guard.monitor.incident import markdown

    directory.mkdir(parents=True, exist_ok=True)
    incidents = report["incidents"]
    assert isinstance(incidents, list)
    for card in incidents:
        name = str(card["incident_id"]).replace(":", "_").replace(os.sep, "_")
        (directory / f"{name}.json").write_bytes(_dump(card) + b"\n")
        (directory / f"{name}.md").write_text(markdown(card), encoding="utf-8")
    if report.get("handoff"):
        (directory / "handoff.json").write_bytes(_dump(report["handoff"]) + b"\n")


def run_evaluate(args: argparse.Namespace) -> int:
    try:
        result = evaluate(args.handoff, args.records)
    except (ReportError, SourceError) as exc:
        return _fail(str(exc))
    ev = result["evaluation"]
    if args.json:
        sys.stdout.buffer.write(_dump(result) + b"\n")
    else:
        print(f"{ev['status']}: {ev['reason']} (candidate {ev['candidate_template']})")
        for w in ev["windows"]:
            mark = "ok" if w["passed"] else "FAIL"
            print(f"  {w['start']}  {w['requests']:>6} req  unsafe {w['unsafe_serves']}  {mark}")
    return EXIT_OK if ev["status"] == "PASSED" else EXIT_PAGE


def run_alerts(args: argparse.Namespace) -> int:
    """The policy as Prometheus alerting rules. Exit codes as ``report``'s: 0 written,
    1 bad input (policy, selector)."""
    from guard.monitor.alerts import render

    try:
        text = render(load_policy(args.policy), hold=args.hold, selector=args.selector)
    except (PolicyError, ValueError) as exc:
        return _fail(str(exc))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
    return 0
