"""Bodies the guard cannot read as JSON are still calls.

A body that does not parse (invalid UTF-8, trailing garbage, a number too long to
read, nested deeper than the parser follows), or is larger than the configured parse
cap, is stood for by its raw bytes: ``raw_params`` is a small JSON value naming the
bytes' xxh3 and length under a marker key, so the same bytes sent again are the same
call and a repeat is seen and stopped. A body with a declared ``content-encoding``
(gzip, deflate) is decoded first, bounded, so a compressed JSON call is judged on
its parameters like any other.
"""

from __future__ import annotations

import zlib
from typing import Any

import xxhash

# A declared content-encoding is undone up to this many bytes; past it, hashed raw.
DECODED_LIMIT = 8 * 1024 * 1024
# The marker key of a raw-bytes stand-in (never a key a real tool argument uses).
RAW_KEY = "loopguard.unparsed_body_xxh3"


class NotParsed(ValueError):
    """A body the guard does not parse: ``reason`` says why, for the record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def raw_params(body: bytes, reason: str) -> dict[str, Any]:
    """The parameters of a call whose body was not parsed: its bytes' hash."""
    return {RAW_KEY: xxhash.xxh3_128_hexdigest(body), "length": len(body), "reason": reason}


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``body`` with its declared ``content-encoding`` undone, at most ``limit`` bytes.

    Raises ``NotParsed`` for an encoding this cannot undo, a corrupt stream, or one
    that inflates past ``limit`` (a decompression bomb is not read to its end).
    """
    name = (encoding or "identity").strip().lower()
    if name in ("", "identity"):
        return body
    wbits = _WBITS.get(name)
    if wbits is None:
        raise NotParsed(f"content-encoding {name!r} is not decoded")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise NotParsed(f"content-encoding {name}: corrupt ({exc})") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise NotParsed(f"content-encoding {name}: inflates past {limit} bytes")
    return out


__all__ = ["DECODED_LIMIT", "RAW_KEY", "NotParsed", "decode_content", "raw_params"]
