"""One request through the guard, whatever moves its bytes.

The reverse proxy and the embedded middleware both drive an ``Exchange``:

    ex = Exchange(engine, route, adapter, request, session)
    admitted = await ex.admit()          # Answer -> send it, never call upstream
                                         # bytes  -> the body to forward
    headers.update(ex.upstream_headers())
    ex.mark_sent()                       # the TTFT clock starts here
    client_headers = ex.response_start(status, upstream_headers)
    for chunk in upstream: send(ex.response_chunk(chunk))
    await ex.finish(failure=None)        # records steps, ends the span, writes the record

It knows the engine and the adapter contract, and nothing of HTTP libraries or of
any protocol.
"""

from __future__ import annotations

import time
import traceback
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import structlog

from guard.engine.calls import CallRecord, FailureStage, Route, Step, Verdict
from guard.engine.contract import (
    Adapter,
    Answer,
    Observation,
    ParsedRequest,
    RequestView,
    ResponseObserver,
)
from guard.engine.conversation import StallDecision, analyze
from guard.engine.problem import ROUTE_HEADER, problem, stall_problem
from guard.engine.timing import MalformedTiming, output_throughput

if TYPE_CHECKING:
    from guard.engine.config import RouteConfig
    from guard.engine.core import Engine

log = structlog.get_logger("loopguard")

APP_HEADER_PREFIX = "x-loopguard-app-"
PROGRESS_HEADER = "x-loopguard-progress"
_APP_PREFIX_B = APP_HEADER_PREFIX.encode()
_APP_PREFIX_LEN = len(_APP_PREFIX_B)
# The route header for each route, as the ASGI pair the client gets.
_ROUTE_PAIRS = {route: (ROUTE_HEADER.encode(), route.value.encode()) for route in Route}


class Exchange:
    def __init__(
        self,
        engine: Engine,
        route: RouteConfig,
        adapter: Adapter,
        request: RequestView,
        session: str | None,
    ) -> None:
        self.engine = engine
        self.route = route
        self.adapter = adapter
        self.request = request
        self.session = session
        self.parsed: ParsedRequest | None = None
        self.span = None
        self.record = CallRecord(operation="passthrough", span_name=request.method)
        self._hashes: list[str] = []
        self._verdicts: list[Verdict] = []
        self._observer: ResponseObserver | None = None
        self._sent_at: float | None = None
        self._started = time.perf_counter()
        self._finished = False
        self._recorded = False

    # -- before upstream -------------------------------------------------------------

    async def admit(self) -> Answer | bytes:
        request, record = self.request, self.record
        parsed = self.parsed = self.adapter.parse(request)
        record.operation = parsed.operation
        record.span_name = parsed.span_name
        record.provider = self.adapter.provider
        record.model = parsed.model
        record.stream = parsed.stream if parsed.operation == "chat" else None
        record.session = self.session
        record.session_tracked = self.session is not None
        record.scrub_policy = self.engine.scrub_policy
        record.server_address, record.server_port = _host_port(self.route.upstream)
        for name, value in parsed.fields.items():
            if name == "conversation_digest":
                # Derived from content: only a keyed pseudonym of it may leave.
                record.conversation_id = "conv_" + self.engine.pseudonym(value)
            else:
                setattr(record, name, value)
        if parsed.invocations:
            tool = parsed.invocations[0].tool
            record.tool = self._shown(tool)
            if record.tool != tool:
                # A tool named by a URL segment can carry user data (/tools/{email}).
                record.span_name = parsed.span_name.replace(tool, record.tool)
        # RequestView headers are lower-cased by both front doors.
        self.span = self.engine.telemetry.start(record.span_name, request.headers, lowercase=True)

        if parsed.admission_error is not None:
            record.failure_stage = FailureStage.REQUEST_ADMISSION
            record.error_type = "malformed_request"
            if self.engine.config.server.reject_malformed_json:
                record.status_code = 400
                answer = problem(
                    400, "malformed-request", "Malformed request", parsed.admission_error
                )
                await self.finish(FailureStage.REQUEST_ADMISSION, "malformed_request")
                return answer
            return request.body

        if parsed.history is not None:
            return await self._admit_conversation(parsed)
        return await self._admit_tool_calls(parsed)

    async def _admit_tool_calls(self, parsed: ParsedRequest) -> Answer | bytes:
        record = self.record
        for invocation in parsed.invocations:
            params_hash = self.engine.fingerprint(invocation.params)
            self._hashes.append(params_hash)
            verdict = await self._check(invocation.tool, params_hash)
            self._verdicts.append(verdict)
        if self._hashes:
            record.params_hash = self._hashes[0]
            self.engine.capture(record, "gen_ai.tool.call.arguments", parsed.invocations[0].params)
        blocking = [v for v in self._verdicts if v.action == "block"]
        if not blocking:
            return parsed.body if parsed.body is not None else self.request.body
        self._note_stall(blocking[0])
        if all(v.blocked for v in self._verdicts):
            return await self._stop(blocking[0])
        record.route = Route.OBSERVE
        return parsed.body if parsed.body is not None else self.request.body

    async def _admit_conversation(self, parsed: ParsedRequest) -> Answer | bytes:
        decision: StallDecision = analyze(
            self.engine, parsed.history or [], nudge_first=self.route.nudge
        )
        body = parsed.body if parsed.body is not None else self.request.body
        if decision.verdict is None:
            return body
        self._note_stall(decision.verdict)
        if decision.action == "serve":
            self.record.route = Route.OBSERVE
            return body
        if decision.action == "nudge":
            self.record.route = Route.NUDGE
            return self.adapter.nudge(self.request, parsed, decision.verdict)
        return await self._stop(decision.verdict)

    async def _check(self, tool: str, params_hash: str) -> Verdict:
        if self.session is None:
            return Verdict("allow", tool, params_hash)
        try:
            return await self.engine.check(self.session, tool, params_hash)
        except Exception as exc:  # the store is down: serve (fail open) and say so
            self.engine.store_failed(self.record, exc)
            return Verdict("allow", tool, params_hash)

    def _note_stall(self, verdict: Verdict) -> None:
        record = self.record
        record.stall_rule = verdict.rule
        record.repeat_count = verdict.repeats
        record.params_hash = verdict.params_hash
        record.tool = record.tool or self._shown(verdict.tool)

    async def _stop(self, verdict: Verdict) -> Answer:
        assert self.parsed is not None
        if self.parsed.operation == "chat" and self.route.on_stop == "error":
            answer = stall_problem(verdict, self.session)
        else:
            answer = self.adapter.stop_answer(self.request, self.parsed, verdict)
        self.record.route = Route.STOP_AND_REVIEW
        self.record.failure_stage = FailureStage.LOOP_GUARD
        self.record.status_code = answer.status
        await self.finish(FailureStage.LOOP_GUARD)
        return answer

    def upstream_headers(self) -> dict[str, str]:
        """Trace context naming loopguard's span as the parent of the upstream call."""
        headers: dict[str, str] = {}
        if self.span is not None:
            self.span.inject(headers)
        return headers

    @property
    def long_lived(self) -> bool:
        """The adapter says this response is a stream meant to stay open (no timeouts)."""
        return self.parsed is not None and self.parsed.long_lived

    def mark_sent(self) -> None:
        self._sent_at = time.perf_counter()

    # -- the response ----------------------------------------------------------------

    def response_start(
        self, status: int, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        """Headers for the client (ASGI bytes pairs): the app's decision headers taken
        off, the route added."""
        assert self.parsed is not None
        record = self.record
        record.status_code = status
        if status >= 500:
            record.failure_stage = FailureStage.UPSTREAM_STATUS
            record.error_type = str(status)
        passed: list[tuple[bytes, bytes]] = []
        seen: dict[str, str] = {}  # what the observer reads: lower-cased names, str values
        for name, value in headers:
            lower = name.lower()
            if lower.startswith(_APP_PREFIX_B):
                key = lower[_APP_PREFIX_LEN:].decode("latin-1").replace("-", "_")
                record.app[key] = value.decode("latin-1")
                continue
            seen[lower.decode("latin-1")] = value.decode("latin-1")
            passed.append((name, value))
        passed.append(_ROUTE_PAIRS[record.route])
        self._observer = self.adapter.observer(self.parsed, status, seen)
        return passed

    async def response_chunk(self, chunk: bytes) -> bytes:
        """The bytes to pass on; records the steps as soon as every outcome is seen.

        Recording happens before the chunk that completes the outcomes goes to the
        client, so the agent's next call always finds this one in the history.
        """
        observer = self._observer
        if observer is None:
            return chunk
        out = observer.feed(chunk, time.perf_counter())
        if observer.settled:
            await self._record_once(observer.finish())
        return out

    @property
    def settled(self) -> bool:
        """The steps are recorded: a client hanging up now has had its answers."""
        return self._recorded

    # -- after -----------------------------------------------------------------------

    async def finish(
        self, failure: FailureStage | None = None, error_type: str | None = None
    ) -> None:
        """Record what happened; safe to call once from any path (later calls do nothing)."""
        if self._finished:
            return
        self._finished = True
        record = self.record
        if failure is not None and failure is not FailureStage.PASSED:
            record.failure_stage = failure
            record.error_type = error_type or record.error_type or failure.value
        observation = self._observer.finish() if self._observer is not None else None
        if observation is not None:
            self._apply_observation(observation)
            await self._record_once(observation)
        if self.span is not None:
            try:
                self.engine.telemetry.finish(self.span, record)
            except Exception as exc:  # telemetry must never break an answer
                log.warning("telemetry_finish_failed", **exception_fields(exc))

    def _apply_observation(self, obs: Observation) -> None:
        record = self.record
        if not obs.complete and record.failure_stage is FailureStage.PASSED:
            record.failure_stage = FailureStage.STREAM
            record.error_type = "incomplete_stream"
        record.usage = obs.usage
        record.response_id = obs.response_id
        record.response_model = obs.response_model
        record.finish_reasons = obs.finish_reasons
        record.output_chunks = obs.output_chunks
        if self._sent_at is None:
            return
        end = time.perf_counter()
        record.total_s = end - self._sent_at
        if obs.first_output_at is not None:
            record.ttft_s = obs.first_output_at - self._sent_at
        output_tokens = obs.usage.output_tokens if obs.usage else None
        if record.ttft_s is not None and output_tokens is not None:
            try:
                record.output_tps = output_throughput(output_tokens, record.total_s, record.ttft_s)
            except MalformedTiming:
                record.timing_malformed = True

    async def _record_once(self, obs: Observation) -> None:
        """The steps go to the store once: as soon as they are seen, or at the end."""
        if not self._recorded:
            self._recorded = True
            await self._record_outcomes(obs)

    async def _record_outcomes(self, obs: Observation) -> None:
        parsed = self.parsed
        if parsed is None or not parsed.invocations:
            return
        for invocation, params_hash, verdict, outcome in zip(
            parsed.invocations, self._hashes, self._verdicts, obs.outcomes, strict=False
        ):
            if outcome is None:
                continue
            marker = self.engine.marker(invocation.tool, outcome.value, outcome.explicit_marker)
            if self.record.progress_marker is None:
                self.record.progress_marker = marker
                self.engine.capture(self.record, "gen_ai.tool.call.result", outcome.value)
            if self.session is None or verdict.blocked:
                continue
            try:
                await self.engine.record(
                    self.session, Step(invocation.tool, params_hash, marker, outcome.error)
                )
            except Exception as exc:
                self.engine.store_failed(self.record, exc)
                return

    def _shown(self, tool: str) -> str:
        """A tool name as it may leave in spans, records and metric labels: scrubbed.

        ``scrub`` is ``redact_text`` with a cache: a session calls the same few tools."""
        return self.engine.redactor.scrub(tool)


def exception_fields(exc: BaseException) -> dict[str, str]:
    """An exception for a log line: its type and where it was raised, nothing else.

    Not ``exc_info``: structlog's default renderer prints every frame's locals (the
    request's headers and body among them), and a message can quote a value too.
    """
    frames = traceback.extract_tb(exc.__traceback__)[-6:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return {"error": type(exc).__name__, "where": where}


@lru_cache(maxsize=256)
def _host_port(url: str) -> tuple[str | None, int | None]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname, port
