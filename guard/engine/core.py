"""The engine: one object holding the scrub policy, detector, session store and telemetry.

Every front door (reverse proxy, middleware, in-process ``Guard``, replay) builds
one ``Engine`` from a ``Config`` and asks it the same questions. The engine holds
telemetry through its own ``TelemetryPort``; the doors build the real one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from guard.engine.breaker import BreakerStore, RateLimitedWarning
from guard.engine.calls import CallRecord, FailureStage, Step, Verdict
from guard.engine.config import Config
from guard.engine.detector import Detector
from guard.engine.fingerprint import params_hash
from guard.engine.problem import register_stop_message
from guard.engine.progress import ProgressMarkers
from guard.engine.pseudonym import keyed_pseudonym, keyed_session_hasher
from guard.engine.redact import Redactor, load_key
from guard.engine.store import MemoryStore, SessionStore
from guard.engine.telemetry_port import NullTelemetry, TelemetryFactory, TelemetryPort


class Engine:
    def __init__(
        self,
        config: Config | None = None,
        *,
        store: SessionStore | None = None,
        telemetry: TelemetryPort | None = None,
        make_telemetry: TelemetryFactory | None = None,
    ) -> None:
        """``telemetry``: used as it is. Else ``make_telemetry(config, session_hasher)``
        builds it (the front doors pass ``guard.telemetry.build``). Else none is
        recorded (``NullTelemetry``)."""
        self.config = config or Config()
        # The config is frozen: what is read on every call is built once.
        self._scrub_policy = self.config.redaction.policy_id
        # Content capture on: the doors skip preparing what ``capture`` would show.
        self.capturing = self.config.telemetry.capture_content
        self._store_warnings = RateLimitedWarning("session_store_unavailable")
        self._window = self.config.loop.window
        self._in_flight_s = self.config.loop.in_flight_seconds
        # One key for parameter pseudonyms and session pseudonyms in records.
        key = load_key(self.config.redaction.pseudonym_key_env)
        # Content-derived identifiers (conversation digests) leave only as this token.
        self.pseudonym = keyed_pseudonym(key, b"loopguard.conv")
        self.redactor = Redactor(self.config.redaction, key=key)
        # Parameters are hashed through keyed pseudonyms (two customers, two calls);
        # ``redactor`` is what is displayed (captured content, tool names).
        self.hash_redactor = Redactor(self.config.redaction, key=key, hashing=True)
        self.detector = Detector(self.config.loop)
        for route in self.config.routes:
            if route.stop_message is not None:
                # A stop in the route's own words is still known as a stop in a history.
                register_stop_message(route.stop_message)
        self._session_wide = self.config.loop.no_progress_window > 0
        self.markers = ProgressMarkers(self.config.loop, self.redactor)
        # "is None": an empty MemoryStore is falsy (len 0) and must still be the one used.
        self.store = store if store is not None else _store_from_config(self.config)
        if isinstance(self.store, BreakerStore):
            # A failed settle sent without waiting warns in the engine's own stream.
            self.store.warnings = self._store_warnings
        # Session ids leave in records only as keyed pseudonyms, under the same key.
        self.session_hasher = keyed_session_hasher(key)
        if telemetry is None:
            telemetry = (
                make_telemetry(self.config, self.session_hasher)
                if make_telemetry is not None
                else NullTelemetry()
            )
        self.telemetry: TelemetryPort = telemetry

    @property
    def scrub_policy(self) -> str:
        return self._scrub_policy

    def fingerprint(self, params: Any) -> str:
        """xxh3_128 hex of the redacted canonical parameters."""
        return params_hash(params, self.hash_redactor)

    def marker(
        self, tool: str, outcome: Any, explicit: str | None = None, source: bytes | None = None
    ) -> str:
        """``source``: the bytes ``outcome`` was read from, if it depends on nothing else
        (``Outcome.source``): the marker of bytes seen before is not computed again."""
        return self.markers.marker(tool, outcome, explicit, source)

    def evaluate(self, history: Sequence[Step], tool: str, params_hash: str) -> Verdict:
        """Stateless: the verdict on a call given a history (replay, model conversations)."""
        return self.detector.evaluate(history, tool, params_hash)

    async def check(self, session: str, tool: str, params_hash: str) -> Verdict:
        """The verdict on a call given the session's stored history."""
        if self.detector.disabled_for(tool):
            return Verdict("allow", tool, params_hash)
        if self._session_wide:
            # A session-wide rule judges even a call the window has never seen.
            history = await self.store.history(session)
        else:
            history = await self.store.history_for_call(session, tool, params_hash)
        return self.detector.evaluate(history, tool, params_hash)

    # record, settle and release only forward to the store: plain functions handing back
    # the store's coroutine (awaited by the caller), not coroutines of their own -- one
    # allocation and one level of resuming less on every call.

    def record(self, session: str, step: Step) -> Coroutine[Any, Any, None]:
        return self.store.append(session, step, self.config.loop.window)

    async def admit_call(
        self, session: str, tool: str, params_hash: str
    ) -> tuple[Verdict, str | None]:
        """``check`` made atomic with the call's admission: an allowed call is reserved
        in flight (the returned token), so a concurrent duplicate counts it. Settle the
        token with the outcome, or release it."""
        if self.detector.disabled_for(tool):
            return Verdict("allow", tool, params_hash), None
        history, token = await self.store.reserve(
            session, tool, params_hash, self._window, self._in_flight_s
        )
        verdict = self.detector.evaluate(history, tool, params_hash)
        if verdict.blocked:  # never reaches the tool: it must not count as in flight
            await self.store.release(session, token)
            return verdict, None
        return verdict, token

    def settle(self, session: str, token: str, step: Step) -> Coroutine[Any, Any, None]:
        return self.store.settle(session, token, step, self.config.loop.window)

    def release(self, session: str, token: str) -> Coroutine[Any, Any, None]:
        return self.store.release(session, token)

    def capture(
        self, record: CallRecord, key: str, value: Any, as_json: Callable[[Any], Any] | None = None
    ) -> None:
        """Content onto the call's span: only when ``capture_content`` is on, redacted.
        ``as_json`` turns a value that is not plain JSON into one (run only then)."""
        if not self.capturing:
            return
        redacted = self.redactor.redact(as_json(value) if as_json is not None else value)
        record.captured[key] = (
            redacted if isinstance(redacted, str) else json.dumps(redacted, default=str)
        )

    def store_failed(self, record: CallRecord, exc: Exception) -> None:
        """The session store failed: the call is served (fail open) and the record says so,
        unless it already names an earlier failure."""
        self._store_warnings.note(type(exc).__name__)
        if record.failure_stage is FailureStage.PASSED:
            record.failure_stage = FailureStage.STORE
            record.error_type = type(exc).__name__

    async def aclose(self) -> None:
        await self.store.aclose()
        self.telemetry.shutdown()


def _store_from_config(config: Config) -> SessionStore:
    if config.store.backend == "redis":
        from guard.engine.store import RedisStore

        store = config.store
        # The breaker bounds every operation: no second timer per command.
        redis = RedisStore(
            store.url,
            key_prefix=store.key_prefix,
            ttl_seconds=store.ttl_seconds,
            reply_timeout=None,
        )
        return BreakerStore(
            redis,
            timeout=store.timeout_seconds,
            failures=store.breaker_failures,
            backoff=store.breaker_backoff_seconds,
        )
    return MemoryStore(max_sessions=config.store.max_sessions, ttl_seconds=config.store.ttl_seconds)
