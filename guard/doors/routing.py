"""Which route an HTTP request is for, and which session it belongs to.

HTTP knowledge, so it lives with the front doors (the engine knows neither paths
nor headers). One ``Router`` per door, built once from the config: the lookups run
on every request and build nothing per request.
"""

from __future__ import annotations

from adapters import get_adapter
from guard.doors.asgi import BodyBudget
from guard.engine.config import Config, RouteConfig
from guard.engine.contract import Adapter
from guard.engine.pseudonym import keyed_pseudonym
from guard.engine.redact import load_key

# Headers carrying the caller's credential, for [session] fallback = "credential".
_CREDENTIAL_HEADERS = ("authorization", "x-api-key")


class Router:
    def __init__(self, config: Config) -> None:
        # One adapter per configured route, keyed by prefix.
        self.adapters: dict[str, Adapter] = {r.prefix: get_adapter(r) for r in config.routes}
        # Request body bytes being read and admitted at once, for this app.
        self.body_budget = BodyBudget(config.server.max_bytes_in_flight)
        # (route, prefix + "/") pairs: no string built per route per request.
        self._routes = tuple((route, route.prefix + "/") for route in config.routes)
        self._session_headers = tuple(name.lower() for name in config.session.headers)
        # The credential is never the session itself: a keyed pseudonym of it is.
        self._credential = (
            keyed_pseudonym(load_key(config.redaction.pseudonym_key_env), b"loopguard.cred")
            if config.session.fallback == "credential"
            else None
        )

    def route_for(self, path: str) -> tuple[RouteConfig, str] | None:
        """The longest-prefix route for a path, and the path left after the prefix."""
        best: RouteConfig | None = None
        for route, below in self._routes:
            prefix = route.prefix
            matches = prefix == "/" or path == prefix or path.startswith(below)
            if matches and (best is None or len(prefix) > len(best.prefix)):
                best = route
        if best is None:
            return None
        rest = path if best.prefix == "/" else path[len(best.prefix) :]
        return best, rest

    def session_of(self, headers: dict[str, str]) -> str | None:
        """The first configured session header present (headers lower-cased): the one
        place a request's session is named; the Exchange and the adapters get it from
        the ``RequestView``."""
        for name in self._session_headers:
            value = headers.get(name)
            if value:
                return value
        if self._credential is not None:
            for name in _CREDENTIAL_HEADERS:
                value = headers.get(name)
                if value:
                    return "cred_" + self._credential(value)
        return None
