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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

from guard.engine.calls import Step
from guard.engine.store import SessionStore, StateStore, StoreError

T = TypeVar("T")


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
        self._failed = 0
        self._open_until = None
        self._open_for = self.backoff
        return result

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
        await self._call(lambda: self.store.settle(session, token, step, window))

    async def release(self, session: str, token: str) -> None:
        await self._call(lambda: self.store.release(session, token))

    async def put_state(self, key: str, value: str) -> None:
        state = cast(StateStore, self.store)  # both built-in stores keep state
        await self._call(lambda: state.put_state(key, value))

    async def get_state(self, key: str) -> str | None:
        state = cast(StateStore, self.store)
        return await self._call(lambda: state.get_state(key))

    async def aclose(self) -> None:
        await self.store.aclose()


__all__ = ["BreakerStore", "CircuitOpen"]
