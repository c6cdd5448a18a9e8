"""The monitoring policy (TOML) and its rate cards, validated with pydantic.

The file's shape (issue 11)::

    [monitor]
    policy_id = "delivery-grounding-slo-v1"
    window = "5m"
    max_unsafe_serves = 0          # invariant: PAGE when exceeded
    max_p95_ttft_ms = 500          # budget: WARN when exceeded
    max_window_cost_usd = 0.002    # budget: WARN when exceeded
    first_check = "Compare serving-gate template with tracking-answerer-v1."

    [[rate_cards]]
    version = "internal-fixture-2026-05-27"
    models = ["*"]
    input_per_million = 1.00
    cached_input_per_million = 0.10
    output_per_million = 5.00

No provider price is built in: without a rate card, cost is "unpriced". A model is
priced by the first card (in file order) with a glob (``fnmatch`` syntax, case
sensitive) matching its name. The glob is translated once into a regular expression
that both Python (live) and DuckDB (batch) evaluate, so both pick the same card.
"""

from __future__ import annotations

import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the bad key."""


def parse_duration(text: str) -> timedelta:
    """``"5m"``, ``"30s"``, ``"1h"``, ``"1d"``, ``"250ms"`` -> timedelta (positive)."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h, 1d)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return timedelta(seconds=seconds)


def glob_regex(pattern: str) -> str:
    """An ``fnmatch`` glob as a regular expression both ``re`` and RE2 (DuckDB) read alike.

    ``*`` any run, ``?`` one character, ``[abc]`` / ``[!abc]`` a class; everything else
    literal. Matched against the whole name (``re.fullmatch`` / ``regexp_full_match``).
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(r"\[")
                continue
            body = pattern[i:j]
            i = j + 1
            negate = body.startswith("!")
            body = body[1:] if negate else body
            body = body.replace("\\", r"\\").replace("^", r"\^").replace("[", r"\[")
            out.append(f"[{'^' if negate else ''}{body}]")
        elif c.isalnum() or c == "_" or ord(c) > 127:
            out.append(c)
        else:
            out.append("\\" + c if c.isascii() and not c.isspace() else f"[{c}]")
    return "(?s)" + "".join(out)


# The regex of the glob "*": every name.
ANY_NAME = "(?s).*"


class RateCard(BaseModel):
    """Prices per million tokens for the models matching ``models`` (globs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    input_per_million: float = Field(ge=0)
    cached_input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)

    @property
    def regexes(self) -> list[str]:
        return [glob_regex(p) for p in self.models]

    def matches(self, model: str | None) -> bool:
        return model is not None and any(re.fullmatch(rx, model) for rx in self.regexes)

    def cost(self, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> float:
        """USD: uncached input, cached input and output each at their own rate.

        ``input_tokens`` includes the cached ones (as records count them).
        """
        return (
            (input_tokens - cached_input_tokens) * self.input_per_million
            + cached_input_tokens * self.cached_input_per_million
            + output_tokens * self.output_per_million
        ) / 1_000_000


class Policy(BaseModel):
    """One ``[monitor]`` section plus its ``[[rate_cards]]``. ``None`` thresholds: no rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy_id: str = Field(min_length=1)
    window: str = "5m"
    max_unsafe_serves: int | None = Field(default=0, ge=0)
    max_p95_ttft_ms: float | None = Field(default=None, gt=0)
    max_window_cost_usd: float | None = Field(default=None, ge=0)
    first_check: str = ""
    rate_cards: list[RateCard] = Field(default_factory=list)

    @field_validator("window")
    @classmethod
    def _window(cls, value: str) -> str:
        parse_duration(value)
        return value

    @property
    def window_delta(self) -> timedelta:
        return parse_duration(self.window)

    @property
    def rate_card_version(self) -> str | None:
        """The version(s) every cost figure is printed with (``a+b`` for several cards)."""
        versions = list(dict.fromkeys(card.version for card in self.rate_cards))
        return "+".join(versions) if versions else None

    def card_for(self, model: str | None) -> RateCard | None:
        """The first card (file order) whose glob matches ``model``; None: unpriced."""
        for card in self.rate_cards:
            if card.matches(model):
                return card
        return None


# Without a policy file: the figures, no rules and no prices.
NO_POLICY = Policy(policy_id="none", max_unsafe_serves=None)


def policy_from_mapping(data: dict[str, Any], source: str = "<policy>") -> Policy:
    """Validate a parsed TOML document; errors name ``source`` and the dotted key."""
    unknown = set(data) - {"monitor", "rate_cards"}
    if unknown:
        raise PolicyError(
            f"{source}: unknown section(s) {sorted(unknown)} (expected monitor, rate_cards)"
        )
    monitor = data.get("monitor")
    if not isinstance(monitor, dict):
        raise PolicyError(f"{source}: a [monitor] table with policy_id is required")
    try:
        return Policy.model_validate({**monitor, "rate_cards": data.get("rate_cards", [])})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            if loc and loc[0] == "rate_cards":
                key = f"rate_cards[{loc[1]}]." + ".".join(loc[2:]) if len(loc) > 1 else "rate_cards"
            else:
                key = "monitor." + ".".join(loc)
            problems.append(f"{key.rstrip('.')}: {err['msg']}")
        raise PolicyError(f"{source}: " + "; ".join(problems)) from None


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy TOML file (``PolicyError`` with the bad key)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML ({exc})") from None
    return policy_from_mapping(data, str(path))
