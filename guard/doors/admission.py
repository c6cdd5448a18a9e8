"""The one admission path of the HTTP front doors: a routed request becomes either a
``Forward`` (the Exchange that follows it, and the body to send on) or an ``Answer``
loopguard sends itself (a refused body, a malformed request, a stopped call).

    admitted = await admit(engine, router, route, receive, method, path, query, headers)
    if admitted is None: ...            # the client left while its body was read
    elif isinstance(admitted, Answer): await send_answer(send, admitted)
    else: forward admitted.body, relay the response through admitted.exchange,
          then admitted.release()   # the body's bytes leave the in-flight budget

The reverse proxy and the middleware differ only in what they forward to (an
upstream URL, the wrapped app); everything from reading the body to the guard's
decision, and the rule that a guard bug serves the call unguarded, is here.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from guard.doors.asgi import BodyBudget, BodyRefused, ClientDisconnected, Receive, read_body
from guard.doors.exchange import Exchange, exception_fields
from guard.doors.routing import Router
from guard.engine.calls import Route
from guard.engine.config import RouteConfig
from guard.engine.contract import Answer, RequestView
from guard.engine.core import Engine
from guard.engine.problem import ROUTE_HEADER

log = structlog.get_logger("loopguard")


@dataclass(slots=True)
class Forward:
    """An admitted request: send ``body`` on, and the response through ``exchange``;
    ``release()`` once the forwarded copy is done with (its bytes stay charged to the
    in-flight budget until then)."""

    exchange: Exchange
    body: bytes
    budget: BodyBudget
    charge: int

    def release(self) -> None:
        self.budget.give(self.charge)
        self.charge = 0


async def admit(
    engine: Engine,
    router: Router,
    route: RouteConfig,
    receive: Receive,
    method: str,
    path: str,
    query: str,
    headers: dict[str, str],
) -> Forward | Answer | None:
    """Read the body (bounded), let the route's adapter and the engine decide.

    ``path`` is the path after the route prefix; ``headers`` lower-cased. None: the
    client went away before its body was read (nothing to answer).
    """
    server = engine.config.server
    budget = router.body_budget
    declared = headers.get("content-length")
    # A declared length is charged whole before reading; a chunked body as it is read.
    charge = (
        min(int(declared), server.max_body_bytes + 1)
        if declared is not None and declared.isdigit()
        else 0
    )
    try:
        budget.take(charge)
    except BodyRefused as refused:
        return refused.answer
    try:
        try:
            body = await read_body(
                receive,
                server.max_body_bytes,
                declared,
                server.body_read_timeout,
                budget if declared is None else None,
            )
        except BodyRefused as refused:
            return refused.answer
        except ClientDisconnected:
            return None
        if declared is None:
            charge = len(body)
        request = RequestView(method, path, query, headers, body, router.session_of(headers))
        exchange = Exchange(engine, route, router.adapters[route.prefix], request)
        try:
            admitted = await exchange.admit()
        except Exception as exc:
            # A guard bug must not take the agent's tools down: serve the call
            # unguarded, recorded (stage "guard") and traced, never silently.
            log.error("guard_error", route=route.prefix, **exception_fields(exc))
            await exchange.release_reservations()
            exchange.fail_open(exc)
            admitted = body
        if isinstance(admitted, Answer):
            return _with_route(admitted, exchange.record.route)
        # Forwarded: the charge goes with the body, given back by Forward.release().
        held, charge = charge, 0
        return Forward(exchange, admitted, budget, held)
    finally:
        # One coroutine, not two: this runs on every guarded call.
        budget.give(charge)


def _with_route(answer: Answer, route: Route) -> Answer:
    """The answer names what loopguard did (adapters' stop answers already do)."""
    if not any(name.lower() == ROUTE_HEADER for name, _ in answer.headers):
        answer.headers.append((ROUTE_HEADER, route.value))
    return answer
