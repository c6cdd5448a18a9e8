"""One request through the guard, whatever moves its bytes.

Every front door drives an ``Exchange``; the stop, fail-open and record-ordering
rules live here and nowhere else:

    ex = Exchange(engine, route, adapter, request)
    admitted = await ex.admit()          # Answer -> send it, never call upstream
                                         # bytes  -> the body to forward
    headers.update(ex.upstream_headers())
    ex.mark_sent()                       # the TTFT clock starts here
    client_headers = ex.response_start(status, upstream_headers)
    for chunk in upstream:
        out = await ex.response_chunk(chunk, last=...)
        send(out, more_body=not ex.done)  # ex.done: the body is complete for the client
    await ex.finish(failure=None)        # records steps, ends the span, writes the record

The HTTP doors reach it through ``guard.doors.admission``; the in-process Guard
builds one per call with a synthetic request and feeds the outcome to ``finish``
as an ``Observation``. It knows the engine and the adapter contract, and nothing of
HTTP libraries or of any protocol.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import structlog

from adapters.http_tool import ToolResponseObserver
from guard.doors import chain
from guard.doors.asgi import HOP_BY_HOP, connection_tokens, remember
from guard.doors.untracked import warn_untracked
from guard.engine.bodies import RAW_KEY, raw_params
from guard.engine.calls import CallRecord, FailureStage, Route, Step, Verdict
from guard.engine.canonical import JSONTooDeep
from guard.engine.contract import (
    NO_FIELDS,
    OFFLOAD_BYTES,
    Adapter,
    Answer,
    HistoryStep,
    Observation,
    Outcome,
    ParsedRequest,
    PassthroughAdapter,
    RequestView,
    ResponseObserver,
    ToolInvocation,
)
from guard.engine.conversation import StallDecision, analyze
from guard.engine.problem import ROUTE_HEADER, STOP_SIGNATURE, problem, stall_problem
from guard.engine.timing import MalformedTiming, output_throughput

if TYPE_CHECKING:
    from guard.engine.config import RouteConfig
    from guard.engine.core import Engine

log = structlog.get_logger("loopguard")

APP_HEADER_PREFIX = "x-loopguard-app-"
PROGRESS_HEADER = "x-loopguard-progress"
_APP_PREFIX_LEN = len(APP_HEADER_PREFIX)
# A response header name as received -> lower-cased and decoded, and what it is; learnt
# once per name (the same few come on every call; ``remember`` bounds it).
_PLAIN, _LENGTH, _APP, _HOP, _CONNECTION = 0, 1, 2, 3, 4
_response_names: dict[bytes, tuple[str, int]] = {}
# The route header for each route, as the ASGI pair the client gets.
_ROUTE_PAIRS = {route: (ROUTE_HEADER.encode(), route.value.encode()) for route in Route}
# The tool of a call whose body could not be read at all (no adapter found a tool).
UNPARSED_TOOL = "unparsed_request"
# error_type of a request that was not understood: malformed for its protocol, nested
# deeper than the parser or redactor follows, or over the parse cap (not read at all).
MALFORMED, TOO_DEEP, NOT_PARSED = "malformed_request", "nested_too_deep", "body_not_parsed"
_ARGUMENTS = "gen_ai.tool.call.arguments"
_RESULT = "gen_ai.tool.call.result"


class SessionHistory(Protocol):
    """Where the Exchange reads verdicts and appends steps: the ``Engine`` itself, or
    (in-process) the engine reached through the Guard's own event loop."""

    async def admit_call(
        self, session: str, tool: str, params_hash: str
    ) -> tuple[Verdict, str | None]: ...

    async def record(self, session: str, step: Step) -> None: ...

    async def settle(self, session: str, token: str, step: Step) -> None: ...

    async def release(self, session: str, token: str) -> None: ...


@dataclass(slots=True)
class CallFlow:
    """One guarded tool call through the exchange: what was asked, the verdict on it,
    and (once the response showed it) what it returned."""

    invocation: ToolInvocation
    params_hash: str
    verdict: Verdict
    # The call's reservation in the store while it is in flight (None: not reserved).
    token: str | None = None
    outcome: Outcome | None = None


@dataclass(slots=True)
class _Prepared:
    """What the CPU part of admission found: the parsed request, each invocation's
    params hash, or (model routes) the verdict on the conversation."""

    parsed: ParsedRequest
    hashes: list[str]
    decision: StallDecision | None
    error_type: str  # for the record, when parsed.admission_error is set


_UNGUARDED = PassthroughAdapter()


class Exchange:
    """``route`` is None for a call that is not HTTP (the in-process Guard): then there is
    no upstream address and no status code to record."""

    def __init__(
        self,
        engine: Engine,
        route: RouteConfig | None,
        adapter: Adapter,
        request: RequestView,
        *,
        history: SessionHistory | None = None,
    ) -> None:
        self.engine = engine
        self.route = route
        self.adapter = adapter
        self.request = request
        self.session = request.session
        self.history: SessionHistory = history if history is not None else engine
        self.parsed: ParsedRequest | None = None
        # The telemetry's span handle (a CallSpan); None until admitted, and unguarded.
        self.span: Any = None
        self.record = CallRecord(operation="passthrough", span_name=request.method)
        self.flows: list[CallFlow] = []
        # The body is complete for the client and the exchange finished: later chunks
        # (none, from a well-behaved upstream) carry nothing to send or learn from.
        self.done = False
        self._observer: ResponseObserver | None = None
        self._remaining: int | None = None  # bytes still due by a declared content-length
        self._response_bytes = 0  # what the observer was fed: a large outcome is marked
        # off the event loop
        self._sent_at: float | None = None
        self._recorded = False
        # Server-side state: the history this request continues (guard.doors.chain).
        self._chain: chain.Chain | None = None
        # The request could not be read: one call standing for its raw bytes.
        self._raw_call = False

    def fail_open(self, exc: BaseException) -> None:
        """The guard failed on this request (a bug): it is served unguarded, never
        silently -- the span and the record name stage ``guard`` and the error."""
        self.adapter = _UNGUARDED
        self.parsed = parsed = _UNGUARDED.parse(self.request)
        self._raw_call = False
        self.flows = []
        record = self.record
        record.route = Route.SERVE
        record.operation = parsed.operation
        record.session = self.session
        record.session_tracked = self.session is not None
        record.scrub_policy = self.engine.scrub_policy
        record.failure_stage = FailureStage.GUARD
        record.error_type = type(exc).__name__
        if self.span is None:
            self.span = self.engine.telemetry.start(
                record.span_name, self.request.headers, lowercase=True
            )

    # -- before upstream -------------------------------------------------------------

    async def admit(self) -> Answer | bytes:
        request, record = self.request, self.record
        # Parsing, redacting and hashing are CPU work: a large body's is done off the
        # event loop, so one big request never stalls the others (or /healthz).
        if len(request.body) > OFFLOAD_BYTES:
            prepared = await asyncio.to_thread(self._prepare)
        else:
            prepared = self._prepare()
        parsed = self.parsed = prepared.parsed
        record.operation = parsed.operation
        record.span_name = parsed.span_name
        record.provider = self.adapter.provider
        if parsed.model is not None:
            # A model name is client input: scrubbed (a normal name comes out as it is).
            record.model = self._shown(parsed.model)
            if record.model != parsed.model:
                record.span_name = parsed.span_name.replace(parsed.model, record.model)
        record.stream = parsed.stream if parsed.operation == "chat" else None
        record.session = self.session
        record.session_tracked = self.session is not None
        record.scrub_policy = self.engine.scrub_policy
        if self.route is not None:
            record.server_address, record.server_port = _host_port(self.route.upstream)
        fields = parsed.fields
        if fields is not NO_FIELDS:
            record.mcp_method = fields.mcp_method
            # Ids leave as keyed pseudonyms: the MCP session as any session does (the
            # same id, the same pseudonym), the JSON-RPC id like a conversation digest.
            engine = self.engine
            if fields.mcp_session_id:
                record.mcp_session_id = engine.session_hasher(fields.mcp_session_id)
            if fields.jsonrpc_request_id is not None:
                record.jsonrpc_request_id = "rpc_" + engine.pseudonym(
                    str(fields.jsonrpc_request_id)
                )
            if fields.conversation_digest is not None:
                # Derived from content: only a keyed pseudonym of it may leave.
                record.conversation_id = "conv_" + self.engine.pseudonym(fields.conversation_digest)
            else:
                record.conversation_id = fields.conversation_id
        if parsed.invocations:
            if self.session is None and self.route is not None:
                warn_untracked(self.engine, self.route.prefix)
            tool = parsed.invocations[0].tool
            record.tool = self._shown(tool)
            if record.tool != tool:
                # A tool named by a URL segment can carry user data (/tools/{email}).
                record.span_name = parsed.span_name.replace(tool, record.tool)
        # RequestView headers are lower-cased by every front door.
        self.span = self.engine.telemetry.start(record.span_name, request.headers, lowercase=True)

        if parsed.admission_error is not None:
            # Not understood, still a call: recorded with its stage, and judged on what
            # stands for it (its raw bytes' hash), so a repeat is seen and stopped.
            record.failure_stage = FailureStage.REQUEST_ADMISSION
            record.error_type = prepared.error_type
            if (
                self.engine.config.server.reject_malformed_json
                and prepared.error_type != NOT_PARSED
            ):
                record.status_code = 400
                answer = problem(
                    400, "malformed-request", "Malformed request", parsed.admission_error
                )
                await self.finish(FailureStage.REQUEST_ADMISSION, prepared.error_type)
                return answer

        if parsed.history is not None:
            return await self._admit_conversation(parsed, prepared.decision)
        return await self._admit_tool_calls(parsed, prepared.hashes)

    def _prepare(self) -> _Prepared:
        """Parse the request and hash its calls (or judge its conversation): CPU only,
        no awaits, so it may run in a worker thread.

        Whatever cannot be read -- over ``[server] max_parse_bytes``, not parseable,
        nested too deep for the parser or the redactor -- becomes one call named by the
        adapter's tool (or ``UNPARSED_TOOL``) whose parameters are the raw bytes' hash.
        """
        request = self.request
        limit = self.engine.config.server.max_parse_bytes
        if len(request.body) > limit:
            reason = f"the request body is over [server] max_parse_bytes ({limit} bytes)"
            return self._unparsed(None, reason, NOT_PARSED)
        try:
            parsed = self.adapter.parse(request)
        except (RecursionError, JSONTooDeep):  # the parser's limits, not a guard bug
            return self._unparsed(None, "the request body is nested too deep to parse", TOO_DEEP)
        if parsed.admission_error is not None and not parsed.invocations:
            return self._unparsed(parsed, parsed.admission_error, MALFORMED)
        engine = self.engine
        try:
            if parsed.history is not None:
                if parsed.open_results is not None:
                    # The API keeps the conversation: judged once its kept turns are
                    # back (a store read, so not here).
                    return _Prepared(parsed, [], None, MALFORMED)
                nudge_first = self.route.nudge if self.route is not None else False
                decision = analyze(engine, parsed.history, nudge_first=nudge_first)
                return _Prepared(parsed, [], decision, MALFORMED)
            hashes: list[str] = []  # a loop: a comprehension is one more object per call
            for invocation in parsed.invocations:
                hashes.append(engine.fingerprint(invocation.params))
        except RecursionError:
            return self._unparsed(parsed, "the request is nested too deep to redact", TOO_DEEP)
        return _Prepared(parsed, hashes, None, MALFORMED)

    def _unparsed(self, parsed: ParsedRequest | None, reason: str, error_type: str) -> _Prepared:
        """The request as one call whose parameters are its raw bytes' hash. Answered,
        when stopped, with the protocol-neutral problem+json, and observed as plain HTTP:
        the adapter cannot speak about a body it could not read."""
        tool = parsed.invocations[0].tool if parsed and parsed.invocations else UNPARSED_TOOL
        invocation = ToolInvocation(tool, raw_params(self.request.body, error_type))
        raw = ParsedRequest(
            "execute_tool",
            invocations=[invocation],
            model=parsed.model if parsed is not None else None,
            admission_error=reason,
            span_name=f"execute_tool {tool}",
            fields=parsed.fields if parsed is not None else NO_FIELDS,
        )
        self._raw_call = True
        return _Prepared(raw, [self.engine.fingerprint(invocation.params)], None, error_type)

    def _shown_params(self, flow: CallFlow) -> Any:
        """What content capture shows of a call's parameters: for a body hashed raw,
        its text (redacted by the capture), unless it was too large to scan."""
        params = flow.invocation.params
        if type(params) is dict and RAW_KEY in params:
            body = self.request.body
            if len(body) <= self.engine.config.server.max_parse_bytes:
                return body.decode("utf-8", "replace")
        return params

    def _forward_body(self, parsed: ParsedRequest) -> bytes:
        return parsed.forward_body if parsed.forward_body is not None else self.request.body

    async def _admit_tool_calls(self, parsed: ParsedRequest, hashes: list[str]) -> Answer | bytes:
        flows = self.flows
        session = self.session
        invocations = parsed.invocations
        # By index, not zip(): a zip, its two iterators and its pair would live across
        # the store's await on every call. One hash per invocation (_prepare).
        for index in range(len(invocations)):
            invocation, params_hash = invocations[index], hashes[index]
            # The verdict, and the call's in-flight reservation when it is let through
            # (inline, not a coroutine of its own: one level less on every call).
            tool = invocation.tool
            token: str | None = None
            if session is None:
                verdict = Verdict("allow", tool, params_hash)
            else:
                try:
                    verdict, token = await self.history.admit_call(session, tool, params_hash)
                except Exception as exc:  # the store is down: serve (fail open) and say so
                    self.engine.store_failed(self.record, exc)
                    verdict = Verdict("allow", tool, params_hash)
            flows.append(CallFlow(invocation, params_hash, verdict, token))
        if not flows:
            return self._forward_body(parsed)
        record = self.record
        record.params_hash = flows[0].params_hash
        if self.engine.capturing:
            self.engine.capture(record, _ARGUMENTS, self._shown_params(flows[0]), as_json=jsonable)
        # A loop, not a comprehension: on every call, and nearly always finding none.
        for flow in flows:
            if flow.verdict.action == "block":
                first = flow.verdict
                break
        else:
            return self._forward_body(parsed)
        self._note_stall(first)
        if all(flow.verdict.blocked for flow in flows):
            return await self._stop(first)
        record.route = Route.OBSERVE
        return self._forward_body(parsed)

    async def _admit_conversation(
        self, parsed: ParsedRequest, decision: StallDecision | None
    ) -> Answer | bytes:
        """``decision``: the judgement of the history the request carries, made while it
        was prepared; None when the API keeps the conversation itself (the turns kept
        server-side are put back first, which needs the store)."""
        if decision is None:
            nudge_first = self.route.nudge if self.route is not None else False
            # A large request's marking, hashing and judging: off the event loop.
            offload = len(self.request.body) > OFFLOAD_BYTES
            history = await self._continue_chain(parsed, parsed.history or [], offload)
            if offload:
                decision = await asyncio.to_thread(
                    analyze, self.engine, history, nudge_first=nudge_first
                )
            else:
                decision = analyze(self.engine, history, nudge_first=nudge_first)
        body = self._forward_body(parsed)
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

    async def _continue_chain(
        self, parsed: ParsedRequest, history: list[HistoryStep], offload: bool
    ) -> list[HistoryStep]:
        """The history with the turns kept server-side put back (judged only when the
        request continues after tool results, as a full history is)."""
        try:
            kept = self._chain = await chain.rebuild(self.engine, parsed, offload=offload)
        except Exception as exc:  # the store is down: judge what the request carries
            self.engine.store_failed(self.record, exc)
            return history
        if not kept.known:
            self.record.session_tracked = False  # state loopguard never saw: not guessed
        if kept.stopped:
            # The request continues loopguard's own stop answer: its new turns come
            # after that answer (a framework's retry prompt is then the same stall).
            stop = HistoryStep("", None, STOP_SIGNATURE, kind="text")
            return [*chain.history(kept), stop, *history]
        continues_tools = parsed.open_results or (history and history[-1].kind == "tool")
        return chain.history(kept) if continues_tools else history

    async def release_reservations(self) -> None:
        """Calls that will get no outcome stop counting as in flight now (not only when
        their reservations expire)."""
        session = self.session
        for flow in self.flows:
            token, flow.token = flow.token, None
            if token is None or session is None:
                continue
            try:
                await self.history.release(session, token)
            except Exception as exc:  # the reservation expires by itself
                self.engine.store_failed(self.record, exc)
                return

    def _note_stall(self, verdict: Verdict) -> None:
        record = self.record
        record.stall_rule = verdict.rule
        record.repeat_count = verdict.repeats
        record.params_hash = verdict.params_hash
        record.tool = record.tool or self._shown(verdict.tool)

    async def _stop(self, verdict: Verdict) -> Answer:
        assert self.parsed is not None
        route = self.route
        if self._raw_call or (
            self.parsed.operation == "chat" and route is not None and route.on_stop == "error"
        ):
            message = route.stop_message if route is not None else None
            answer = stall_problem(verdict, self.session, message)
        else:
            answer = self.adapter.stop_answer(self.request, self.parsed, verdict)
        self.record.route = Route.STOP_AND_REVIEW
        self.record.failure_stage = FailureStage.LOOP_GUARD
        if route is not None:
            self.record.status_code = answer.status
        if self._chain is not None:
            try:
                await chain.remember_stop(self.engine, self._chain, answer.response_id)
            except Exception as exc:  # the store is down: the retry is judged as it comes
                self.engine.store_failed(self.record, exc)
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
        self, status: int, headers: Sequence[tuple[bytes, bytes]], *, relayed: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """Headers for the client (ASGI bytes pairs): the app's decision headers taken
        off, the route added. ``relayed``: the headers are an upstream's, relayed by a
        proxy, so the hop-by-hop ones (and those a ``Connection`` header names) are
        dropped too, in the same pass."""
        assert self.parsed is not None
        record = self.record
        if self.route is not None:
            record.status_code = status
        if status >= 500:
            record.failure_stage = FailureStage.UPSTREAM_STATUS
            record.error_type = str(status)
        names = _response_names
        while True:
            passed: list[tuple[bytes, bytes]] = []
            seen: dict[str, str] = {}  # what the observer reads: lower-cased names, str values
            length: int | None = None
            named: list[tuple[bytes, bytes]] | None = None
            for name, value in headers:
                key, kind = names.get(name) or _response_name(name)
                if kind:
                    if kind == _APP:
                        # The app's words ("abstain", "true") pass as they are; a secret or
                        # a personal detail in them does not.
                        app_key = key[_APP_PREFIX_LEN:].replace("-", "_")
                        record.app[app_key] = self._shown(value.decode("latin-1"))
                        continue
                    if kind == _LENGTH:
                        if value.isdigit():
                            length = int(value)
                    elif relayed:
                        if kind == _CONNECTION:
                            named = _end_to_end(headers)
                            break
                        continue
                seen[key] = value.decode("latin-1")
                passed.append((name, value))
            if named is None:
                break
            # A Connection header names more hop-by-hop headers, maybe ones already
            # taken: once more over the headers without them (seldom).
            headers, relayed = named, False
            record.app.clear()
        passed.append(_ROUTE_PAIRS[record.route])
        # A declared length completes the body with its last byte (not so a HEAD's, or
        # a 204's or 304's: they have no body whatever the header says).
        bodyless = self.request.method == "HEAD" or status in (204, 304)
        self._remaining = None if bodyless else length
        self._observer = (
            ToolResponseObserver(status, seen)
            if self._raw_call
            else self.adapter.observer(self.parsed, status, seen)
        )
        return passed

    async def response_chunk(self, chunk: bytes, last: bool = False) -> bytes:
        """The bytes to pass on, for a chunk the front door is about to send.

        ``last``: the door knows this chunk ends the body (an ASGI app's final message);
        a declared content-length reached says so too. Then the exchange finishes --
        steps recorded, span ended -- before this returns, and ``done`` is True: the
        door sends these bytes as the end of the body. So an agent that has the whole
        answer never races its own next call past the record. The steps are recorded
        earlier still when the observer has every outcome (an MCP SSE answer that
        stays open).
        """
        observer = self._observer
        if observer is None:
            return chunk
        out = observer.feed(chunk, time.perf_counter())
        if observer.backlog:  # a large event's parse: off the event loop
            await asyncio.to_thread(observer.read_backlog)
        self._response_bytes += len(chunk)
        remaining = self._remaining
        if remaining is not None:
            remaining -= len(chunk)
            self._remaining = remaining
            if remaining <= 0:
                last = True
        if last:
            await self.finish()
        elif observer.settled:
            await self._record_outcomes(observer.finish())
        return out

    @property
    def settled(self) -> bool:
        """The steps are recorded: a client hanging up now has had its answers."""
        return self._recorded

    # -- after -----------------------------------------------------------------------

    async def finish(
        self,
        failure: FailureStage | None = None,
        error_type: str | None = None,
        *,
        observation: Observation | None = None,
    ) -> None:
        """Record what happened; safe to call once from any path (later calls do nothing).

        ``observation``: what a door that has no response stream learnt (the in-process
        Guard: the tool's outcome); otherwise the observer's.
        """
        if self.done:
            return
        self.done = True
        record = self.record
        if failure is not None and failure is not FailureStage.PASSED:
            record.failure_stage = failure
            record.error_type = error_type or record.error_type or failure.value
        if observation is None and self._observer is not None:
            if self._response_bytes > OFFLOAD_BYTES:
                # A large body's parse (a JSON answer up to the observer's bound): off
                # the event loop, like its marking.
                observation = await asyncio.to_thread(self._observer.finish)
            else:
                observation = self._observer.finish()
        try:
            if observation is not None:
                self._apply_observation(observation)
                await self._record_outcomes(observation)
                if self._chain is not None and observation.complete:
                    await self._remember_chain(observation)
            for flow in self.flows:
                if flow.token is not None:  # a call that got no outcome
                    await self.release_reservations()
                    break
        finally:
            if self.span is not None:
                try:
                    self.engine.telemetry.finish(self.span, record)
                except Exception as exc:  # telemetry must never break an answer
                    log.warning("telemetry_finish_failed", **exception_fields(exc))

    async def _remember_chain(self, obs: Observation) -> None:
        assert self._chain is not None
        try:
            offload = self._response_bytes > OFFLOAD_BYTES  # large calls: off the event loop
            await chain.remember(self.engine, self._chain, obs, offload=offload)
        except Exception as exc:  # the answer goes out all the same
            self.engine.store_failed(self.record, exc)

    def _apply_observation(self, obs: Observation) -> None:
        record = self.record
        if record.failure_stage is FailureStage.PASSED:
            if not obs.complete:
                record.failure_stage = FailureStage.STREAM
                record.error_type = "incomplete_stream"
            elif obs.unread_events:
                # Passed on whole, but not read: the record lacks what they carried.
                record.failure_stage = FailureStage.STREAM
                record.error_type = "sse_event_too_large"
        record.usage = obs.usage
        record.response_id = obs.response_id
        record.response_model = (
            self._shown(obs.response_model) if obs.response_model else obs.response_model
        )
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

    async def _record_outcomes(self, obs: Observation) -> None:
        """The steps go to the store once: as soon as they are seen, or at the end."""
        if self._recorded:
            return
        self._recorded = True
        outcomes = obs.outcomes
        seen = len(outcomes)  # one per invocation; an observer may have seen fewer
        record = self.record
        flows = self.flows
        for index in range(len(flows)):  # not enumerate(): no objects living across awaits
            flow = flows[index]
            outcome = flow.outcome = outcomes[index] if index < seen else None
            if outcome is None:
                continue
            tool = flow.invocation.tool
            if self._response_bytes > OFFLOAD_BYTES:  # a large outcome: off the event loop
                marker = await asyncio.to_thread(
                    self.engine.marker, tool, outcome.value, outcome.explicit_marker
                )
            else:
                marker = self.engine.marker(
                    tool, outcome.value, outcome.explicit_marker, outcome.source
                )
            if record.progress_marker is None:
                record.progress_marker = marker
                if self.engine.capturing:
                    self.engine.capture(record, _RESULT, outcome.value, as_json=jsonable)
            if self.session is None or flow.verdict.blocked:
                continue
            step = Step(tool, flow.params_hash, marker, outcome.error)
            token, flow.token = flow.token, None
            try:
                if token is not None:
                    await self.history.settle(self.session, token, step)
                else:
                    await self.history.record(self.session, step)
            except Exception as exc:  # the store is down: the answer goes out all the same
                self.engine.store_failed(record, exc)
                return

    def _shown(self, text: str) -> str:
        """A tool or model name, or an app's value, as it may leave in spans, records and
        metric labels: scrubbed.

        ``scrub`` is ``redact_text`` with a cache: a session uses the same few names."""
        return self.engine.redactor.scrub(text)


def _response_name(name: bytes) -> tuple[str, int]:
    lower = name.lower()
    key = lower.decode("latin-1")
    if key.startswith(APP_HEADER_PREFIX):
        kind = _APP
    elif lower == b"content-length":
        kind = _LENGTH
    elif lower in HOP_BY_HOP or lower.startswith(b"proxy-"):
        kind = _CONNECTION if lower == b"connection" else _HOP
    else:
        kind = _PLAIN
    return remember(_response_names, name, (key, kind))


def _end_to_end(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upstream's headers without the hop-by-hop ones, those its ``Connection``
    headers name included."""
    named: set[bytes] | None = None
    kept: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        kind = (_response_names.get(name) or _response_name(name))[1]
        if kind == _CONNECTION:
            named = connection_tokens(value, named)
        elif kind != _HOP:
            kept.append((name, value))
    if named:
        kept = [h for h in kept if h[0].lower() not in named]
    return kept


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


def jsonable(value: Any) -> Any:
    """A JSON value for any Python value: containers walked, models and dataclasses
    dumped, other objects by ``str`` (their ``repr`` would carry a memory address).
    What the in-process Guard hashes and marks, and what content capture shows."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [jsonable(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    dump = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump):
        return jsonable(dump(mode="json"))
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    return str(value)
