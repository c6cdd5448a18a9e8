"""Answers loopguard writes itself: RFC 9457 problem documents and the stop text.

The stop text is written for the model that will read it: what was repeated, how
often, and what to do instead. Every adapter uses the same words so that an agent
meets one consistent message whatever protocol it speaks.
"""

from __future__ import annotations

import json
import re
from typing import Any

from guard.engine.calls import Route, Verdict
from guard.engine.contract import Answer
from guard.engine.rules import RULES_BY_NAME

PROBLEM_BASE = "https://loopguard.dev/problems/"
ROUTE_HEADER = "x-loopguard-route"

# Every stop answer carries this phrase, so a stop that comes back inside a model
# conversation (as the tool result the agent recorded) is recognised as a repeat.
STOP_SIGNATURE = "loopguard stopped this call"


# Model routes: the id every stop answer loopguard writes starts with, per API (the
# stable machine marker: the text is the model's and the end user's, the id is not).
STOP_ID_PREFIXES = ("chatcmpl-loopguard-", "resp_loopguard_", "msg_loopguard_")


def stop_text(verdict: Verdict, message: str | None = None) -> str:
    """The explanation a model reads when its call is stopped.

    ``message``: a route's own wording (``stop_message``), a template with ``{tool}``,
    ``{n}`` (the times the tool ran) and ``{rule}``, in place of the default text.
    """
    if message is not None:
        return message.format(tool=verdict.tool, n=verdict.repeats, rule=verdict.rule or "")
    rule = RULES_BY_NAME.get(verdict.rule or "")
    own = getattr(rule, "stop_words", None)  # a rule not about one call's arguments
    if own is not None:
        return f"{STOP_SIGNATURE}: {own.format(n=verdict.repeats)}"
    what = (rule.words if rule is not None else "was repeated {n} times").format(n=verdict.repeats)
    return (
        f"{STOP_SIGNATURE}: `{verdict.tool}` with these same arguments {what}, "
        "so calling it again will not give you anything new. Do not repeat it. "
        "Use the result you already have, try a different tool or different arguments, "
        "or tell the user what is blocking you and ask how to proceed."
    )


def nudge_text(verdict: Verdict) -> str:
    """The guard message added to a model request the first time a stall shows."""
    own = getattr(RULES_BY_NAME.get(verdict.rule or ""), "nudge_words", None)
    if own is not None:
        return f"[loopguard] {own.format(n=verdict.repeats)}"
    return (
        f"[loopguard] You have called `{verdict.tool}` with the same arguments "
        f"{verdict.repeats} times and got the same outcome each time. Repeating it will not "
        "help. Take a different approach: use the information you already have, change the "
        "arguments, use another tool, or explain to the user what is blocking you."
    )


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    *,
    route: Route | None = None,
    extra: dict[str, Any] | None = None,
) -> Answer:
    body = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail}
    if extra:
        body.update({k: v for k, v in extra.items() if v is not None})
    headers = [("content-type", "application/problem+json")]
    if route is not None:
        headers.append((ROUTE_HEADER, route.value))
    return Answer(status=status, headers=headers, chunks=[json.dumps(body).encode()])


def stall_problem(verdict: Verdict, session: str | None, message: str | None = None) -> Answer:
    """422 problem+json for a stopped call (HTTP tools; model routes with on_stop = "error").

    ``message``: the route's ``stop_message`` template, the detail's wording (see
    ``stop_text``). The body's ``message`` member repeats the detail: the OpenAI and
    Anthropic SDKs (and the frameworks over them) put a body's ``message`` into the
    exception text and drop the rest, so without it the error a user sees would say only
    "Error code: 422".
    """
    text = stop_text(verdict, message)
    return problem(
        422,
        "stalled-repeat" if verdict.rule is None else str(verdict.rule).replace("_", "-"),
        "Call stopped by loopguard",
        text,
        route=Route.STOP_AND_REVIEW,
        extra={
            "message": text,
            "tool": verdict.tool,
            "params_hash": verdict.params_hash,
            "rule": str(verdict.rule) if verdict.rule else None,
            "repeats": verdict.repeats,
            "session": session,
        },
    )


# Stops written in a route's own words (``stop_message``), as patterns, so that a stop
# coming back in a conversation is recognised whatever its wording (the one count, a
# framework's retry after a stop). Process-wide on purpose: a stop any route of this
# process wrote is loopguard's. Filled by the engine from its routes; bounded.
_OWN_WORDS: dict[str, re.Pattern[str]] = {}
_OWN_WORDS_MAX = 256
_PLACEHOLDER = re.compile(r"\{(?:tool|n|rule)\}")
# Own words with fewer literal characters than this are matched whole, never searched
# for inside a longer text ("{tool}: {n}" alone would match almost anything).
_SEARCHABLE_LITERALS = 12


def register_stop_message(template: str) -> None:
    """Recognise stops written from ``template`` (a route's ``stop_message``)."""
    if template in _OWN_WORDS or len(_OWN_WORDS) >= _OWN_WORDS_MAX:
        return
    literals = [part.replace("{{", "{").replace("}}", "}") for part in _PLACEHOLDER.split(template)]
    pattern = ".+?".join(re.escape(part) for part in literals)
    if sum(len(part.strip()) for part in literals) < _SEARCHABLE_LITERALS:
        pattern = f"\\A\\s*{pattern}\\s*\\Z"
    _OWN_WORDS[template] = re.compile(pattern, re.S)


def is_stop_text(text: str) -> bool:
    """True when ``text`` is, or quotes, a stop loopguard wrote (default or own words)."""
    return STOP_SIGNATURE in text or any(p.search(text) for p in _OWN_WORDS.values())


def is_stop_answer(outcome: Any) -> bool:
    """True when a tool result is loopguard's own stop answer (any protocol's form)."""
    if isinstance(outcome, (bytes, bytearray)):
        outcome = outcome.decode("utf-8", "replace")
    if not isinstance(outcome, str):
        outcome = json.dumps(outcome, default=str, ensure_ascii=False)
    return is_stop_text(outcome)
