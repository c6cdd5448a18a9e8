"""The in-process Guard: loop detection and spans for agent code with no HTTP boundary.

    guard = Guard()               # or Guard("loopguard.toml") / Guard(Config(...))

    @guard.tool(name="lookup_tracking")   # session: a string, a callable, or (default)
    def lookup(order_id: str) -> dict: ...  # the one set by ``with guard.session("run-42"):``

    lookup_tracking("A1")      # runs, records its outcome, emits "execute_tool lookup_tracking"
    ...                        # the same call, same outcome, max_repeats times...
    lookup_tracking("A1")      # raises StalledRepeatError (rule, repeats, tool) instead of running

Lower level: ``await guard.check(session, tool, params)`` -> Verdict and ``await
guard.record(session, tool, params, outcome)``; ``check_sync``/``record_sync`` for
sync code; ``guard.call(tool, params, session=...)`` as a (sync or async) context
manager around code that is not one function.

Same engine as the proxy and the middleware: same redaction, fingerprints, progress
markers, stall rules, spans and durable records. A guarded call goes through the same
``Exchange`` too, over a synthetic request (one tool invocation; the tool's outcome is
handed over as the ``Observation``), so the stop, fail-open and record rules are the
Exchange's, not a copy of them.

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
import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Collection, Coroutine, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from guard.doors.engines import door_engine
from guard.doors.exchange import Exchange, jsonable
from guard.engine.calls import CallRecord, FailureStage, Step, Verdict
from guard.engine.config import Config
from guard.engine.contract import (
    Answer,
    Observation,
    Outcome,
    ParsedRequest,
    PassthroughObserver,
    RequestView,
    ToolInvocation,
)
from guard.engine.core import Engine
from guard.engine.problem import stall_problem, stop_text

log = structlog.get_logger("loopguard")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
SessionSpec = str | Callable[[], str]

# The session of a call that names none: ``Guard.session`` sets it for a run (a context
# variable, so concurrent runs on one event loop or in threads each keep their own).
DEFAULT_SESSION = "default"
CURRENT_SESSION: ContextVar[str | None] = ContextVar("loopguard_session", default=None)
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
        self.rule: str | None = verdict.rule
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
            engine = door_engine(config)
        self.engine = engine
        self._loop = _Loop()
        # The store as guarded calls reach it: from sync code, and from async code.
        self._histories = (
            _LoopHistory(engine, self._loop, blocking=True),
            _LoopHistory(engine, self._loop, blocking=False),
        )
        self._closed = False

    # -- verdicts and outcomes ---------------------------------------------------------

    def fingerprint(self, params: Any) -> str:
        return self.engine.fingerprint(jsonable(params))

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
        return Step(tool, params_hash, self.engine.marker(tool, jsonable(outcome), explicit), error)

    # -- guarded calls -----------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def session(session_id: str) -> Iterator[str]:
        """``with guard.session(run_id):`` -- calls inside that name no session use this one.

        Works in sync and async code alike (a context variable: each task or thread
        started inside inherits it, concurrent runs do not see each other's).
        """
        token = CURRENT_SESSION.set(session_id)
        try:
            yield session_id
        finally:
            CURRENT_SESSION.reset(token)

    def call(self, tool: str, params: Any, *, session: SessionSpec | None = None) -> GuardedCall:
        """A context manager (``with`` or ``async with``) around one call of ``tool``.

        Entering raises ``StalledRepeatError`` if the call is stopped; set ``.outcome``
        (and optionally ``.progress``) inside; an exception leaving the block is recorded
        as an error outcome and propagates.
        """
        return GuardedCall(self.engine, self._histories, tool, params, _session(session))

    def tool(
        self,
        name: str | None = None,
        *,
        session: SessionSpec | None = None,
        exclude: Collection[str] = (),
    ) -> Callable[[F], F]:
        """Decorator: guard every call of a (sync or async) tool function.

        ``name``: the tool's name as the model knows it (default: the function's name).
        The call's params are its bound arguments (defaults applied, ``self``/``cls`` and
        the names in ``exclude`` -- e.g. a framework's run-context argument -- left out);
        its outcome is the return value; an exception it raises is an error outcome and is
        re-raised. ``session``: a session id, or a callable returning one per call; None
        (default): the one ``Guard.session`` set, else ``"default"``.
        """

        def decorate(fn: F) -> F:
            if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
                raise TypeError("guard.tool wraps functions that return a result, not generators")
            tool_name = name or fn.__name__
            signature = inspect.signature(fn)

            def params_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
                return _bound_params(signature, args, kwargs, exclude)

            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    call = self.call(tool_name, params_of(args, kwargs), session=session)
                    async with call:
                        call.outcome = await fn(*args, **kwargs)
                    return call.outcome

                return async_wrapper  # type: ignore[return-value]

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                call = self.call(tool_name, params_of(args, kwargs), session=session)
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


class _LoopHistory:
    """The session store as an in-process ``Exchange`` reaches it: every operation on the
    Guard's own loop, bounded by ``STORE_TIMEOUT_S`` (a slower store is a store failure).

    ``blocking``: for sync code. The call blocks this thread until the store answers,
    so the coroutine never suspends and ``_run_now`` can drive the Exchange without an
    event loop in the caller's thread.
    """

    __slots__ = ("blocking", "engine", "loop")

    def __init__(self, engine: Engine, loop: _Loop, *, blocking: bool) -> None:
        self.engine = engine
        self.loop = loop
        self.blocking = blocking

    async def check(self, session: str, tool: str, params_hash: str) -> Verdict:
        return await self._run(self.engine.check(session, tool, params_hash))

    async def record(self, session: str, step: Step) -> None:
        await self._run(self.engine.record(session, step))

    async def admit_call(
        self, session: str, tool: str, params_hash: str
    ) -> tuple[Verdict, str | None]:
        return await self._run(self.engine.admit_call(session, tool, params_hash))

    async def settle(self, session: str, token: str, step: Step) -> None:
        await self._run(self.engine.settle(session, token, step))

    async def release(self, session: str, token: str) -> None:
        await self._run(self.engine.release(session, token))

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.blocking:
            return self.loop.run(coro, STORE_TIMEOUT_S)
        return await asyncio.wait_for(self.loop.run_async(coro), STORE_TIMEOUT_S)


class _CallAdapter:
    """The in-process door's adapter: one call of a Python function is one tool
    invocation. Its outcome does not stream: the door hands it to the Exchange as an
    ``Observation``, so ``observer`` is never asked for."""

    __slots__ = ("invocation",)
    name = "in-process"
    provider: str | None = None

    def __init__(self, tool: str, params: Any) -> None:
        self.invocation = ToolInvocation(tool, params)

    def parse(self, request: RequestView) -> ParsedRequest:
        tool = self.invocation.tool
        return ParsedRequest(
            "execute_tool", invocations=[self.invocation], span_name=f"execute_tool {tool}"
        )

    def stop_answer(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> Answer:
        # What an HTTP tool route would answer; the door raises StalledRepeatError instead.
        return stall_problem(verdict, request.session)

    def nudge(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> bytes:
        return request.body

    def observer(
        self, parsed: ParsedRequest, status: int, headers: dict[str, str]
    ) -> PassthroughObserver:
        return PassthroughObserver()


class GuardedCall:
    """One guarded call: the verdict on entry, the outcome and span on exit.

    An ``Exchange`` over a synthetic request does the work, as for a call through the
    proxy: the same verdict, fail-open and record rules, span and record.
    """

    def __init__(
        self,
        engine: Engine,
        histories: tuple[_LoopHistory, _LoopHistory],
        tool: str,
        params: Any,
        session: str,
    ) -> None:
        self.engine = engine
        self.tool = tool
        self.session = session
        self.outcome: Any = None
        # The outcome is the tool's error (for tools that report failure by value, not by
        # raising: a framework's error message, an ``isError`` result).
        self.error = False
        # An explicit progress marker for this outcome (wins over the outcome's hash).
        self.progress: str | None = None
        self.verdict: Verdict | None = None
        self._histories = histories  # (blocking, awaiting)
        self._params = params
        self._exchange: Exchange | None = None
        self._token: Any = None

    @property
    def record(self) -> CallRecord | None:
        return self._exchange.record if self._exchange is not None else None

    @property
    def params_hash(self) -> str | None:
        exchange = self._exchange
        return exchange.flows[0].params_hash if exchange is not None and exchange.flows else None

    # -- entering: the verdict ---------------------------------------------------------

    def _open(self, history: _LoopHistory) -> Exchange:
        # The caller's current span is the parent (telemetry continues a traceparent).
        carrier: dict[str, str] = {}
        _propagator.inject(carrier)
        request = RequestView("CALL", self.tool, "", carrier, b"", self.session)
        adapter = _CallAdapter(self.tool, self._params)
        self._exchange = Exchange(self.engine, None, adapter, request, history=history)
        return self._exchange

    def _admitted(self, exchange: Exchange, admitted: Answer | bytes) -> None:
        verdict = self.verdict = exchange.flows[0].verdict
        if isinstance(admitted, Answer):  # stopped: the exchange is over, span ended
            raise StalledRepeatError(verdict, self.session)
        # Spans the tool makes are children of this one.
        self._token = otel_context.attach(trace.set_span_in_context(exchange.span.span))
        exchange.mark_sent()

    def __enter__(self) -> GuardedCall:
        exchange = self._open(self._histories[0])
        self._admitted(exchange, _run_now(exchange.admit()))
        return self

    async def __aenter__(self) -> GuardedCall:
        exchange = self._open(self._histories[1])
        self._admitted(exchange, await exchange.admit())
        return self

    # -- leaving: the outcome ----------------------------------------------------------

    def _observed(
        self, exc: BaseException | None
    ) -> tuple[Observation, FailureStage | None, str | None]:
        """What the call returned, and how it failed (None: it did not)."""
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        if exc is None:
            outcome = Outcome(
                jsonable(self.outcome), error=self.error, explicit_marker=self.progress
            )
            return Observation(outcomes=[outcome]), None, None
        stage = (
            FailureStage.UPSTREAM_TIMEOUT
            if isinstance(exc, TimeoutError)
            else FailureStage.UPSTREAM_STATUS
        )
        error_type = type(exc).__qualname__
        if not isinstance(exc, Exception):
            # Cancelled or interrupted: the call did not finish, there is no outcome.
            return Observation(outcomes=[None]), stage, error_type
        value = {"error": error_type, "message": str(exc)}
        outcome = Outcome(value, error=True, explicit_marker=self.progress)
        return Observation(outcomes=[outcome]), stage, error_type

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._exchange is not None
        observation, stage, error_type = self._observed(exc)
        _run_now(self._exchange.finish(stage, error_type, observation=observation))

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._exchange is not None
        observation, stage, error_type = self._observed(exc)
        await self._exchange.finish(stage, error_type, observation=observation)

    @property
    def verdict_blocked(self) -> bool:
        return self.verdict is not None and self.verdict.blocked


def _run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run an Exchange step from sync code, in this thread, with no event loop.

    With the blocking store (``_LoopHistory``) nothing in it ever suspends, so one
    ``send`` runs it to the end; a step that did suspend would be a bug, and is refused.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("an in-process exchange tried to wait on an event loop")


def _session(spec: SessionSpec | None) -> str:
    if spec is None:
        return CURRENT_SESSION.get() or DEFAULT_SESSION
    return spec() if callable(spec) else spec


def _bound_params(
    signature: inspect.Signature,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exclude: Collection[str] = (),
) -> dict[str, Any]:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    params: dict[str, Any] = {}
    for index, (key, value) in enumerate(bound.arguments.items()):
        if (index == 0 and key in ("self", "cls")) or key in exclude:
            continue  # the object a method is bound to is not an argument of the call
        kind = signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            params.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            params[key] = list(value)
        else:
            params[key] = value
    return params
