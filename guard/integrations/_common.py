"""What every framework integration shares: how a session is chosen for a call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from guard.doors.inprocess import CURRENT_SESSION

C = TypeVar("C")

# A session for one tool call: a fixed id, or a callable given the framework's own run
# context for that call (its type depends on the framework).
FrameworkSession = str | Callable[[Any], str | None] | None


def resolve_session(spec: FrameworkSession, context: Any, fallback: str | None) -> str | None:
    """The session of one call, in order: ``spec`` (a string, or a callable given the
    framework's context), the one ``Guard.session`` set, the framework's own run id
    (``fallback``). None: let the Guard use its default."""
    if isinstance(spec, str):
        return spec
    if spec is not None:
        named = spec(context)
        if named:
            return named
    return CURRENT_SESSION.get() or fallback
