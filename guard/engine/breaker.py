"""A circuit breaker in front of a shared session store.

A store that is down fails fast (connection refused); a *hung* one (a stopped
process, a black-holed network) makes every call wait for its timeout. The breaker
bounds each operation by ``timeout`` and, after ``failures`` consecutive failures or
timeouts, *opens*: operations fail at once with ``StoreError`` (the exchange serves
the call -- fail open -- and records stage ``store``) without touching the store.
After ``backoff`` seconds one operation is let through as a probe (half-open): it
closes the breaker when it succeeds, or opens it again for twice as long (up to
``max_backoff``) when it fails. As Envoy's outlier detection and nginx's
``max_fails``/``fail_timeout`` do, in one place.

A settle or release the store can send without waiting (``settle_nowait``) is sent so
while the breaker is closed: the response goes out without a round trip, and the
reply, when it comes, counts as any operation does -- a failure towards opening the
breaker, and a rate-limited warning (``warnings``), since no call is left to record
stage ``store`` on. A reply that never comes is not timed here: the admissions that
follow on the same connection are, and they open the breaker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

import structlog

from guard.engine.calls import Step
from guard.engine.store import SessionStore, StateStore, StoreError

T = TypeVar("T")
_log = structlog.get_logger("loopguard")


class RateLimitedWarning:
    """One warning per ``every`` seconds at most, saying how many were held back: a
    store that is down must not write a line per call."""

    def __init__(self, event: str, every: float = 10.0) -> None:
        self.event = event
        self.every = every
        self._last: float | None = None
        self._held = 0

    def note(self, error: str) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.every:
            self._held += 1
            return
        _log.warning(self.event, error=error, suppressed_since_last=self._held)
        self._last = now
        self._held = 0


class CircuitOpen(StoreError):
    """The store is not asked: it failed too often, and the next probe is not due."""


class BreakerStore:
    """``SessionStore`` in front of another, with a per-operation timeout and a breaker."""

    def __init__(
        self,
        store: SessionStore,
        *,
        timeout: float = 0.5,
        failures: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.timeout = timeout
        self.failures = failures
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._clock = clock
        self._failed = 0  # consecutive failures
        self._open_until: float | None = None  # None: closed
        self._open_for = backoff
        self._probing = False
        # Where the failure of an operation not awaited is told (the engine shares its own).
        self.warnings = RateLimitedWarning("session_store_unavailable")
        self._settle_nowait = getattr(store, "settle_nowait", None)
        self._release_nowait = getattr(store, "release_nowait", None)

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        probe = False
        if self._open_until is not None:
            if self._probing or self._clock() < self._open_until:
                raise CircuitOpen("session store circuit open: not asked")
            self._probing = probe = True  # half-open: this call is the probe
        try:
            async with asyncio.timeout(self.timeout):  # no task per call, unlike wait_for
                result = await operation()
        except (StoreError, TimeoutError, OSError) as exc:
            self._failure(probe)
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"session store: no answer within {self.timeout} s") from exc
        finally:
            if probe:
                self._probing = False
        self._succeeded()
        return result

    def _succeeded(self) -> None:
        self._failed = 0
        self._open_until = None
        self._open_for = self.backoff

    def _replied(self, exc: BaseException | None) -> None:
        """The reply to an operation sent without waiting."""
        if exc is None:
            self._succeeded()
        else:
            self._failure(False)
            self.warnings.note(type(exc).__name__)

    def _failure(self, probe: bool) -> None:
        self._failed += 1
        if probe:  # still failing: wait twice as long before the next probe
            self._open_for = min(self._open_for * 2, self.max_backoff)
        if probe or self._failed >= self.failures:
            self._open_until = self._clock() + self._open_for

    async def history(self, session: str) -> list[Step]:
        return await self._call(lambda: self.store.history(session))

    async def history_for_call(self, session: str, tool: str, params_hash: str) -> list[Step]:
        return await self._call(lambda: self.store.history_for_call(session, tool, params_hash))

    async def append(self, session: str, step: Step, window: int) -> None:
        await self._call(lambda: self.store.append(session, step, window))

    async def reserve(
        self, session: str, tool: str, params_hash: str, window: int, hold_seconds: float
    ) -> tuple[list[Step], str]:
        return await self._call(
            lambda: self.store.reserve(session, tool, params_hash, window, hold_seconds)
        )

    async def settle(self, session: str, token: str, step: Step, window: int) -> None:
        send = self._settle_nowait
        if (
            send is not None
            and self._open_until is None
            and send(session, token, step, window, self._replied)
        ):
            return
        await self._call(lambda: self.store.settle(session, token, step, window))

    async def release(self, session: str, token: str) -> None:
        send = self._release_nowait
        if send is not None and self._open_until is None and send(session, token, self._replied):
            return
        await self._call(lambda: self.store.release(session, token))

    async def put_state(self, key: str, value: str) -> None:
        state = cast(StateStore, self.store)  # both built-in stores keep state
        await self._call(lambda: state.put_state(key, value))

    async def get_state(self, key: str) -> str | None:
        state = cast(StateStore, self.store)
        return await self._call(lambda: state.get_state(key))

    async def aclose(self) -> None:
        await self.store.aclose()


__all__ = ["BreakerStore", "CircuitOpen", "RateLimitedWarning"]
