"""Session history stores behind one async protocol.

``MemoryStore`` keeps sessions in this process: bounded (at most ``max_sessions``, the
least recently used evicted) and idle sessions expire after ``ttl_seconds``.

``RedisStore`` shares sessions between replicas: per session a list of steps and a hash
counting each call's steps in the window (the memory store's index), both changed by
one Lua script per append, so the window bound, the index and the idle expiry hold
whichever replica writes. A check is one script too: the window comes back only when
the call is in it. Any Redis failure surfaces as ``StoreError`` (the exchange reports
it as failure stage ``store``).
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Protocol

import orjson

from guard.engine.calls import Step

# The params hash under which a session's index counts a tool's failed steps (never a
# real params hash): lets a tool-wide rule see a failing tool called with new params.
TOOL_ERRORS = ""


class StoreError(RuntimeError):
    """The session store could not be read or written."""


class SessionStore(Protocol):
    async def history(self, session: str) -> list[Step]:
        """The session's steps, oldest first (a copy)."""
        ...

    async def history_for_call(self, session: str, tool: str, params_hash: str) -> list[Step]:
        """What the detector needs to judge this call: the history, or ``[]`` when the
        store knows the call has no step in the window (same verdict, less work)."""
        ...

    async def append(self, session: str, step: Step, window: int) -> None:
        """Add a step, keeping at most ``window`` steps."""
        ...

    async def aclose(self) -> None: ...


class StateStore(Protocol):
    """Optional: small values by key, expiring like sessions (what loopguard keeps per
    relayed model response, so a request continuing it by id can be judged). A store
    without these methods leaves such requests untracked."""

    async def put_state(self, key: str, value: str) -> None: ...

    async def get_state(self, key: str) -> str | None: ...


class _Entry:
    __slots__ = ("calls", "seen", "steps")

    def __init__(self, steps: deque[Step], seen: float) -> None:
        self.steps = steps
        self.seen = seen
        # How many of the window's steps each (tool, params_hash) has: lets a call that
        # is not in the window be answered without copying and scanning the window.
        self.calls: dict[tuple[str, str], int] = {}
        for step in steps:
            self._count(step, 1)

    def _count(self, step: Step, delta: int) -> None:
        self._add((step.tool, step.params_hash), delta)
        if step.error:  # the tool's failures, whatever the params (tool-wide rules)
            self._add((step.tool, TOOL_ERRORS), delta)

    def _add(self, key: tuple[str, str], delta: int) -> None:
        left = self.calls.get(key, 0) + delta
        if left:
            self.calls[key] = left
        else:
            del self.calls[key]

    def append(self, step: Step) -> None:
        steps = self.steps
        if len(steps) == steps.maxlen:
            self._count(steps[0], -1)  # the deque drops its oldest step
        steps.append(step)
        # _count(step, 1) inlined: one method call less on every call's path.
        calls = self.calls
        key = (step.tool, step.params_hash)
        calls[key] = calls.get(key, 0) + 1
        if step.error:
            key = (step.tool, TOOL_ERRORS)
            calls[key] = calls.get(key, 0) + 1


class MemoryStore:
    def __init__(
        self,
        max_sessions: int = 100_000,
        ttl_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sessions = max_sessions
        self.ttl = ttl_seconds
        self._clock = clock
        # Ordered by last access, least recent first.
        self._sessions: OrderedDict[str, _Entry] = OrderedDict()
        # put_state/get_state: (value, written at), oldest first; bounded as sessions are.
        self._states: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    async def history(self, session: str) -> list[Step]:
        entry = self._sessions.get(session)
        if entry is None:
            return []
        now = self._clock()
        if now - entry.seen > self.ttl:
            del self._sessions[session]
            return []
        entry.seen = now
        self._sessions.move_to_end(session)
        return list(entry.steps)

    async def history_for_call(self, session: str, tool: str, params_hash: str) -> list[Step]:
        """``history(session)``, or ``[]`` when the call has no step in the window and
        its tool no failure there.

        The stall rules fire on a call's own earlier steps or (tool-wide) on its tool's
        failures, so otherwise an empty history gives the same verdict -- without
        copying and scanning the window (the common case: most calls are new).
        """
        entry = self._sessions.get(session)
        if (
            entry is not None
            and (tool, params_hash) not in entry.calls
            and (tool, TOOL_ERRORS) not in entry.calls
        ):
            now = self._clock()
            if now - entry.seen > self.ttl:
                del self._sessions[session]
            else:  # touched as history() touches it
                entry.seen = now
                self._sessions.move_to_end(session)
            return []
        return await self.history(session)

    async def append(self, session: str, step: Step, window: int) -> None:
        now = self._clock()
        sessions = self._sessions
        entry = sessions.get(session)
        if entry is not None and now - entry.seen > self.ttl:
            entry = None  # expired: start afresh
        if entry is None:
            entry = sessions[session] = _Entry(deque(maxlen=window), now)
        elif entry.steps.maxlen != window:
            entry = sessions[session] = _Entry(deque(entry.steps, maxlen=window), now)
        entry.append(step)
        entry.seen = now
        sessions.move_to_end(session)
        if len(sessions) > self.max_sessions or now - next(iter(sessions.values())).seen > self.ttl:
            self._evict(now)

    def _evict(self, now: float) -> None:
        sessions = self._sessions
        # The least recently used come first, so expired sessions are at the front.
        while sessions:
            oldest, entry = next(iter(sessions.items()))
            if len(sessions) > self.max_sessions or now - entry.seen > self.ttl:
                del sessions[oldest]
            else:
                break

    async def put_state(self, key: str, value: str) -> None:
        now = self._clock()
        states = self._states
        states[key] = (value, now)
        states.move_to_end(key)
        while states and (
            len(states) > self.max_sessions or now - next(iter(states.values()))[1] > self.ttl
        ):
            states.popitem(last=False)

    async def get_state(self, key: str) -> str | None:
        found = self._states.get(key)
        if found is None or self._clock() - found[1] > self.ttl:
            return None
        return found[0]

    async def aclose(self) -> None:
        self._sessions.clear()
        self._states.clear()


def encode_step(step: Step) -> str:
    return json.dumps(
        [step.tool, step.params_hash, step.marker, 1 if step.error else 0],
        separators=(",", ":"),
        ensure_ascii=False,
    )


def decode_step(raw: bytes | str) -> Step:
    tool, params_hash, marker, error = orjson.loads(raw)
    return Step(tool, params_hash, marker, bool(error))


# A call's field in the session's count hash: tool and params hash, joined by a unit
# separator (the Lua script below builds the same field from a dropped step). The
# tool's failures are counted under the field with TOOL_ERRORS as params hash.
def _call_field(tool: str, params_hash: str) -> str:
    return f"{tool}\x1f{params_hash}"


# KEYS: steps list, counts hash. ARGV: the call's field, its tool's failures field.
# The window, or nil when neither is in it (the detector's verdict is then "allow").
_HISTORY_FOR_CALL = r"""
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0
  and redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return false end
return redis.call('LRANGE', KEYS[1], 0, -1)
"""

# KEYS: steps list, counts hash. ARGV: encoded step, its call field, window, ttl, its
# tool's failures field when the step failed (else ""). Steps pushed past the window
# are dropped and uncounted; both keys expire together.
_APPEND = r"""
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if ARGV[5] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[5], 1) end
local window = tonumber(ARGV[3])
while redis.call('LLEN', KEYS[1]) > window do
  local old = cjson.decode(redis.call('LPOP', KEYS[1]))
  local field = old[1] .. '\31' .. old[2]
  if redis.call('HINCRBY', KEYS[2], field, -1) <= 0 then redis.call('HDEL', KEYS[2], field) end
  if old[4] == 1 then
    field = old[1] .. '\31'
    if redis.call('HINCRBY', KEYS[2], field, -1) <= 0 then redis.call('HDEL', KEYS[2], field) end
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
"""


class RedisStore:
    def __init__(
        self,
        url: str,
        key_prefix: str = "loopguard:",
        ttl_seconds: float = 3600.0,
        *,
        connect_timeout: float = 2.0,
    ) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # optional dependency
            raise StoreError(
                "store.backend = 'redis' needs the redis package: pip install 'loopguard[redis]'"
            ) from exc
        self.url = url
        self.key_prefix = key_prefix
        self.ttl = max(1, math.ceil(ttl_seconds))
        self._client = aioredis.from_url(
            url, socket_connect_timeout=connect_timeout, socket_timeout=connect_timeout
        )
        self._errors = (aioredis.RedisError, OSError)
        # EVALSHA, loading the script on first use (and after a server restart).
        self._history_for_call = self._client.register_script(_HISTORY_FOR_CALL)
        self._append = self._client.register_script(_APPEND)

    def _keys(self, session: str) -> list[str]:
        """The session's steps and counts. The ``{session}`` hash tag keeps both in one
        Redis Cluster slot, as a script touching both needs."""
        base = f"{self.key_prefix}{{{session}}}"
        return [f"{base}:steps", f"{base}:calls"]

    async def history(self, session: str) -> list[Step]:
        try:
            raw = await self._client.lrange(self._keys(session)[0], 0, -1)
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot read session: {exc}") from exc
        return self._decoded(raw)

    async def history_for_call(self, session: str, tool: str, params_hash: str) -> list[Step]:
        """One round trip; the window crosses the network only when it holds the call."""
        try:
            raw = await self._history_for_call(
                keys=self._keys(session),
                args=[_call_field(tool, params_hash), _call_field(tool, TOOL_ERRORS)],
            )
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot read session: {exc}") from exc
        return self._decoded(raw) if raw else []

    def _decoded(self, raw: Sequence[bytes | str]) -> list[Step]:
        try:
            return [decode_step(item) for item in raw]
        except (ValueError, TypeError) as exc:
            raise StoreError(f"redis store {self.url}: malformed step in session: {exc}") from exc

    async def append(self, session: str, step: Step, window: int) -> None:
        args: list[str | int] = [
            encode_step(step),
            _call_field(step.tool, step.params_hash),
            window,
            self.ttl,
            _call_field(step.tool, TOOL_ERRORS) if step.error else "",
        ]
        try:
            await self._append(keys=self._keys(session), args=args)
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot append step: {exc}") from exc

    async def put_state(self, key: str, value: str) -> None:
        try:
            await self._client.set(f"{self.key_prefix}state:{key}", value, ex=self.ttl)
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot write state: {exc}") from exc

    async def get_state(self, key: str) -> str | None:
        try:
            raw = await self._client.get(f"{self.key_prefix}state:{key}")
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot read state: {exc}") from exc
        return raw.decode() if isinstance(raw, bytes) else raw

    async def aclose(self) -> None:
        await self._client.aclose()


__all__ = [
    "MemoryStore",
    "RedisStore",
    "SessionStore",
    "StateStore",
    "StoreError",
    "decode_step",
    "encode_step",
]
