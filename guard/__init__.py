"""loopguard: stop agents that loop, and measure what they call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from guard.doors.inprocess import Guard, StalledRepeatError
    from guard.doors.middleware import GuardMiddleware

__all__ = ["Guard", "GuardMiddleware", "StalledRepeatError", "__version__"]

# Imported on first use (PEP 562): `import guard` stays cheap for the CLI and the proxy.
_LAZY = {
    "Guard": "guard.doors.inprocess",
    "StalledRepeatError": "guard.doors.inprocess",
    "GuardMiddleware": "guard.doors.middleware",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'guard' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
