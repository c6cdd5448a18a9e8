"""Canonical JSON: the bytes a value is fingerprinted and compared by.

Keys sorted, no insignificant whitespace (separators ``,`` and ``:``), non-ASCII kept
as UTF-8, ``true``/``false``/``null`` as JSON has them. Numbers: an integer is printed
as an integer and a float by ``repr``; an integral float (``1.0``) is the same JSON
number as ``1`` and is printed ``1`` (clients disagree on how they print it, and the
call is the same call).

Arguments that arrive as a JSON *string* (OpenAI sends tool arguments that way) are
parsed first when they hold an object or array (``parse_json_text``), so
``'{"a":2}'`` and ``{"a": 2}`` are one call. ``fingerprint``, ``redact`` and
``progress`` build on it; it imports none of them (no import cycle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

try:  # optional accelerator, byte-identical output (see encode_canonical)
    import orjson

    _ORJSON: Any = orjson if hasattr(orjson, "Fragment") else None
except ImportError:  # pragma: no cover - depends on the install
    _ORJSON = None


class JSONFloat(float):
    """A non-integral float on its way to canonical JSON.

    Every encoder prints it as Python's ``json`` module does (``repr``; ``NaN``,
    ``Infinity``), so the canonical bytes do not depend on which encoder ran.
    """

    __slots__ = ()


def float_text(value: float) -> str:
    if math.isfinite(value):
        return float.__repr__(value)
    if value != value:
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def canonical_number(value: float) -> int | float:
    """An integral float is that integer; any other float a ``JSONFloat``."""
    return int(value) if value.is_integer() else JSONFloat(value)


def _make_stdlib_encoder() -> Callable[[Any], str]:
    """The stdlib C encoder called directly (no per-call wrapper layers)."""
    options: dict[str, Any] = {"sort_keys": True, "separators": (",", ":"), "ensure_ascii": False}
    encoder = json.JSONEncoder(**options)
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # pragma: no cover - CPython always has it
        return encoder.encode
    iterencode = c_make_encoder(
        None,  # no circular check: values come from parsed JSON
        encoder.default,
        json.encoder.encode_basestring,  # UTF-8 kept (ensure_ascii=False)
        None,  # no indent
        ":",
        ",",
        True,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return json.encoder.encode_basestring(value)
        return "".join(iterencode(value, 0))

    return encode


_stdlib_encode = _make_stdlib_encoder()


def _orjson_default(value: Any) -> Any:
    if isinstance(value, float):
        return _ORJSON.Fragment(float_text(value).encode())
    raise TypeError(f"not JSON: {type(value).__name__}")


def encode_canonical(value: Any) -> bytes:
    """Canonical UTF-8 JSON of an already normalized value (see ``canonical_json``).

    With orjson installed it does the work (~8x faster); its output is the same bytes
    as the stdlib path: strings are escaped alike, keys sorted by code point alike,
    and floats reach it only as ``JSONFloat``, printed by ``float_text``. What orjson
    refuses (ints beyond 64 bits, lone surrogates, non-string keys) goes to the stdlib.
    """
    if _ORJSON is not None:
        try:
            return _ORJSON.dumps(value, option=_ORJSON.OPT_SORT_KEYS, default=_orjson_default)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            pass
    return _stdlib_encode(value).encode("utf-8", "surrogatepass")


def canonical_json(value: Any) -> bytes:
    """The canonical UTF-8 JSON bytes of any JSON value."""
    return encode_canonical(normalize(value))


def normalize(value: Any) -> Any:
    """Numbers in canonical form; tuples as lists. (``Redactor.redact`` does this too.)"""
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalize(v) for v in value]
    if isinstance(value, float) and type(value) is not JSONFloat:
        return canonical_number(value)
    return value


def loads_json(data: str | bytes | bytearray | memoryview) -> Any:
    """``json.loads`` semantics at orjson's speed (several times faster on request bodies).

    orjson is stricter than the standard library (no ``NaN``/``Infinity``, integers to
    64 bits, valid UTF-8 only): anything it refuses goes to ``json.loads``, which either
    accepts it as before or raises ``json.JSONDecodeError`` with its usual message.
    """
    if _ORJSON is not None:
        try:
            value = _ORJSON.loads(data)
        except _ORJSON.JSONDecodeError as exc:
            if "depth" in str(exc):  # orjson's nesting limit: the stdlib would recurse
                raise JSONTooDeep(f"JSON nested deeper than {_MAX_DEPTH} levels") from None
        else:
            if not may_hold_wide_integer(data):
                return value
            # orjson turns an integer beyond 64 bits into the nearest float, silently:
            # two different wide integers (token amounts, 128-bit ids) would become one
            # value, and so one call or one unchanged answer. The stdlib keeps them exact.
    try:
        return json.loads(bytes(data) if isinstance(data, memoryview) else data)
    except RecursionError:
        raise JSONTooDeep(f"JSON nested deeper than {_MAX_DEPTH} levels") from None


_DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_WIDE_RUN = b"0" * 19  # the fewest digits of an integer outside [-2**63, 2**64)


def may_hold_wide_integer(data: str | bytes | bytearray | memoryview) -> bool:
    """Whether the JSON text has a run of 19 or more digits (anywhere, strings too).

    Every integer orjson cannot hold exactly has one; most bodies have none. A run of
    19 digits covers two consecutive bytes of any stride-9 sample, so the sample is
    looked at first (a ninth of the bytes) and the whole text only when it has two
    adjacent digits: ~0.2 us a KiB (plus ~0.3 us a call) where the whole text took
    ~0.7, against ~0.5 us a KiB for orjson's parse itself.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if b"00" not in bytes(raw[::9]).translate(_DIGITS_TO_ZERO):
        return False
    return _WIDE_RUN in bytes(raw).translate(_DIGITS_TO_ZERO)


class JSONTooDeep(ValueError):
    """JSON nested deeper than the parser follows: a parse error like any other."""


_MAX_DEPTH = 1024  # orjson's limit; the stdlib's recursion limit is near it


def parse_json_text(params: Any) -> Any:
    """A JSON object/array held in a str or bytes, parsed; anything else as given."""
    t = type(params)
    if t is dict or t is list:  # the common case: already parsed
        return params
    if isinstance(params, bytes | bytearray):
        try:
            params = params.decode()
        except UnicodeDecodeError:
            return params
    if isinstance(params, str):
        head = params.lstrip()[:1]
        if head in ("{", "["):
            try:
                return loads_json(params)
            except ValueError:
                return params
    return params
