"""Parameter fingerprints: redact -> canonical JSON -> xxh3_128 hex.

Canonical JSON is ``guard.engine.canonical``. xxhash is for speed, not secrecy:
secrecy comes from redacting first.
"""

from __future__ import annotations

from typing import Any

import xxhash

from guard.engine.canonical import canonical_json, encode_canonical, loads_json, parse_json_text
from guard.engine.redact import Redactor

# Re-exported: the adapters parse bodies with ``loads_json`` from here.
__all__ = ["canonical_json", "loads_json", "params_hash", "parse_json_text"]


def params_hash(params: Any, redactor: Redactor) -> str:
    """xxh3_128 hex of the canonical redacted parameters.

    ``Redactor.redact`` already yields canonical numbers, so one walk suffices.
    """
    redacted = redactor.redact(parse_json_text(params))
    return xxhash.xxh3_128_hexdigest(encode_canonical(redacted))
