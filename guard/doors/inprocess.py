"""The in-process Guard: loop detection and spans for agent code with no HTTP boundary.

    guard = Guard()               # or Guard("loopguard.toml") / Guard(Config(...))

    @guard.tool(session="run-42")
    def lookup_tracking(order_id: str) -> dict: ...  # sync or async

    lookup_tracking("A1")      # runs, records its outcome, emits "execute_tool lookup_tracking"
    ...                        # the same call, same outcome, max_repeats times...
    lookup_tracking("A1")      # raises StalledRepeatError (rule, repeats, tool) instead of running

Lower level: ``await guard.check(session, tool, params)`` -> Verdict and ``await
guard.record(session, tool, params, outcome)``; ``check_sync``/``record_sync`` for
sync code; ``guard.call(tool, params, session=...)`` as a (sync or async) context
manager around code that is not one function.

Same engine as the proxy and the middleware: same redaction, fingerprints, progress
markers, stall rules, spans and durable records.

Why one event loop of its own: the session store is async, and a store's connections
(Redis) belong to the loop that opened them, while agent code calls tools from plain
sync code, from one ``asyncio.run`` after another, from worker threads. So every store
operation runs on one loop the Guard owns (a daemon thread, started on first use):
the async API awaits it without blocking the caller's loop; the sync API blocks only
the calling thread, for one store round trip (a sync tool called on an event loop's
thread blocks that loop anyway, for longer). One loop also serializes all access to a
``MemoryStore``. Hashing, markers and telemetry run in the caller's thread, so spans
are children of the caller's current span.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from guard.engine.calls import CallRecord, FailureStage, Route, StallRule, Step, Verdict
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.engine.problem import stop_text
from guard.telemetry import build as build_telemetry

log = structlog.get_logger("loopguard")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
SessionSpec = str | Callable[[], str]

DEFAULT_SESSION = "default"
# A store round trip that takes longer than this is a store failure (the call fails open).
STORE_TIMEOUT_S = 10.0
_propagator = TraceContextTextMapPropagator()


class StalledRepeatError(RuntimeError):
    """A call the guard stopped before it ran; ``str(err)`` is written for the model."""

    def __init__(self, verdict: Verdict, session: str | None = None) -> None:
        super().__init__(stop_text(verdict))
        self.verdict = verdict
        self.session = session
        self.tool = verdict.tool
        self.params_hash = verdict.params_hash
        self.rule: StallRule | None = verdict.rule
        self.repeats = verdict.repeats


class _Loop:
    """A private event loop in a daemon thread; runs coroutines from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="loopguard-guard", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._get())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run to completion from sync code (blocks this thread only)."""
        if self._thread is threading.current_thread():
            coro.close()
            raise RuntimeError("the Guard's own loop cannot wait on itself")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # do not leave it running on the Guard's loop
            raise

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(timeout=5)
        if not loop.is_running():
            loop.close()


class Guard:
    def __init__(
        self, config: Config | str | Path | None = None, *, engine: Engine | None = None
    ) -> None:
        if engine is not None and config is not None:
            raise TypeError("pass either config or engine, not both")
        self._owns_engine = engine is None
        if engine is None:
            engine = Engine(
                config if isinstance(config, Config) else Config.load(config),
                make_telemetry=build_telemetry,
            )
        self.engine = engine
        self._loop = _Loop()
        self._closed = False

    # -- verdicts and outcomes ---------------------------------------------------------

    def fingerprint(self, params: Any) -> str:
        return self.engine.fingerprint(_jsonable(params))

    async def check(self, session: str, tool: str, params: Any) -> Verdict:
        """The verdict on calling ``tool`` with ``params`` now (nothing is recorded)."""
        return await self._loop.run_async(
            self.engine.check(session, tool, self.fingerprint(params))
        )

    def check_sync(self, session: str, tool: str, params: Any) -> Verdict:
        return self._loop.run(
            self.engine.check(session, tool, self.fingerprint(params)), STORE_TIMEOUT_S
        )

    async def record(
        self,
        session: str,
        tool: str,
        params: Any,
        outcome: Any,
        error: bool = False,
        explicit_marker: str | None = None,
    ) -> Step:
        """Record an executed call and its outcome; returns the step as stored."""
        step = self._step(tool, self.fingerprint(params), outcome, error, explicit_marker)
        await self._loop.run_async(self.engine.record(session, step))
        return step

    def record_sync(
        self,
        session: str,
        tool: str,
        params: Any,
        outcome: Any,
        error: bool = False,
        explicit_marker: str | None = None,
    ) -> Step:
        step = self._step(tool, self.fingerprint(params), outcome, error, explicit_marker)
        self._loop.run(self.engine.record(session, step), STORE_TIMEOUT_S)
        return step

    def _step(
        self, tool: str, params_hash: str, outcome: Any, error: bool, explicit: str | None
    ) -> Step:
        return Step(
            tool, params_hash, self.engine.marker(tool, _jsonable(outcome), explicit), error
        )

    # -- guarded calls -----------------------------------------------------------------

    def call(
        self, tool: str, params: Any, *, session: SessionSpec = DEFAULT_SESSION
    ) -> GuardedCall:
        """A context manager (``with`` or ``async with``) around one call of ``tool``.

        Entering raises ``StalledRepeatError`` if the call is stopped; set ``.outcome``
        (and optionally ``.progress``) inside; an exception leaving the block is recorded
        as an error outcome and propagates.
        """
        return GuardedCall(self, tool, params, _session(session))

    def tool(
        self, name: str | None = None, *, session: SessionSpec = DEFAULT_SESSION
    ) -> Callable[[F], F]:
        """Decorator: guard every call of a (sync or async) tool function.

        The call's params are its bound arguments (defaults applied, ``self``/``cls``
        left out); its outcome is the return value; an exception it raises is an error
        outcome and is re-raised. ``session``: a session id, or a callable returning
        one per call (e.g. reading a contextvar).
        """

        def decorate(fn: F) -> F:
            if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
                raise TypeError("guard.tool wraps functions that return a result, not generators")
            tool_name = name or fn.__name__
            signature = inspect.signature(fn)

            def params_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
                return _bound_params(signature, args, kwargs)

            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    call = GuardedCall(self, tool_name, params_of(args, kwargs), _session(session))
                    async with call:
                        call.outcome = await fn(*args, **kwargs)
                    return call.outcome

                return async_wrapper  # type: ignore[return-value]

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                call = GuardedCall(self, tool_name, params_of(args, kwargs), _session(session))
                with call:
                    call.outcome = fn(*args, **kwargs)
                return call.outcome

            return wrapper  # type: ignore[return-value]

        return decorate

    # -- lifecycle ---------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the engine (if this Guard made it) and stop the Guard's loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_engine:
            await self._loop.run_async(self.engine.aclose())
        self._loop.stop()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_engine:
            self._loop.run(self.engine.aclose(), STORE_TIMEOUT_S)
        self._loop.stop()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Guard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class GuardedCall:
    """One guarded call: the verdict on entry, the outcome and span on exit."""

    def __init__(self, guard: Guard, tool: str, params: Any, session: str) -> None:
        self.guard = guard
        self.tool = tool
        self.session = session
        self.outcome: Any = None
        # An explicit progress marker for this outcome (wins over the outcome's hash).
        self.progress: str | None = None
        self.verdict: Verdict | None = None
        engine = guard.engine
        self.params_hash = guard.engine.fingerprint(params)
        self.record = CallRecord(
            operation="execute_tool",
            span_name=f"execute_tool {tool}",
            tool=tool,
            session=session,
            session_tracked=True,
            params_hash=self.params_hash,
            scrub_policy=engine.scrub_policy,
        )
        self.guard.engine.capture(
            self.record, "gen_ai.tool.call.arguments", params, as_json=_jsonable
        )
        self._span: Any = None
        self._token: Any = None
        self._started = 0.0

    # -- entering: the verdict ---------------------------------------------------------

    def _open(self) -> None:
        # The caller's current span is the parent (telemetry continues a traceparent).
        carrier: dict[str, str] = {}
        _propagator.inject(carrier)
        self._span = self.guard.engine.telemetry.start(self.record.span_name, carrier)

    def _judge(self, verdict: Verdict) -> None:
        self.verdict = verdict
        record = self.record
        if verdict.action == "block":
            record.stall_rule = verdict.rule
            record.repeat_count = verdict.repeats
            record.route = Route.STOP_AND_REVIEW if verdict.enforced else Route.OBSERVE
        if verdict.blocked:
            record.failure_stage = FailureStage.LOOP_GUARD
            self._end()
            raise StalledRepeatError(verdict, self.session)
        # Spans the tool makes are children of this one.
        self._token = otel_context.attach(trace.set_span_in_context(self._span.span))
        self._started = time.perf_counter()

    def _check_failed(self, exc: Exception) -> Verdict:
        self.guard.engine.store_failed(self.record, exc)
        return Verdict("allow", self.tool, self.params_hash)

    def __enter__(self) -> GuardedCall:
        self._open()
        engine = self.guard.engine
        try:
            verdict = self.guard._loop.run(
                engine.check(self.session, self.tool, self.params_hash), STORE_TIMEOUT_S
            )
        except Exception as exc:  # the store is down: run the tool (fail open) and say so
            verdict = self._check_failed(exc)
        self._judge(verdict)
        return self

    async def __aenter__(self) -> GuardedCall:
        self._open()
        engine = self.guard.engine
        try:
            verdict = await asyncio.wait_for(
                self.guard._loop.run_async(engine.check(self.session, self.tool, self.params_hash)),
                STORE_TIMEOUT_S,
            )
        except Exception as exc:
            verdict = self._check_failed(exc)
        self._judge(verdict)
        return self

    # -- leaving: the outcome ----------------------------------------------------------

    def _outcome(self, exc: BaseException | None) -> Step | None:
        """The step to record (None when the call did not finish: cancelled, interrupted)."""
        record = self.record
        record.total_s = time.perf_counter() - self._started
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        if exc is None:
            outcome, error = self.outcome, False
        else:
            record.failure_stage = (
                FailureStage.UPSTREAM_TIMEOUT
                if isinstance(exc, TimeoutError)
                else FailureStage.UPSTREAM_STATUS
            )
            record.error_type = type(exc).__qualname__
            if not isinstance(exc, Exception):
                return None
            outcome, error = {"error": type(exc).__qualname__, "message": str(exc)}, True
        step = self.guard._step(self.tool, self.params_hash, outcome, error, self.progress)
        record.progress_marker = step.marker
        self.guard.engine.capture(
            self.record, "gen_ai.tool.call.result", outcome, as_json=_jsonable
        )
        return step

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        step = self._outcome(exc)
        if step is not None and not self.verdict_blocked:
            try:
                self.guard._loop.run(self.guard.engine.record(self.session, step), STORE_TIMEOUT_S)
            except Exception as store_exc:
                self.guard.engine.store_failed(self.record, store_exc)
        self._end()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        step = self._outcome(exc)
        if step is not None and not self.verdict_blocked:
            try:
                await asyncio.wait_for(
                    self.guard._loop.run_async(self.guard.engine.record(self.session, step)),
                    STORE_TIMEOUT_S,
                )
            except Exception as store_exc:
                self.guard.engine.store_failed(self.record, store_exc)
        self._end()

    @property
    def verdict_blocked(self) -> bool:
        return self.verdict is not None and self.verdict.blocked

    # -- helpers -----------------------------------------------------------------------

    def _end(self) -> None:
        if self._span is not None:
            self.guard.engine.telemetry.finish(self._span, self.record)


def _session(spec: SessionSpec) -> str:
    return spec() if callable(spec) else spec


def _bound_params(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    params: dict[str, Any] = {}
    for index, (key, value) in enumerate(bound.arguments.items()):
        if index == 0 and key in ("self", "cls"):
            continue  # the object a method is bound to is not an argument of the call
        kind = signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            params.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            params[key] = list(value)
        else:
            params[key] = value
    return params


def _jsonable(value: Any) -> Any:
    """A JSON value for hashing: containers walked, models and dataclasses dumped, other
    objects by ``str`` (their ``repr`` would carry a memory address)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    dump = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump):
        return _jsonable(dump(mode="json"))
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    return str(value)
