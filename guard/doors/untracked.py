"""A warning when guarded calls arrive with nothing naming their session.

Such calls are served and traced (``loopguard.session.tracked = false``) but never
stopped: without a session loopguard cannot tell one agent's repeats from another's.
That is silent unless someone reads the spans, so the first such call on a route in
each interval logs one warning naming the route and the fix; the rest of the interval
is counted, not logged.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import structlog

log = structlog.get_logger("loopguard")

UNTRACKED_EVENT = "guarded_calls_untracked"
INTERVAL_S = 300.0
_FIX = (
    "send an x-loopguard-session header (or another of [session] headers), "
    'or set [session] fallback = "credential"'
)

_lock = threading.Lock()
# Per engine (one per proxy, middleware or Guard), per route prefix: (when last
# warned, calls since). Weak keys: an engine closed and dropped takes its state along.
_seen: weakref.WeakKeyDictionary[Any, dict[str, tuple[float, int]]] = weakref.WeakKeyDictionary()


def warn_untracked(engine: Any, prefix: str) -> None:
    """Note one guarded call without a session on the route ``prefix``."""
    now = time.monotonic()
    with _lock:
        routes = _seen.setdefault(engine, {})
        last, since = routes.get(prefix, (float("-inf"), 0))
        if now - last < INTERVAL_S:
            routes[prefix] = (last, since + 1)
            return
        routes[prefix] = (now, 0)
    log.warning(UNTRACKED_EVENT, route=prefix, untracked_since_last_warning=since, fix=_FIX)
