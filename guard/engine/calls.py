"""The engine's vocabulary: steps of a session's history and the verdict on a call.

These are plain values so that every store (memory, Redis) and every front door
(proxy, middleware, in-process Guard, replay) speaks the same language.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal


class StallRule(StrEnum):
    STALLED_REPEAT = "stalled_repeat"
    IDENTICAL_ERRORS = "identical_errors"
    HARD_CAP = "hard_cap"
    ERROR_STREAK = "error_streak"
    NO_PROGRESS = "no_progress"
    TEXT_LOOP = "text_loop"


class Route(StrEnum):
    """The verdict's route: what loopguard did with a call (the ``x-loopguard-route``
    value). Not ``config.RouteConfig``, which maps a path prefix to an upstream."""

    SERVE = "serve"
    NUDGE = "nudge"
    STOP_AND_REVIEW = "stop_and_review"
    OBSERVE = "observe"


class FailureStage(StrEnum):
    PASSED = "passed"
    REQUEST_ADMISSION = "request_admission"
    LOOP_GUARD = "loop_guard"
    UPSTREAM_CONNECT = "upstream_connect"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_STATUS = "upstream_status"
    STREAM = "stream"
    STORE = "store"
    # The guard itself failed on the request (a bug): served unguarded, recorded.
    GUARD = "guard"


@dataclass(frozen=True, slots=True)
class Step:
    """One executed call in a session's history: what was called and what came back."""

    tool: str
    params_hash: str
    marker: str
    error: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """The detector's answer before a call.

    ``action`` is what the rules say; ``enforced`` is False in observe mode, where a
    ``block`` is recorded but the call is served anyway.
    """

    action: Literal["allow", "block"]
    tool: str
    params_hash: str
    # A rule's name (``guard.engine.rules``; the built-in ones are ``StallRule`` values).
    rule: str | None = None
    repeats: int = 0
    enforced: bool = True
    # Indexes (in the history as loaded) of the earlier steps the verdict refers to.
    steps: tuple[int, ...] = field(default=())

    @property
    def blocked(self) -> bool:
        """True when the call must not run (a block that is enforced)."""
        return self.action == "block" and self.enforced

    @property
    def route(self) -> Route:
        if self.action == "allow":
            return Route.SERVE
        return Route.STOP_AND_REVIEW if self.enforced else Route.OBSERVE


@dataclass(slots=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    # "response" when the API reported it; "absent" when it did not (never guessed).
    source: Literal["response", "absent"] = "absent"


@dataclass(slots=True)
class CallRecord:
    """Everything known about one guarded exchange once it is over.

    The front doors fill it; ``guard.telemetry`` turns it into span attributes,
    metrics and one durable JSON record, each field as ``guard.telemetry.fields``
    declares it (a new field here shows nowhere until it has a row there). It never
    holds raw parameters or content: only hashes, markers and (when capture is on)
    already-redacted text.
    """

    operation: Literal["chat", "execute_tool", "mcp", "passthrough"]
    span_name: str
    route: Route = Route.SERVE
    failure_stage: FailureStage = FailureStage.PASSED
    error_type: str | None = None
    status_code: int | None = None
    # Who was called.
    provider: str | None = None
    tool: str | None = None
    model: str | None = None
    server_address: str | None = None
    server_port: int | None = None
    # Session and loop state.
    session: str | None = None
    session_tracked: bool = False
    conversation_id: str | None = None
    params_hash: str | None = None
    progress_marker: str | None = None
    repeat_count: int | None = None
    stall_rule: str | None = None
    scrub_policy: str | None = None
    # MCP.
    mcp_method: str | None = None
    mcp_session_id: str | None = None
    jsonrpc_request_id: str | None = None
    # Model responses.
    stream: bool | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    output_tps: float | None = None
    timing_malformed: bool = False
    usage: Usage | None = None
    response_id: str | None = None
    response_model: str | None = None
    finish_reasons: tuple[str, ...] = ()
    output_chunks: int = 0
    # The app's own decision, from x-loopguard-app-* response headers (name -> value).
    app: dict[str, str] = field(default_factory=dict)
    # Redacted content, present only when telemetry.capture_content is on.
    captured: dict[str, str] = field(default_factory=dict)
