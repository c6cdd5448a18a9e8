"""Progress markers: from a tool outcome to a short string that changes when the outcome does.

Formats (other modules and tests rely on them):

* an explicit marker (``x-loopguard-progress`` header or a protocol field) wins: the
  value itself, scrubbed by ``redact_text`` and cut to 64 characters;
* a configured JSON pointer (``[loop.tools.NAME] progress_pointer``, RFC 6901):
  ``"ptr:" + value`` (strings as they are, other values as canonical JSON, scrubbed;
  values longer than 60 characters become ``"ptr#" + xxh3_64 hex``). A pointer that
  does not resolve falls back to the hash;
* otherwise ``"h:" + xxh3_64 hex`` of the outcome with volatile keys dropped (wherever
  they appear in objects), volatile patterns replaced by ``~`` in every string, then
  redacted and canonicalized. Text outcomes: patterns replaced, scrubbed, hashed.

Volatile parts are removed *before* redaction so that a pseudonym's hex digest is never
mistaken for a volatile hex id.
"""

from __future__ import annotations

import re
from typing import Any

import xxhash

from guard.engine.canonical import canonical_json, encode_canonical, parse_json_text
from guard.engine.config import LoopConfig
from guard.engine.profiles import PROFILES, profile_of
from guard.engine.redact import Redactor

MAX_EXPLICIT = 64
MAX_POINTER_VALUE = 60
_MISSING = object()
_CACHE_SIZE = 8192  # entries per cache; cleared when full (as the redactor's caches)
_CACHED_TEXT_MAX = 512  # longer strings are stripped afresh each time
# Outcomes read from at most this many bytes have their marker cached by those bytes.
_CACHED_SOURCE_MAX = 1024


def resolve_pointer(document: Any, pointer: str) -> Any:
    """RFC 6901: the value at ``pointer`` in ``document``, or ``_MISSING``."""
    if pointer == "":
        return document
    node = document
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            if token not in node:
                return _MISSING
            node = node[token]
        elif isinstance(node, list):
            if not token.isdigit() or (token != "0" and token.startswith("0")):
                return _MISSING
            index = int(token)
            if index >= len(node):
                return _MISSING
            node = node[index]
        else:
            return _MISSING
    return node


class _Stripper:
    """Takes the volatile parts out of an outcome: keys dropped wherever they appear in
    objects, patterns replaced by ``~`` in every string. One per set of volatile keys
    (``[loop]``'s, and each profile's on top), each with its own caches."""

    def __init__(self, volatile_keys: frozenset[str], volatile: re.Pattern[str] | None) -> None:
        self._volatile_keys = volatile_keys
        self._volatile = volatile
        # Outcomes repeat their keys and many of their strings call after call (that is
        # what a loop is): the volatile-key test and the pattern substitution of short
        # strings are pure functions of their input, so they are cached.
        self._kept_keys: dict[str, bool] = {}
        self._text_cache: dict[str, str] = {}

    def text(self, text: str) -> str:
        return self._volatile.sub("~", text) if self._volatile is not None else text

    def value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return self._dict(value)
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        if isinstance(value, str):
            return self._str(value)
        return value

    def _dict(self, value: dict[Any, Any]) -> dict[Any, Any]:
        kept_keys = self._kept_keys
        out: dict[Any, Any] = {}
        for k, v in value.items():
            if type(k) is str:
                kept = kept_keys.get(k)
                if kept is None:
                    kept = self._key_kept(k)
                if not kept:
                    continue
            elif isinstance(k, str) and k.lower() in self._volatile_keys:
                continue
            # Exact type checks for the leaves parsed JSON is made of; anything else
            # (subclasses, tuples) takes the general path.
            t = type(v)
            if t is str:
                out[k] = self._str(v)
            elif t is dict:
                out[k] = self._dict(v)
            elif t is int or t is bool or t is float or v is None:
                out[k] = v
            else:
                out[k] = self.value(v)
        return out

    def _key_kept(self, key: str) -> bool:
        kept = key.lower() not in self._volatile_keys
        if len(self._kept_keys) >= _CACHE_SIZE:
            self._kept_keys.clear()
        self._kept_keys[key] = kept
        return kept

    def _str(self, text: str) -> str:
        cached = self._text_cache.get(text)
        if cached is not None:
            return cached
        stripped = self.text(text)
        if len(text) <= _CACHED_TEXT_MAX:
            if len(self._text_cache) >= _CACHE_SIZE:
                self._text_cache.clear()
            self._text_cache[text] = stripped
        return stripped


class ProgressMarkers:
    def __init__(self, loop_cfg: LoopConfig, redactor: Redactor) -> None:
        self.redactor = redactor
        self._cfg = loop_cfg
        keys = frozenset(k.lower() for k in loop_cfg.volatile_keys)
        patterns = loop_cfg.volatile_patterns
        volatile = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self._default = _Stripper(keys, volatile)
        # A profile with volatile keys of its own gets its own stripper (built once).
        self._by_profile = {
            profile.name: _Stripper(keys | {k.lower() for k in profile.volatile_keys}, volatile)
            for profile in PROFILES.values()
            if profile.volatile_keys
        }
        self._tools: dict[str, _Stripper] = {}  # per tool, resolved on first sight
        # (tool, the bytes an outcome was read from) -> its marker: a loop's tool
        # answers with the same bytes again and again (that is what a loop is), and
        # parsing, stripping, redacting and hashing them is a pure function of them.
        self._by_source: dict[tuple[str, bytes], str] = {}
        self._pointers = {
            name: o.progress_pointer
            for name, o in loop_cfg.tools.items()
            if o.progress_pointer is not None
        }

    def marker(
        self, tool: str, outcome: Any, explicit: str | None = None, source: bytes | None = None
    ) -> str:
        """``source``: the bytes ``outcome`` was read from, when it depends on them alone
        (then the marker is cached by them)."""
        if explicit is not None and explicit != "":
            return self.redactor.redact_text(str(explicit))[:MAX_EXPLICIT]
        if source is None or len(source) > _CACHED_SOURCE_MAX:
            return self._marker(tool, outcome)
        key = (tool, source)
        found = self._by_source.get(key)
        if found is None:
            found = self._marker(tool, outcome)
            if len(self._by_source) >= _CACHE_SIZE:
                self._by_source.clear()
            self._by_source[key] = found
        return found

    def _marker(self, tool: str, outcome: Any) -> str:
        value = parse_json_text(outcome)
        pointer = self._pointers.get(tool)
        if pointer is not None:
            found = resolve_pointer(value, pointer)
            if found is not _MISSING:
                text = found if isinstance(found, str) else canonical_json(found).decode()
                text = self.redactor.redact_text(text)
                if len(text) > MAX_POINTER_VALUE:
                    return "ptr#" + xxhash.xxh3_64_hexdigest(text.encode())
                return "ptr:" + text
        stripper = self._tools.get(tool)
        if stripper is None:
            stripper = self._stripper_for(tool)
        return "h:" + xxhash.xxh3_64_hexdigest(self._normalized(value, stripper))

    def _normalized(self, value: Any, stripper: _Stripper) -> bytes:
        """The bytes hashed for a marker: volatile parts out, redacted, canonical."""
        if isinstance(value, bytes | bytearray):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            return self.redactor.redact_text(stripper.text(value)).encode()
        return encode_canonical(self.redactor.redact(stripper.value(value)))

    def _stripper_for(self, tool: str) -> _Stripper:
        override = self._cfg.tools.get(tool)
        configured = override.profile if override is not None else None
        profile = profile_of(tool, configured, self._cfg.profile_names)
        stripper = self._by_profile.get(profile.name, self._default) if profile else self._default
        if len(self._tools) >= _CACHE_SIZE:
            self._tools.clear()
        self._tools[tool] = stripper
        return stripper


__all__ = ["ProgressMarkers", "resolve_pointer"]
