"""Server-side conversation state (OpenAI Responses ``previous_response_id`` and
``conversation``).

A request that continues a stored response carries only its newest items: the tool
results for the calls that response made. loopguard relays every response, so it keeps,
per response id, what judging the next request needs -- never a payload:

    {"s": [[tool, params_hash, marker, error, stopped], ...],   # the history so far
     "c": {call_id: [tool, params_hash], ...}}                  # the calls it carried

in the session store (``put_state``/``get_state``: memory, or Redis so replicas agree),
at most ``loop.window`` steps, expiring as sessions do. The next request's results are
paired with the calls by id, the steps appended, and the whole judged exactly as a
request carrying its full history (nudge, then stop). A response loopguard never saw
(state created elsewhere, expired, or a store without state) is served and the call is
marked untracked (``session_tracked = false`` on span and record), never guessed.

A ``conversation`` (the Conversations API) is one object the server appends every
request's items and every response's output to: the state is kept per conversation
instead of per response, under a keyed pseudonym of the conversation id (the id itself
never reaches the store), and each relayed response replaces it. A conversation
loopguard holds no state for is served and marked untracked the same way; from there on
its chain is what loopguard relays.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from guard.engine.contract import HistoryStep, Observation, ParsedRequest
from guard.engine.core import Engine
from guard.engine.problem import STOP_SIGNATURE, is_stop_answer

_KEY = "response:"
_CONVERSATION_KEY = "conversation:"
# [tool, params_hash, marker, error, the result was loopguard's own stop]
Stored = list[Any]


class Chain:
    """What one Responses request knows of the conversation it continues."""

    __slots__ = ("key", "known", "steps", "stopped")

    def __init__(
        self, steps: list[Stored], known: bool, key: str | None = None, stopped: bool = False
    ) -> None:
        self.steps = steps  # the history, oldest first, as stored
        self.known = known  # False: the request continues a response loopguard never saw
        # Where the next state goes: the conversation's key, or None (the response's id).
        self.key = key
        # The state ends in loopguard's own stop answer (what a framework's retry after
        # the stop continues): the request's new turns are read after that answer.
        self.stopped = stopped


async def rebuild(engine: Engine, parsed: ParsedRequest, *, offload: bool = False) -> Chain:
    """The stored history this request continues, with its own results appended.
    ``offload``: a large request, whose results are marked and calls hashed in a worker
    thread, off the event loop (only the store is awaited here)."""
    key = None
    if parsed.conversation is not None:
        key = _CONVERSATION_KEY + engine.pseudonym(parsed.conversation)
    elif parsed.continues is not None:
        key = _KEY + parsed.continues
    raw = None
    if key is not None:
        get = getattr(engine.store, "get_state", None)
        raw = await get(key) if get is not None else None
        if parsed.conversation is None:
            key = None  # the next state is kept under the new response's id
    if offload:
        return await asyncio.to_thread(_build, engine, parsed, key, raw)
    return _build(engine, parsed, key, raw)


def _build(engine: Engine, parsed: ParsedRequest, key: str | None, raw: Any) -> Chain:
    if parsed.conversation is None and parsed.continues is None:
        return Chain(_inline(engine, parsed), True)  # continues nothing kept
    if raw is None:
        return Chain(_inline(engine, parsed), False, key)
    state = orjson.loads(raw)
    steps = list(state.get("s") or [])
    stopped = bool(state.get("x"))
    calls: dict[str, list[str]] = state.get("c") or {}
    for call_id, (outcome, error) in (parsed.open_results or {}).items():
        call = calls.get(str(call_id))
        if call is None:
            continue  # a result for a call this response did not make: not guessed
        tool, params_hash = call
        stopped = is_stop_answer(outcome)
        steps.append([tool, params_hash, engine.marker(tool, outcome), error, stopped])
    return Chain(steps + _inline(engine, parsed), True, key, stopped)


def history(chain: Chain) -> list[HistoryStep]:
    """The chain as the conversation analysis reads it (hashes already made)."""
    return [
        HistoryStep(
            tool,
            None,
            STOP_SIGNATURE if stopped else None,
            bool(error),
            params_hash=params_hash,
            marker=marker,
        )
        for tool, params_hash, marker, error, stopped in chain.steps
    ]


async def remember(
    engine: Engine, chain: Chain, observation: Observation, *, offload: bool = False
) -> None:
    """Keep the history and the calls of a relayed response under its id (or its
    conversation's key). ``offload``: a large response, whose calls' parameters are
    redacted and hashed in a worker thread, off the event loop."""
    response_id = observation.response_id
    if not response_id:  # no response id: the upstream made no response
        return

    def calls_of() -> dict[str, list[str]]:
        return {
            str(call.call_id): [call.tool, engine.fingerprint(call.params)]
            for call in observation.requested_tools
            if call.call_id is not None
        }

    calls = await asyncio.to_thread(calls_of) if offload else calls_of()
    await _keep(engine, chain.key or _KEY + response_id, chain, {"c": calls})


async def remember_stop(engine: Engine, chain: Chain, response_id: str | None) -> None:
    """Keep the history under the id of a stop answer loopguard wrote (or under the
    conversation's key, which the upstream never sees the stop in), marked as ending in
    that stop: a framework's retry continuing it is then judged as the same stall."""
    key = chain.key or (_KEY + response_id if response_id else None)
    if key is not None:
        await _keep(engine, key, chain, {"c": {}, "x": 1})


async def _keep(engine: Engine, key: str, chain: Chain, extra: dict[str, Any]) -> None:
    """The chain's last ``loop.window`` steps and ``extra`` under ``key``, in a store
    that keeps state (else nothing: such requests stay untracked)."""
    put = getattr(engine.store, "put_state", None)
    if put is None:
        return
    state = {"s": chain.steps[-engine.config.loop.window :], **extra}
    await put(key, orjson.dumps(state).decode())


def _inline(engine: Engine, parsed: ParsedRequest) -> list[Stored]:
    """Steps the request carries in full (calls and results both in its items)."""
    return [
        [
            step.tool,
            engine.fingerprint(step.params),
            engine.marker(step.tool, step.outcome),
            step.error,
            is_stop_answer(step.outcome),
        ]
        for step in parsed.history or ()
        if step.kind == "tool"  # a text tail (no tool results) is not tool history
    ]
