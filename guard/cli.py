"""``loopguard`` command line: serve | replay | demo | report | evaluate | alerts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from guard.engine.config import Config, ConfigError

# Commands that read records or a monitoring policy, never the proxy config.
MONITOR_COMMANDS = ("report", "evaluate", "alerts")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopguard", description="Stop agents that loop, and measure what they call."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the reverse proxy")
    serve.add_argument("--config", "-c", help="TOML config file (defaults if omitted)")
    serve.add_argument("--listen", help="host:port, overrides [server] listen")
    serve.add_argument(
        "--workers", type=int, help="worker processes, overrides [server] workers (needs Redis)"
    )
    serve.add_argument("--admin-listen", help="host:port, overrides [admin] listen")

    replay = commands.add_parser("replay", help="replay a recorded trajectory through the detector")
    replay.add_argument(
        "file",
        help="JSONL steps, an OpenAI / Anthropic transcript (JSON), a SWE-agent .traj or an "
        "OpenHands event log; with --summary a folder",
    )
    replay.add_argument("--config", "-c", help="TOML config file (defaults if omitted)")
    replay.add_argument("--json", action="store_true", help="one JSON object per step")
    replay.add_argument(
        "--summary", action="store_true", help="FILE is a folder: per file its first block, a total"
    )

    demo = commands.add_parser("demo", help="a looping agent against loopguard, all in-process")
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.add_argument("--records", help="where to write the durable records (JSONL)")

    report = commands.add_parser(
        "report",
        help="windows, findings and costs from durable records",
        description="Exit codes: 0 no PAGE, 2 a PAGE fired, 1 bad input (unreadable "
        "file, glob matching nothing, bad policy or time); argparse usage errors exit 2.",
    )
    report.add_argument("records", nargs="+", help="record files, globs, .gz, or - for stdin")
    report.add_argument("--policy", help="monitoring policy (TOML: [monitor], [[rate_cards]])")
    report.add_argument("--window", help="window length (5m, 1h...) or 'all'; default: policy's")
    report.add_argument("--since", help="from this time (ISO 8601, or a duration ago: 2h)")
    report.add_argument("--until", help="up to this time, excluded (ISO 8601 or duration ago)")
    report.add_argument("--json", action="store_true", help="one JSON object on stdout")
    report.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    report.add_argument("--candidate", help="candidate template: write an experiment handoff")
    report.add_argument("--incidents", metavar="DIR", help="write incident cards (JSON + MD)")

    evaluate = commands.add_parser(
        "evaluate",
        help="measure a handoff's candidate on its records: PASSED or BLOCKED",
        description="Exit codes: 0 PASSED, 2 BLOCKED, 1 bad input.",
    )
    evaluate.add_argument("handoff", help="HANDOFF.json written by 'loopguard report --candidate'")
    evaluate.add_argument("records", nargs="+", help="record files, globs, .gz, or - for stdin")
    evaluate.add_argument("--json", action="store_true", help="the evaluated handoff as JSON")

    alerts = commands.add_parser(
        "alerts", help="write a monitoring policy as Prometheus alerting rules (YAML)"
    )
    alerts.add_argument("--policy", required=True, help="monitoring policy TOML ([monitor])")
    alerts.add_argument("-o", "--output", help="rules file to write (default: stdout)")
    alerts.add_argument(
        "--for", dest="hold", default="0s", help="how long a rule must hold before firing"
    )
    alerts.add_argument(
        "--selector", default="", help='label matchers for every series, e.g. job="loopguard"'
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command in MONITOR_COMMANDS:
        # The monitor needs no proxy config, and imports nothing from the proxy.
        from guard.monitor import cli as monitor_cli

        run: Callable[[argparse.Namespace], int] = getattr(monitor_cli, f"run_{args.command}")
        return run(args)
    try:
        config = Config.load(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"loopguard: {exc}", file=sys.stderr)
        return 2

    if args.command == "serve":
        from guard.doors.serve import serve

        overrides = {"listen": args.listen, "workers": args.workers}
        given = {key: value for key, value in overrides.items() if value is not None}
        flags = [f"--{key}" for key in given]
        admin = {}
        if args.admin_listen is not None:
            admin["listen"] = args.admin_listen
            flags.append("--admin-listen")
        if flags:
            try:
                config = Config.from_mapping(
                    {
                        **config.model_dump(),
                        "server": {**config.server.model_dump(), **given},
                        "admin": {**config.admin.model_dump(), **admin},
                    },
                    source=" ".join(flags),
                )
            except ConfigError as exc:
                print(f"loopguard: {exc}", file=sys.stderr)
                return 2
        return serve(config)
    if args.command == "replay":
        from guard.doors import replay

        if args.summary:
            return replay.summary(args.file, config, out=sys.stdout)
        return replay.run(args.file, config, as_json=args.json, out=sys.stdout)
    if args.command == "demo":
        from guard.devtools import demo

        return demo.run(as_json=args.json, records=args.records)
    return 2


if __name__ == "__main__":
    sys.exit(main())
