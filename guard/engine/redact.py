"""The scrub policy: find what must not leave (secrets, personal data) and replace it.

``Redactor.redact`` walks any JSON value; ``Redactor.redact_text`` scrubs free text.
Replacements are placeholders, never the value:

* mask          -> ``[EMAIL]``, ``[CARD]``, ``[REDACTED]`` (every value of a kind alike)
* pseudonymize  -> ``[ORDER:3f9a0c1b2d4e5f60]``: keyed BLAKE2b (8 bytes, hex) of the value,
                   so two orders stay two orders and nobody without the key can test a guess.

Redaction is idempotent: a placeholder is matched first and left as it is, so
``redact(redact(x)) == redact(x)`` and a pseudonym is never hashed twice.

Numbers leave the walk in canonical form (see ``guard.engine.canonical``): an integral float
such as ``1.0`` becomes ``1`` (JSON has one number type, and clients disagree on how
they print it); other floats become ``JSONFloat``, a float that every encoder prints
the same way.
"""

from __future__ import annotations

import hashlib
import os
import re
from bisect import bisect_left
from collections.abc import Callable
from itertools import accumulate
from typing import Any, Literal

from guard.engine.canonical import JSONFloat, canonical_json
from guard.engine.config import ConfigError, RedactionConfig
from guard.engine.pseudonym import keyed_hex_digest

MASK_SECRET = "[REDACTED]"
_UNSET: Any = object()
_CARD_MIN = 10**12  # integers below 13 digits cannot be card numbers
_CACHE_SIZE = 8192  # entries per cache; cleared when full (cheaper than LRU bookkeeping)
# A placeholder this module produces; matched first so it is never re-redacted.
PLACEHOLDER = r"\[[A-Z][A-Z0-9_]*(?::[0-9a-f]{16})?\]"
_PLACEHOLDER_RE = re.compile(PLACEHOLDER)

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# Built-in detectors for text, most specific first (at one position the first
# alternative wins). Each starts with a consuming character (lookbehinds come after
# it), which lets the regex engine skip quickly to where a match could start.
TEXT_BUILTINS: tuple[tuple[str, str], ...] = (
    ("JWT", r"eyJ(?<![\w-]eyJ)[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
    ("BEARER", r"[Bb][Ee][Aa][Rr][Ee][Rr]\s+[A-Za-z0-9._~+/=-]{8,}"),
    (
        "API_KEY",
        r"sk-(?<![A-Za-z0-9]sk-)[A-Za-z0-9_-]{16,}|AKIA(?<![A-Za-z0-9]AKIA)[0-9A-Z]{16}"
        r"|gh[pousr]_(?<![A-Za-z0-9]gh._)[A-Za-z0-9]{20,}"
        r"|xox[abprs]-(?<![A-Za-z0-9]xox.-)[A-Za-z0-9-]{10,}",
    ),
    # Local part: RFC 5322 atext; TLD: letters or an IDN (xn--...).
    (
        "EMAIL",
        r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
        r"\.(?:[A-Za-z]{2,}|xn--[A-Za-z0-9-]+)",
    ),
)
# Built-in detectors for numbers: run only inside runs of digits and separators.
NUMBER_BUILTINS: tuple[tuple[str, str], ...] = (
    # 13-19 digits, single spaces/dashes allowed; Luhn-checked in the callback.
    ("CARD", r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])"),
    ("IPV4", rf"(?<![0-9.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\.?[0-9])"),
    # Phones need a leading + or separators: a bare 10-digit number is more often an id
    # or a timestamp than a phone, and masking those would merge distinct calls.
    (
        "PHONE",
        r"(?<![\w+])(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{2,4}\)[ .-]?|[0-9]{2,4}[ .-])"
        r"[0-9]{3,4}[ .-][0-9]{3,4}(?![0-9])"
        r"|(?<![\w+])\+[0-9]{8,15}(?![0-9])",
    ),
)
BUILTINS = TEXT_BUILTINS + NUMBER_BUILTINS
_PHONE_RE = re.compile(dict(BUILTINS)["PHONE"])
_NUMBER_RE = re.compile("|".join(f"(?P<{kind}>{pattern})" for kind, pattern in NUMBER_BUILTINS))
# Where a number detector could match: a run of digits and separators (7+ chars).
# (No optional leading "+" or "(" here: it would stop the engine from skipping ahead
# to digits; the run is widened by one character afterwards instead.)
_NUMBER_RUN = re.compile(r"[0-9][0-9 ().+-]{5,}[0-9]")
# The longest run the number detectors look into: a card is 13-19 digits with single
# separators (37 chars), a phone shorter; two or three of them side by side still fit.
# A longer run of digits and separators ("1 1 1 ...", a numeric dump) is not searched
# (searching it costs Python work per digit group) but replaced whole, as ``[NUMBERS]``
# (or its keyed pseudonym where values must stay distinct): a card hidden in a dump
# never passes, and the run is found by one regex match in C, so the scan stays linear
# with a small constant whatever the input.
MAX_NUMBER_RUN = 96
_DIGIT = re.compile(r"[0-9]")
_MIN_SECRET = 6  # the shortest built-in match ("a@b.io"); shorter strings skip the scan

# Pass-1 trigger bits: each detector runs only when a cheap substring test says it could.
_P, _KV, _JWT, _BEARER, _API_KEY, _EMAIL = 1, 2, 4, 8, 16, 32


def normalize_key(key: str) -> str:
    """``X-Api-Key`` and ``x_api_key`` name the same thing."""
    return key.lower().replace("-", "_")


_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")  # 2d, digits summed


def luhn_ok(digits: str) -> bool:
    """The Luhn check on a string of ASCII digits, in C: every second digit from the
    right doubled (by a translation table), then all summed (called per candidate
    span of a scan, so its constant matters)."""
    data = digits.encode()
    total = sum(data[-1::-2]) + sum(data[-2::-2].translate(_DOUBLED)) - 48 * len(data)
    return total % 10 == 0


def load_key(env_var: str) -> bytes:
    """The pseudonym key from the environment, else a random key for this process."""
    raw = os.environ.get(env_var, "")
    if not raw:
        return os.urandom(32)
    key = raw.encode()
    # BLAKE2b keys are at most 64 bytes; longer secrets are condensed, not truncated.
    return key if len(key) <= 64 else hashlib.blake2b(key).digest()


# Personal values that tell calls apart: the hashing redactor pseudonymizes them even
# where the display masks them, so two customers are two calls. Credentials stay
# masked in the hash too: a token that rotates must not make a loop look new.
DISTINGUISHING = frozenset({"EMAIL", "CARD", "PHONE", "IPV4"})


class Redactor:
    """``hashing``: the redactor parameters are fingerprinted through. It pseudonymizes
    the ``DISTINGUISHING`` kinds and every user rule whatever their display mode (keyed:
    nobody without the key can test a guess), so masking merges nothing for the stall
    rules; what is displayed comes from the display redactor."""

    def __init__(
        self, cfg: RedactionConfig | None = None, key: bytes | None = None, *, hashing: bool = False
    ) -> None:
        self.cfg = cfg or RedactionConfig()
        self._hashing = hashing
        self.policy_id = self.cfg.policy_id
        self._key = key if key is not None else load_key(self.cfg.pseudonym_key_env)
        secret = {normalize_key(k) for k in self.cfg.secret_keys}
        # normalized key -> replacement function for any value under it
        self._key_rules: dict[str, Callable[[Any], str]] = {}
        for rule in self.cfg.rules:
            for k in rule.keys:
                self._key_rules[normalize_key(k)] = self._replacer(
                    rule.name.upper(), "pseudonymize" if hashing else rule.mode
                )
        for k in secret:
            self._key_rules[k] = _mask_secret
        # Strings are immutable and repeat a lot in agent traffic (the same call again
        # and again): caching the scrub of short strings is sound and cheap.
        self._str_cache: dict[str, str] = {}
        # key -> its rule, or False for keys without one (one truthiness test per item)
        self._key_cache: dict[Any, Callable[[Any], str] | Literal[False]] = {}
        # The keys known to have no rule (most keys): one membership test per item.
        self._plain_keys: set[Any] = set()
        self._build_regex(sorted(secret, key=len, reverse=True))

    # -- building ---------------------------------------------------------------

    def _build_regex(self, secret_keys: list[str]) -> None:
        self._groups: dict[str, Callable[[str], str]] = {}
        self._user_parts: list[str] = []
        for i, rule in enumerate(self.cfg.rules):
            if rule.pattern is None:
                continue
            # User patterns join one alternation: their own groups must not clash with
            # it, and numbered backreferences would point at the wrong group.
            if re.search(r"\\[1-9]|\(\?P=|\(\?P<", rule.pattern):
                raise ConfigError(
                    f"redaction.rules.{i}.pattern: named groups and backreferences are not "
                    f"supported (got {rule.pattern!r})"
                )
            name = f"U{len(self._user_parts)}"
            self._user_parts.append(f"(?P<{name}>{rule.pattern})")
            mode = "pseudonymize" if self._hashing else rule.mode
            self._groups[name] = self._replacer(rule.name.upper(), mode)
        self._kv_part = ""
        self._kv_triggers: tuple[str, ...] = ()
        if secret_keys:
            # "password=hunter2", '"token": "abc"', "Authorization: Bearer abc" in free text.
            names = "|".join(re.escape(k).replace("_", "[_-]?") for k in secret_keys)
            self._kv_part = (
                rf"(?P<KV>(?i:{names})(?:\"?\s*[:=]\s*\"?))"
                r"(?P<KVV>(?:(?i:bearer|basic)\s+)?[^\s\"'&,;]+)"
            )
            squashed = {k.replace("_", "") for k in secret_keys}
            # A name containing another name needs no trigger of its own.
            self._kv_triggers = tuple(
                sorted(k for k in squashed if not any(o != k and o in k for o in squashed))
            )
        self._builtins = self.cfg.builtins
        if self._builtins:
            for kind, _pattern in BUILTINS:
                mode = self.cfg.builtin_mode
                if self._hashing and kind in DISTINGUISHING:
                    mode = "pseudonymize"
                self._groups[kind] = self._replacer(kind, mode)
        self._card = self._groups.get("CARD")
        self._phone = self._groups.get("PHONE")
        if self._builtins:
            mode = "pseudonymize" if self._hashing else self.cfg.builtin_mode
            self._number_dump = self._replacer("NUMBERS", mode)
        self._pass1: dict[int, re.Pattern[str] | None] = {}

    def _pass1_regex(self, bits: int) -> re.Pattern[str] | None:
        """The combined regex for the detectors a string triggered (compiled once)."""
        regex = self._pass1.get(bits, _UNSET)
        if regex is not _UNSET:
            return regex
        parts = [f"(?P<P>{PLACEHOLDER})"] if bits & _P else []
        parts += self._user_parts
        if bits & _KV:
            parts.append(self._kv_part)
        bits_of = (_JWT, _BEARER, _API_KEY, _EMAIL)
        for bit, (kind, pattern) in zip(bits_of, TEXT_BUILTINS, strict=True):
            if bits & bit:
                parts.append(f"(?P<{kind}>{pattern})")
        detectors = parts[1:] if bits & _P else parts
        regex = re.compile("|".join(parts)) if detectors else None
        self._pass1[bits] = regex
        return regex

    def _replacer(self, kind: str, mode: str) -> Callable[[Any], str]:
        if mode == "mask":
            placeholder = f"[{kind}]"
            return lambda _value: placeholder
        hex_digest = keyed_hex_digest(self._key, kind.encode()[:16], 8)

        def pseudonym(value: Any) -> str:
            text = value if isinstance(value, str) else _compact(value)
            if kind == "EMAIL":
                text = text.lower()
            return f"[{kind}:{hex_digest(text.encode('utf-8', 'surrogatepass'))}]"

        return pseudonym

    # -- walking ----------------------------------------------------------------
    # The walk is the hot path of every guarded call: exact type checks, plain dict
    # caches (strings and key names repeat call after call), no per-node method calls
    # for leaves.

    def redact(self, value: Any) -> Any:
        """A redacted copy of a JSON value (dicts, lists, strings, numbers, bools, null)."""
        t = type(value)
        if t is dict:
            return self._dict(value)
        if t is str:
            return self.scrub(value)
        if t is list:
            return self._list(value)
        return self._other(value)

    def _list(self, value: list[Any]) -> list[Any]:
        strings = self._str_cache
        # out.append(...), not a local bound method: 3.11 specializes the call, and the
        # bound method would be one more object per list.
        out: list[Any] = []
        for v in value:
            t = type(v)
            if t is str:
                # A subscript, not .get(): a hit (nearly every string) is cheaper, and
                # a miss costs one scrub anyway.
                try:
                    out.append(strings[v])
                except KeyError:
                    out.append(self.scrub(v))
            elif t is dict:
                out.append(self._dict(v))
            elif t is bool or v is None or (t is int and -_CARD_MIN < v < _CARD_MIN):
                out.append(v)
            else:
                out.append(self.redact(v))
        return out

    def _dict(self, value: dict[Any, Any]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        plain = self._plain_keys
        strings = self._str_cache
        for k, v in value.items():
            if k not in plain:
                rule = self._key_cache.get(k)
                if rule is None:
                    rule = self._key_rule(k)
                if rule:
                    out[k] = v if type(v) is str and _PLACEHOLDER_RE.fullmatch(v) else rule(v)
                    continue
            t = type(v)
            if t is str:
                try:
                    out[k] = strings[v]
                except KeyError:
                    out[k] = self.scrub(v)
            elif t is dict:
                out[k] = self._dict(v)
            elif t is bool or v is None or (t is int and -_CARD_MIN < v < _CARD_MIN):
                out[k] = v
            elif t is list:
                out[k] = self._list(v)
            else:
                out[k] = self._other(v)
        return out

    def _other(self, value: Any) -> Any:
        t = type(value)
        if t is int:
            if self._card and (value >= _CARD_MIN or value <= -_CARD_MIN) and value < 10**19:
                digits = str(abs(value))
                if luhn_ok(digits):
                    return self._card(digits)
            return value
        if t is float:
            # An integral float is that integer (and then a card check like any int).
            return self._other(int(value)) if value.is_integer() else JSONFloat(value)
        if t is JSONFloat:
            return value
        if t is bool or value is None:
            return value
        # Subclasses and tuples (built in code, not parsed JSON).
        if isinstance(value, str):
            return self.scrub(str(value))
        if isinstance(value, dict):
            return self._dict(dict(value))
        if isinstance(value, list | tuple):
            return [self.redact(v) for v in value]
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            return self._other(int(value))
        if isinstance(value, float):
            return self._other(float(value))
        return value

    def scrub(self, text: str) -> str:
        """A string value redacted (cached: the same strings come back call after call)."""
        cached = self._str_cache.get(text)
        if cached is not None:
            return cached
        result = self._scrub(text)
        if len(text) <= 512:
            if len(self._str_cache) >= _CACHE_SIZE:
                self._str_cache.clear()
            self._str_cache[text] = result
        return result

    def redact_text(self, text: str) -> str:
        """Scrub free text (captured content, log lines)."""
        return self._scrub(text)

    def _key_rule(self, key: Any) -> Callable[[Any], str] | Literal[False]:
        rule = self._key_rules.get(normalize_key(key)) if isinstance(key, str) else None
        if len(self._key_cache) >= _CACHE_SIZE:
            self._key_cache.clear()
            self._plain_keys.clear()
        self._key_cache[key] = rule or False
        if not rule:
            self._plain_keys.add(key)
        return rule or False

    def _scrub(self, text: str) -> str:
        # Two passes, each run only where a cheap substring test says it could match:
        # (1) placeholders, user rules, key=value secrets, tokens, keys, emails;
        # (2) numbers (cards, IPs, phones) inside runs of digits, stepping over the
        # placeholders pass 1 left.
        if not self._user_parts and len(text) < _MIN_SECRET:
            return text
        bits = _P if "[" in text else 0
        if self._kv_triggers and ("=" in text or ":" in text):
            squashed = text.lower().replace("_", "").replace("-", "")
            if any(k in squashed for k in self._kv_triggers):
                bits |= _KV
        if self._builtins:
            if "eyJ" in text:
                bits |= _JWT
            if "earer" in text or "EARER" in text:
                bits |= _BEARER
            if "sk-" in text or "AKIA" in text or "gh" in text or "xox" in text:
                bits |= _API_KEY
            if "@" in text:
                bits |= _EMAIL
        if (bits & ~_P) or self._user_parts:
            regex = self._pass1_regex(bits)
            if regex is not None:
                text = regex.sub(self._on_match, text)
        if self._builtins and _DIGIT.search(text):
            text = self._numbers(text)
        return text

    def _numbers(self, text: str) -> str:
        out: list[str] = []
        last = 0
        # Placeholders pass 1 left (a pseudonym's digest has digits), walked alongside
        # the runs (both in text order): a run starting inside one is skipped.
        placeholders = _PLACEHOLDER_RE.finditer(text) if "[" in text else None
        p_start = p_end = -1
        number_re = _NUMBER_RE
        for run in _NUMBER_RUN.finditer(text):
            start, end = run.span()
            if placeholders is not None:
                while p_end <= start:
                    p = next(placeholders, None)
                    if p is None:
                        placeholders = None
                        break
                    p_start, p_end = p.span()
                if p_start <= start < p_end:
                    continue  # digits of a pseudonym's digest
            if end - start > MAX_NUMBER_RUN:
                out.append(text[last:start])
                out.append(self._number_dump(text[start:end]))
                last = end
                continue
            if start > last and text[start - 1] in "+(":
                start -= 1
            for m in number_re.finditer(text, start, end):
                out.append(text[last : m.start()])
                out.append(self._on_match(m))
                last = m.end()
        if not out:
            return text
        out.append(text[last:])
        return "".join(out)

    def _on_match(self, m: re.Match[str]) -> str:
        kind = m.lastgroup
        if kind == "P":
            return m.group()
        if kind == "KVV":
            return m.group("KV") + MASK_SECRET
        if kind == "CARD":
            return _cards_in(m.group(), self._card, self._phone)  # type: ignore[arg-type]
        return self._groups[kind](m.group())  # type: ignore[index]


def _mask_secret(_value: Any) -> str:
    return MASK_SECRET


def _compact(value: Any) -> str:
    return canonical_json(value).decode("utf-8", "surrogatepass")


_DIGIT_GROUP = re.compile(r"\d+")


def _cards_in(run: str, card: Callable[[str], str], phone: Callable[[str], str]) -> str:
    """A run of 13-19 digits (with single separators): a card if any span of whole
    digit groups in it passes Luhn, else perhaps phone numbers.

    Spans follow group boundaries: trying every digit window would call one random
    number in ten a card. When a card is found the whole run goes, so a neighbour's
    digits can never be mistaken for the card's edge and leave part of it behind.
    """
    groups = _DIGIT_GROUP.findall(run)
    digits = "".join(groups)
    # Luhn of any span in O(1) from prefix sums, built in C: from the right the last
    # digit is summed plain, the one before doubled, and so on, so one prefix sum per
    # parity of the span's last digit (ASCII codes: 48 per digit comes off after).
    data = digits.encode()
    doubled = data.translate(_DOUBLED)
    last_even = bytearray(data)
    last_even[1::2] = doubled[1::2]
    last_odd = bytearray(data)
    last_odd[0::2] = doubled[0::2]
    sums = (list(accumulate(last_even, initial=0)), list(accumulate(last_odd, initial=0)))
    starts = list(accumulate(map(len, groups), initial=0))
    n = len(starts)
    last = starts[-1]
    for i in range(n - 1):
        a = starts[i]
        if last - a < 13:
            break
        # The spans from group i of 13-19 digits: the first end found by bisection.
        for j in range(bisect_left(starts, a + 13, i + 1), n):
            b = starts[j]
            if b - a > 19:
                break
            total = sums[(b - 1) & 1]
            if (total[b] - total[a] - 48 * (b - a)) % 10 == 0:
                return card(digits[a:b])
    return _PHONE_RE.sub(lambda m: phone(m.group()), run)


__all__ = ["MASK_SECRET", "PLACEHOLDER", "Redactor", "load_key", "luhn_ok", "normalize_key"]
