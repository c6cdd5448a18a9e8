"""Session history stores behind one async protocol.

``MemoryStore`` keeps sessions in this process: bounded (at most ``max_sessions``, the
least recently used evicted) and idle sessions expire after ``ttl_seconds``. An idle
session is a tuple of step tuples, which the garbage collector stops tracking, so a
full collection walks no object per session (about 0.45 KB idle with one call, its
strings included).

``RedisStore`` shares sessions between replicas: per session a list of steps and a hash
counting each call's steps in the window (the memory store's index), both changed by
one Lua script per append, so the window bound, the index and the idle expiry hold
whichever replica writes. A check is one script too: the window comes back only when
the call is in it. Any Redis failure surfaces as ``StoreError`` (the exchange reports
it as failure stage ``store``). It talks to Redis through ``guard.engine.resp``: one
pipelined connection per process, scripts by EVALSHA.

One round trip per call on the request path: ``reserve`` is awaited; ``settle`` (and
``release``) can be sent without waiting (``settle_nowait``, which the breaker uses):
queued on the connection, it goes out with the next commands of the same turn of the
event loop. Redis runs one connection's commands in order, so within a process the
next call sees the settled step; another replica's call that reaches Redis before the
settle does (a turn of the event loop after the response) is judged as a concurrent
duplicate is (the call still in flight).

Admission is atomic: ``reserve`` answers the check *and* puts an in-flight step of the
call into the window in one step (one Lua script for Redis), so a concurrent
duplicate sees it. The in-flight step carries the outcome the call last had in the
window (or ``IN_FLIGHT`` when it has none): a duplicate sent while the first is in
flight counts as a repeat with that outcome. ``settle`` replaces it with the real
step; ``release`` removes it (a stopped call, a call that got no outcome). A
reservation nobody settles (client gone, process crashed) expires after
``hold_seconds`` and stops counting.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import orjson

from guard.engine.calls import Step

# The outcome of an in-flight step whose call has no earlier outcome in the window.
IN_FLIGHT = "\x00in-flight"
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

    async def reserve(
        self, session: str, tool: str, params_hash: str, window: int, hold_seconds: float
    ) -> tuple[list[Step], str]:
        """``history_for_call`` and, in the same atomic step, an in-flight step of the
        call appended to the window; returns the history as it was before, and the
        reservation's token for ``settle`` or ``release``."""
        ...

    async def settle(self, session: str, token: str, step: Step, window: int) -> None:
        """The reserved call's real step takes the in-flight step's place (appended,
        if the reservation expired or left the window)."""
        ...

    async def release(self, session: str, token: str) -> None:
        """Drop a reservation (the call was stopped, or got no outcome)."""
        ...

    async def aclose(self) -> None: ...


class StateStore(Protocol):
    """Optional: small values by key, expiring like sessions (what loopguard keeps per
    relayed model response, so a request continuing it by id can be judged). A store
    without these methods leaves such requests untracked."""

    async def put_state(self, key: str, value: str) -> None: ...

    async def get_state(self, key: str) -> str | None: ...


# A session's window gets its per-call index once it holds more steps than this: below,
# scanning the window is as quick as a lookup, and an idle session keeps no dict.
INDEX_FROM = 8

# What the memory store keeps per session is plain tuples, no object of its own: every
# full collection of the garbage collector walks every object it tracks, and with one
# per session (a list, a slots class, a Step: tracked for good) a full collection took
# ~28 ms at 100k idle sessions, a p99 spike -- the benchmark opens a session per
# request, so the store fills up to ``max_sessions``. The collector stops tracking a
# tuple that holds only untracked objects, but one level of nesting per collection
# (an inner tuple is examined after its outer one): so at most two levels, a window of
# steps, which the collections of the young generations untrack before a session gets
# old. A window is replaced, not changed: a copy of at most ``window`` pointers per
# step (a list would be changed in place, but stays tracked). When a session was last
# used is a float in a dict of its own, which the collector never tracks (nothing in
# it can be part of a cycle), so a read replaces nothing. The OrderedDict of windows is
# one tracked object: a full collection walks its entries (a few ms at 100k), not
# objects of their own.
#
# A step: (tool, params_hash, marker, error); turned into a Step only when a window is
# read, which the common new call skips.
_Held = tuple[str, str, str, bool]
# A session's window, oldest step first.
_Window = tuple[_Held, ...]
# A session's reservations, in the order made: token -> (deadline, the in-flight step
# it put in the window). Kept beside the session (in flight for a request's time).
_Holds = dict[str, tuple[float, _Held]]
# A session's per-call index: how many of the window's steps each (tool, params_hash)
# has, and under (tool, TOOL_ERRORS) each tool's failures. It answers "is the call (or a
# failure of its tool) in the window?" without a scan. Kept beside the session too (a
# tuple holding a dict stays tracked); the collector untracks a dict of untracked keys
# and ints at each full collection.
_Calls = dict[tuple[str, str], int]


def _held(step: Step) -> _Held:
    return (_interned(step.tool), step.params_hash, step.marker, step.error)


def _interned(tool: str) -> str:
    """One copy of each tool name for every step and call count the store keeps (each
    request parses its own). ``sys.intern`` takes exact strs only: an in-process caller
    may name a tool with a subclass."""
    return sys.intern(tool) if type(tool) is str else tool


def _holds(window: _Window, calls: _Calls | None, tool: str, params_hash: str) -> bool:
    """The call, or a failure of its tool, has a step in the window: the stall rules can
    fire only then."""
    if calls is not None:
        return (tool, params_hash) in calls or (tool, TOOL_ERRORS) in calls
    for step_tool, step_hash, _marker, error in window:
        if step_tool == tool and (step_hash == params_hash or error):
            return True
    return False


def _steps(window: _Window) -> list[Step]:
    """The window as Steps, oldest first."""
    return [Step(*held) for held in window]


def _counts(window: _Window) -> _Calls:
    """The index a window would have."""
    calls: _Calls = {}
    for step in window:
        _count(calls, step, 1)
    return calls


def _count(calls: _Calls, step: _Held, delta: int) -> None:
    tool, params_hash, _marker, error = step
    _add(calls, (tool, params_hash), delta)
    if error:  # the tool's failures, whatever the params (tool-wide rules)
        _add(calls, (tool, TOOL_ERRORS), delta)


def _add(calls: _Calls, key: tuple[str, str], delta: int) -> None:
    left = calls.get(key, 0) + delta
    if left:
        calls[key] = left
    else:
        del calls[key]


def _find(window: _Window, step: _Held) -> int:
    """Where this very step object is in the window, or -1. Searched from the newest
    end: an in-flight step was appended moments ago."""
    for index in range(len(window) - 1, -1, -1):
        if window[index] is step:
            return index
    return -1


def _without(window: _Window, step: _Held, calls: _Calls | None) -> _Window:
    """The window without this very step object (if still in it); the index follows."""
    index = _find(window, step)
    if index < 0:
        return window
    if calls is not None:
        _count(calls, step, -1)
    return window[:index] + window[index + 1 :]


def _expire(steps: _Window, calls: _Calls | None, holds: _Holds, now: float) -> _Window:
    """Reservations past their deadline stop counting: their in-flight steps leave the
    window (and the index). The dict is in the order the reservations were made, which
    is deadline order for one hold time."""
    while holds:
        token, (deadline, step) = next(iter(holds.items()))
        if deadline > now:
            break
        del holds[token]
        steps = _without(steps, step, calls)
    return steps


def _latest(steps: Sequence[Step], tool: str, params_hash: str) -> Step | None:
    """The call's newest step in a window."""
    for step in reversed(steps):
        if step.tool == tool and step.params_hash == params_hash:
            return step
    return None


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
        # The sessions' windows, by last access, least recent first; and when each was
        # last used.
        self._sessions: OrderedDict[str, _Window] = OrderedDict()
        self._seen: dict[str, float] = {}
        # No session was last used before this (the oldest's last use when the store
        # last looked): until the TTL has passed since, none can have expired.
        self._oldest = -math.inf
        # Beside them, for the sessions that have some: reservations, and the index of
        # a window that once held more than INDEX_FROM steps.
        self._holds: dict[str, _Holds] = {}
        self._index: dict[str, _Calls] = {}
        self._tokens = itertools.count()
        # put_state/get_state: (value, written at), oldest first; bounded as sessions are.
        self._states: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _live(self, session: str, now: float) -> _Window | None:
        """The session's window; None when unknown or idle past the TTL (then dropped)."""
        window = self._sessions.get(session)
        if window is not None and now - self._seen[session] > self.ttl:
            self._drop(session)
            return None
        return window

    def _drop(self, session: str) -> None:
        del self._sessions[session]
        del self._seen[session]
        if self._holds:
            self._holds.pop(session, None)
        if self._index:
            self._index.pop(session, None)

    def _touch(self, session: str, now: float) -> None:
        """The session is the most recently used."""
        self._seen[session] = now
        self._sessions.move_to_end(session)

    def _store(self, session: str, window: _Window, now: float) -> None:
        """The session's new window, the session now the most recently used; then the
        least recently used leave if past the bound or the TTL (never this one)."""
        sessions, seen = self._sessions, self._seen
        sessions[session] = window
        sessions.move_to_end(session)
        seen[session] = now
        if len(sessions) > self.max_sessions or now - self._oldest > self.ttl:
            self._evict(now)

    def _read(self, session: str) -> _Window | None:
        """The session's window, the session touched; None when unknown or expired."""
        now = self._clock()
        window = self._live(session, now)
        if window is not None:
            self._touch(session, now)
        return window

    def _pushed(
        self, session: str, window: _Window, calls: _Calls | None, step: _Held, limit: int
    ) -> _Window:
        """The window with ``step`` appended and the oldest steps past ``limit`` dropped;
        the session's index (``calls``) follows, built once the window is past
        INDEX_FROM."""
        excess = len(window) + 1 - limit
        if excess > 0:  # a full window: one copy through a list, not a slice and a sum
            steps = list(window)
            if calls is not None:
                for dropped in steps[:excess]:
                    _count(calls, dropped, -1)
            del steps[:excess]
            steps.append(step)
            window = tuple(steps)
        else:
            window += (step,)
        if calls is not None:
            _count(calls, step, 1)
        elif len(window) > INDEX_FROM:
            self._index[session] = _counts(window)
        return window

    def _call_counts(self, session: str) -> _Calls:
        """The session's index as it is, or (not built yet) as it would be: what the
        tests hold against its window, and against the Redis store's."""
        calls = self._index.get(session)
        return dict(calls) if calls is not None else _counts(self._sessions[session])

    async def history(self, session: str) -> list[Step]:
        window = self._read(session)
        return [] if window is None else _steps(window)

    async def history_for_call(self, session: str, tool: str, params_hash: str) -> list[Step]:
        """``history(session)``, or ``[]`` when the call has no step in the window and
        its tool no failure there.

        The stall rules fire on a call's own earlier steps or (tool-wide) on its tool's
        failures, so otherwise an empty history gives the same verdict -- without
        copying and scanning the window (the common case: most calls are new).
        """
        window = self._read(session)
        if window is None or not _holds(window, self._index.get(session), tool, params_hash):
            return []
        return _steps(window)

    async def append(self, session: str, step: Step, window: int) -> None:
        self._push(session, _held(step), window)

    def _push(self, session: str, step: _Held, limit: int) -> None:
        now = self._clock()
        window = self._live(session, now) or ()  # none: new, or expired (afresh)
        window = self._pushed(session, window, self._index.get(session), step, limit)
        self._store(session, window, now)

    async def reserve(
        self, session: str, tool: str, params_hash: str, window: int, hold_seconds: float
    ) -> tuple[list[Step], str]:
        # No await here: atomic on the event loop.
        now = self._clock()
        steps = self._live(session, now)
        history: list[Step] = []
        latest = None
        calls = None
        holds = self._holds.setdefault(session, {})
        if steps is None:
            steps = ()
        else:
            calls = self._index.get(session)
            if holds:
                steps = _expire(steps, calls, holds, now)
            if _holds(steps, calls, tool, params_hash):
                history = _steps(steps)
                latest = _latest(history, tool, params_hash)
        tool = _interned(tool)
        held: _Held = (
            (tool, params_hash, IN_FLIGHT, False)
            if latest is None
            else (tool, params_hash, latest.marker, latest.error)
        )
        self._store(session, self._pushed(session, steps, calls, held, window), now)
        token = f"r{next(self._tokens)}"
        holds[token] = (now + hold_seconds, held)
        return history, token

    def _unhold(self, session: str, token: str) -> _Held | None:
        """The reservation's in-flight step, no longer pending (None: unknown token)."""
        holds = self._holds.pop(session, None)
        if holds is None:
            return None
        reserved = holds.pop(token, None)
        if holds:  # more calls in flight (seldom)
            self._holds[session] = holds
        return None if reserved is None else reserved[1]

    async def settle(self, session: str, token: str, step: Step, window: int) -> None:
        held = _held(step)
        reserved = self._unhold(session, token)
        if reserved is not None:
            steps = self._sessions[session]  # a session with reservations is there
            index = _find(steps, reserved)
            if index >= 0:  # in place of the in-flight step (the same call)
                if reserved[3] != held[3] and (calls := self._index.get(session)) is not None:
                    _add(calls, (held[0], TOOL_ERRORS), 1 if held[3] else -1)
                replaced = list(steps)  # the quickest copy with one step changed
                replaced[index] = held
                sessions = self._sessions
                sessions[session] = tuple(replaced)
                sessions.move_to_end(session)
                self._seen[session] = self._clock()
                return
        self._push(session, held, window)

    async def release(self, session: str, token: str) -> None:
        reserved = self._unhold(session, token)
        if reserved is not None:
            steps = self._sessions[session]
            self._sessions[session] = _without(steps, reserved, self._index.get(session))

    def _evict(self, now: float) -> None:
        sessions, seen = self._sessions, self._seen
        # The least recently used come first, so expired sessions are at the front.
        while sessions:
            oldest = next(iter(sessions))
            if len(sessions) > self.max_sessions or now - seen[oldest] > self.ttl:
                self._drop(oldest)
            else:
                self._oldest = seen[oldest]
                return
        self._oldest = now

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
        self._seen.clear()
        self._holds.clear()
        self._index.clear()
        self._states.clear()


def _encoded(step: Step) -> bytes:
    """A step as the scripts store it: a compact JSON array, UTF-8."""
    return orjson.dumps([step.tool, step.params_hash, step.marker, 1 if step.error else 0])


def encode_step(step: Step) -> str:
    return _encoded(step).decode()


def decode_step(raw: bytes | str) -> Step:
    # An in-flight step carries its reservation's token as a fifth element.
    tool, params_hash, marker, error, *_token = orjson.loads(raw)
    return Step(tool, params_hash, marker, bool(error))


# A call's field in the session's count hash: tool and params hash, joined by a unit
# separator (\x1f, '\31' in Lua); a tool's failures: the tool and the separator.
# Every script that changes the window keeps the counts hash in step with it through
# this one function: a step counts under its call's field, and a failed step under its
# tool's failures field too (the memory store's index, ``TOOL_ERRORS``). ``s`` is a
# decoded step {tool, params hash, marker, error, [token]}.
_COUNT = r"""
local function count(s, delta)
  local field = s[1] .. '\31' .. s[2]
  if redis.call('HINCRBY', KEYS[2], field, delta) <= 0 then redis.call('HDEL', KEYS[2], field) end
  if s[4] == 1 then
    field = s[1] .. '\31'
    if redis.call('HINCRBY', KEYS[2], field, delta) <= 0 then redis.call('HDEL', KEYS[2], field) end
  end
end
"""

# KEYS: steps list, counts hash. ARGV: tool, params hash. The window, or nil when
# neither the call nor a failure of its tool is in it (the detector's verdict is then
# "allow" without it).
_HISTORY_FOR_CALL = r"""
if redis.call('HEXISTS', KEYS[2], ARGV[1] .. '\31' .. ARGV[2]) == 0
  and redis.call('HEXISTS', KEYS[2], ARGV[1] .. '\31') == 0 then return false end
return redis.call('LRANGE', KEYS[1], 0, -1)
"""

# Steps pushed past the window are dropped and uncounted (the same lines in every
# script that pushes). KEYS[1] steps list, KEYS[2] counts hash; ``window`` a number.
# ``len``: the list's length after the push (RPUSH returns it).
_TRIM = r"""
while len > window do
  count(cjson.decode(redis.call('LPOP', KEYS[1])), -1)
  len = len - 1
end
"""

# KEYS: steps list, counts hash. ARGV: encoded step, window, ttl. Both keys expire
# together.
_APPEND = (
    _COUNT
    + r"""
local len = redis.call('RPUSH', KEYS[1], ARGV[1])
count(cjson.decode(ARGV[1]), 1)
local window = tonumber(ARGV[2])
"""
    + _TRIM
    + r"""
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
"""
)

# Expired reservations out of the window (KEYS[3]: the reservations, scored by deadline
# in ms of the server's clock; ``now`` set before).
_EXPIRE = r"""
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, held in ipairs(stale) do
  if redis.call('LREM', KEYS[1], 1, held) > 0 then count(cjson.decode(held), -1) end
end
if #stale > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
"""

# KEYS: steps, counts, reservations. ARGV: tool, params hash, token, window, ttl, hold
# (ms), in-flight marker. Returns {the
# in-flight step as stored, the window before it (or false when neither the call nor
# a failure of its tool had a step in it)}.
_RESERVE = (
    _COUNT
    + r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
    + _EXPIRE
    + r"""
local before = false
local marker, err = ARGV[7], 0
if redis.call('HEXISTS', KEYS[2], ARGV[1] .. '\31' .. ARGV[2]) == 1
  or redis.call('HEXISTS', KEYS[2], ARGV[1] .. '\31') == 1 then
  before = redis.call('LRANGE', KEYS[1], 0, -1)
  for i = #before, 1, -1 do
    local s = cjson.decode(before[i])
    if s[1] == ARGV[1] and s[2] == ARGV[2] then marker, err = s[3], s[4]; break end
  end
end
local step = {ARGV[1], ARGV[2], marker, err, ARGV[3]}
local held = cjson.encode(step)
local len = redis.call('RPUSH', KEYS[1], held)
count(step, 1)
local window = tonumber(ARGV[4])
"""
    + _TRIM
    + r"""
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), held)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return {held, before}
"""
)

# KEYS: steps, counts, reservations. ARGV: the in-flight step as stored, the real
# step, window, ttl. In place when the in-flight step is still there (the same call:
# only its tool's failure count can change).
_SETTLE = (
    _COUNT
    + r"""
redis.call('ZREM', KEYS[3], ARGV[1])
local pos = redis.call('LPOS', KEYS[1], ARGV[1], 'RANK', -1)  -- from the newest end
local step = cjson.decode(ARGV[2])
if pos then
  redis.call('LSET', KEYS[1], pos, ARGV[2])
  local held = cjson.decode(ARGV[1])
  if held[4] ~= step[4] then  -- the same call: only its tool's failures can change
    local field = step[1] .. '\31'
    if redis.call('HINCRBY', KEYS[2], field, step[4] - held[4]) <= 0 then
      redis.call('HDEL', KEYS[2], field)
    end
  end
else
  local len = redis.call('RPUSH', KEYS[1], ARGV[2])
  count(step, 1)
  local window = tonumber(ARGV[3])
"""
    + _TRIM
    + r"""
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
"""
)

# KEYS: steps, counts, reservations. ARGV: the in-flight step as stored.
_RELEASE = (
    _COUNT
    + r"""
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('LREM', KEYS[1], 1, ARGV[1]) > 0 then count(cjson.decode(ARGV[1]), -1) end
"""
)


# What a reply not awaited is reported to: None (done) or the failure.
Done = Callable[[BaseException | None], None]


def _failure(future: asyncio.Future[Any]) -> BaseException | None:
    if future.cancelled():
        return StoreError("redis store: the command was cancelled")
    exc = future.exception()
    return None if exc is None else StoreError(f"redis store: {exc}")


class _Script:
    """A Lua script run by its SHA1 (EVALSHA), sent whole once when the server does not
    know it yet (first use, or after a restart or SCRIPT FLUSH)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class RedisStore:
    def __init__(
        self,
        url: str,
        key_prefix: str = "loopguard:",
        ttl_seconds: float = 3600.0,
        *,
        connect_timeout: float = 2.0,
        reply_timeout: float | None = 2.0,
    ) -> None:
        """``reply_timeout``: how long a command waits for its reply; None leaves it to
        the caller (a ``BreakerStore`` in front bounds every operation already)."""
        from guard.engine.resp import RedisReplyError, RespClient

        self.url = url
        self.key_prefix = key_prefix
        self.ttl = max(1, math.ceil(ttl_seconds))
        try:
            self._client = RespClient(
                url,
                connect_timeout=connect_timeout,
                timeout=reply_timeout,
                scripts=(_HISTORY_FOR_CALL, _APPEND, _RESERVE, _SETTLE, _RELEASE),
            )
        except ValueError as exc:
            raise StoreError(f"redis store {url}: {exc}") from exc
        self._reply_error = RedisReplyError
        # OSError covers refused and lost connections, and timeouts.
        self._errors = (RedisReplyError, OSError, ValueError)
        # Reservation tokens: unique per process (the instance) and per call.
        self._tokens = itertools.count()
        self._instance = os.urandom(6).hex()
        self._history_for_call = _Script(_HISTORY_FOR_CALL)
        self._append = _Script(_APPEND)
        self._reserve = _Script(_RESERVE)
        self._settle = _Script(_SETTLE)
        self._release = _Script(_RELEASE)

    async def _eval(self, script: _Script, keys: list[str], *args: str | bytes | int) -> Any:
        try:
            return await self._client.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except self._reply_error as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self._client.call("EVAL", script.source, len(keys), *keys, *args)

    def _keys(self, session: str) -> list[str]:
        """The session's steps and counts. The ``{session}`` hash tag keeps both in one
        Redis Cluster slot, as a script touching both needs."""
        base = f"{self.key_prefix}{{{session}}}"
        return [f"{base}:steps", f"{base}:calls"]

    def _reservation_keys(self, session: str) -> list[str]:
        """The session's two keys and its reservations (a sorted set by deadline)."""
        base = f"{self.key_prefix}{{{session}}}"
        return [f"{base}:steps", f"{base}:calls", f"{base}:held"]

    async def history(self, session: str) -> list[Step]:
        try:
            raw = await self._client.call("LRANGE", self._keys(session)[0], 0, -1)
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot read session: {exc}") from exc
        return self._decoded(raw)

    async def history_for_call(self, session: str, tool: str, params_hash: str) -> list[Step]:
        """One round trip; the window crosses the network only when it holds the call."""
        try:
            raw = await self._eval(self._history_for_call, self._keys(session), tool, params_hash)
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot read session: {exc}") from exc
        return self._decoded(raw) if raw else []

    def _decoded(self, raw: Sequence[bytes | str]) -> list[Step]:
        try:
            return [decode_step(item) for item in raw]
        except (ValueError, TypeError) as exc:
            raise StoreError(f"redis store {self.url}: malformed step in session: {exc}") from exc

    async def append(self, session: str, step: Step, window: int) -> None:
        try:
            await self._eval(self._append, self._keys(session), _encoded(step), window, self.ttl)
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot append step: {exc}") from exc

    async def reserve(
        self, session: str, tool: str, params_hash: str, window: int, hold_seconds: float
    ) -> tuple[list[Step], str]:
        """One round trip: the check and the in-flight step, atomically."""
        try:
            held, before = await self._eval(
                self._reserve,
                self._reservation_keys(session),
                tool,
                params_hash,
                f"r{next(self._tokens)}:{self._instance}",
                window,
                self.ttl,
                max(1, int(hold_seconds * 1000)),
                IN_FLIGHT,
            )
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot reserve call: {exc}") from exc
        token = held.decode() if isinstance(held, bytes) else str(held)
        return (self._decoded(before) if before else []), token

    async def settle(self, session: str, token: str, step: Step, window: int) -> None:
        try:
            keys = self._reservation_keys(session)
            await self._eval(self._settle, keys, token, _encoded(step), window, self.ttl)
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot settle call: {exc}") from exc

    def settle_nowait(self, session: str, token: str, step: Step, window: int, done: Done) -> bool:
        """``settle`` queued on the connection, its reply not awaited: ``done`` is
        called with None or the failure when it comes. False when not connected (then
        ``settle``). Redis runs a connection's commands in order, so whatever this
        process sends next sees the settled step."""
        keys = self._reservation_keys(session)
        return self._send_script(
            self._settle, done, 3, *keys, token, _encoded(step), window, self.ttl
        )

    def release_nowait(self, session: str, token: str, done: Done) -> bool:
        """``release`` queued, as ``settle_nowait``."""
        return self._send_script(self._release, done, 3, *self._reservation_keys(session), token)

    def _send_script(self, script: _Script, done: Done, *args: str | bytes | int) -> bool:
        sent = self._client.send("EVALSHA", script.sha, *args)
        if sent is None:
            return False

        def replied(future: asyncio.Future[Any]) -> None:
            exc = future.exception()
            if isinstance(exc, self._reply_error) and str(exc).startswith("NOSCRIPT"):
                again = self._client.send("EVAL", script.source, *args)  # flushed scripts
                if again is not None:
                    again.add_done_callback(lambda retried: done(_failure(retried)))
                    return
            done(_failure(future) if exc is None else StoreError(f"redis store: {exc}"))

        sent.add_done_callback(replied)
        return True

    async def release(self, session: str, token: str) -> None:
        try:
            await self._eval(self._release, self._reservation_keys(session), token)
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot release call: {exc}") from exc

    async def put_state(self, key: str, value: str) -> None:
        try:
            await self._client.call("SET", f"{self.key_prefix}state:{key}", value, "EX", self.ttl)
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot write state: {exc}") from exc

    async def get_state(self, key: str) -> str | None:
        try:
            raw = await self._client.call("GET", f"{self.key_prefix}state:{key}")
        except self._errors as exc:
            raise StoreError(f"redis store {self.url}: cannot read state: {exc}") from exc
        return raw.decode() if isinstance(raw, bytes) else raw

    async def aclose(self) -> None:
        await self._client.aclose()


__all__ = [
    "IN_FLIGHT",
    "TOOL_ERRORS",
    "MemoryStore",
    "RedisStore",
    "SessionStore",
    "StateStore",
    "StoreError",
    "decode_step",
    "encode_step",
]
