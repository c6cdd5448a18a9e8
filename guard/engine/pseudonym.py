"""Keyed pseudonyms: identifiers (sessions, conversations, scrubbed values) leave
loopguard only as keyed BLAKE2b tokens, each kind in its own person space."""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Callable

SessionHasher = Callable[[str], str]


def keyed_hex_digest(key: bytes, person: bytes, digest_size: int) -> Callable[[bytes], str]:
    """The hex keyed BLAKE2b of bytes, keyed once: a keyed BLAKE2b starts by compressing
    a block holding the key, so each digest continues a copy of that state instead (the
    same digest, half the cost)."""
    keyed = hashlib.blake2b(key=key, digest_size=digest_size, person=person)

    def hex_digest(data: bytes) -> str:
        digest = keyed.copy()
        digest.update(data)
        return digest.hexdigest()

    return hex_digest


def keyed_pseudonym(key: bytes | None, person: bytes, prefix: str = "") -> Callable[[str], str]:
    """A keyed BLAKE2b pseudonym of identifiers (random per-process key by default).

    The same value always gets the same token, and no one without the key can test a
    guessed value against a record. ``person`` keeps each kind of identifier (sessions,
    conversations, the scrub policy's values) in its own space, even under one key.
    """
    key = key if key is not None else secrets.token_bytes(32)
    hex_digest = keyed_hex_digest(key[:64], person, 16)

    # Identifiers repeat (an agent's calls come in sessions): cache the recent ones.
    @functools.lru_cache(maxsize=4096)
    def pseudonymize(value: str) -> str:
        return prefix + hex_digest(value.encode("utf-8"))

    return pseudonymize


def keyed_session_hasher(key: bytes | None = None) -> SessionHasher:
    """Session ids in records: ``s_`` + a keyed pseudonym."""
    return keyed_pseudonym(key, b"loopguard.sess", "s_")
