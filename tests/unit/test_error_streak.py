"""The error-streak rule (issue 14, class 2): the same tool failing with the same error
text, whatever the arguments, with nothing new in between. Built from realistic error
texts, each case beside its hard negative (real progress of a similar shape)."""

from __future__ import annotations

from typing import Any

from guard.engine.calls import StallRule, Step
from guard.engine.config import Config
from guard.engine.contract import HistoryStep
from guard.engine.conversation import analyze
from guard.engine.core import Engine
from guard.engine.store import MemoryStore
from guard.engine.telemetry_port import NullTelemetry

DENIED = (
    '{"message": "Resource not accessible by integration", '
    '"documentation_url": "https://docs.github.com/rest/issues/comments", "status": "403"}'
)
NOT_FOUND = "Error: tool 'deploy_service' not found. Available tools: read_file, bash"


def engine(**loop: Any) -> Engine:
    config = Config.from_mapping({"loop": loop, "telemetry": {"records": ""}})
    return Engine(config, store=MemoryStore(), telemetry=NullTelemetry())


class Agent:
    """Drives the engine as a front door does: check, then record what came back."""

    def __init__(self, eng: Engine) -> None:
        self.engine = eng

    def call(self, tool: str, params: Any, outcome: Any, error: bool = False) -> str:
        import asyncio

        async def run() -> str:
            h = self.engine.fingerprint(params)
            verdict = await self.engine.check("s", tool, h)
            if verdict.blocked:
                return str(verdict.rule)
            marker = self.engine.marker(tool, outcome)
            await self.engine.record("s", Step(tool, h, marker, error))
            return "served"

        return asyncio.run(run())


def comment(n: int) -> dict[str, Any]:
    return {"repo": "acme/api", "issue": 40 + n, "body": f"Fixed in attempt {n}"}


def test_same_permission_error_under_varying_arguments_is_stopped() -> None:
    agent = Agent(engine())
    results = [agent.call("add_issue_comment", comment(n), DENIED, True) for n in range(7)]
    # Five failures with the same error text, then the sixth call (new args) is stopped.
    assert results == ["served"] * 5 + [StallRule.ERROR_STREAK] * 2


def test_tool_not_found_with_other_tools_padding_is_stopped() -> None:
    # Filler in between (a re-read of the same file) brings nothing new; only its first
    # read was new, so the streak counts from the failure after it.
    agent = Agent(engine())
    results = []
    for n in range(7):
        results.append(agent.call("deploy_service", {"env": f"e{n}"}, NOT_FOUND, True))
        agent.call("read_file", {"path": "README.md"}, "# service\nrun make deploy")
    assert results == ["served"] * 6 + [StallRule.ERROR_STREAK]


def test_hard_negative_different_errors_are_exploration() -> None:
    # A search failing with errors that name the query: each error is new.
    agent = Agent(engine())
    results = [
        agent.call("search_code", {"q": q}, f"Error: no results for '{q}'", True)
        for q in ("parse_date", "parseDate", "date_parser", "DateParser", "dateutil", "strptime")
    ]
    assert results == ["served"] * 6


def test_hard_negative_something_new_in_between_resets_the_streak() -> None:
    agent = Agent(engine())
    results = []
    for n in range(8):
        results.append(agent.call("add_issue_comment", comment(n), DENIED, True))
        # The agent looks at something that changes: the token's scopes as it fixes them.
        agent.call("gh_auth_status", {}, f"Token scopes: repo{', write' * (n % 3)}:{n}")
    assert results == ["served"] * 8


def test_hard_negative_a_success_of_the_tool_ends_the_streak() -> None:
    agent = Agent(engine())
    results = [agent.call("add_issue_comment", comment(n), DENIED, True) for n in range(4)]
    results.append(agent.call("add_issue_comment", comment(9), {"id": 1, "url": "u"}))
    results += [agent.call("add_issue_comment", comment(n), DENIED, True) for n in range(10, 14)]
    assert results == ["served"] * 9


def test_threshold_per_tool_and_off() -> None:
    agent = Agent(engine(tools={"add_issue_comment": {"max_error_streak": 2}}))
    results = [agent.call("add_issue_comment", comment(n), DENIED, True) for n in range(3)]
    assert results == ["served", "served", StallRule.ERROR_STREAK]


def test_model_route_nudges_once_then_stops_though_the_arguments_vary() -> None:
    eng = engine()
    steps = [HistoryStep("add_issue_comment", comment(n), DENIED, True) for n in range(5)]
    first = analyze(eng, steps)
    assert (first.action, first.verdict and first.verdict.rule) == (
        "nudge",
        StallRule.ERROR_STREAK,
    )
    # The model tried once more with other arguments after the nudge: a stop.
    steps.append(HistoryStep("add_issue_comment", comment(7), DENIED, True))
    assert analyze(eng, steps).action == "stop"
