"""One validated configuration, loaded from TOML or built in code.

Every section has defaults, so ``Config()`` is a working guard with no file.
Unknown keys are errors (a typo must not silently disable a rule), and every
error names the dotted key and what was expected.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from guard.engine.profiles import DEFAULT_PROFILE_NAMES, ProfileName

Mode = Literal["enforce", "observe", "off"]
RedactionMode = Literal["mask", "pseudonymize"]
AdapterName = Literal["http-tool", "mcp", "openai", "anthropic"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolOverride(_Section):
    """Per-tool limits under ``[loop.tools.NAME]``; unset fields inherit ``[loop]``."""

    mode: Mode | None = None
    # A named preset (guard.engine.profiles): its limits and what counts as progress.
    # Unset: the profile the tool's name gives it (``[loop] profile_names``), if any.
    profile: ProfileName | None = None
    max_repeats: int | None = Field(default=None, ge=1)
    max_identical_errors: int | None = Field(default=None, ge=1)
    max_identical_calls: int | None = Field(default=None, ge=1)
    max_error_streak: int | None = Field(default=None, ge=1)
    # RFC 6901 pointer into the tool's JSON outcome whose value is the progress marker.
    progress_pointer: str | None = None

    @field_validator("progress_pointer")
    @classmethod
    def _pointer_syntax(cls, value: str | None) -> str | None:
        if value is not None and value != "" and not value.startswith("/"):
            raise ValueError("a JSON pointer starts with '/' (RFC 6901), e.g. '/status'")
        return value


# Keys dropped from outcomes before hashing: values that are fresh on every call of
# the same thing, so a loop would look like progress. Timing (when it ran, how long
# it took), ids the callee mints per call (request, trace, message, run, receipt,
# process) and the shell's working directory. Matched case-insensitively. Not ``id``
# or ``status``: a record's id and a job's status are what distinct results differ in.
DEFAULT_VOLATILE_KEYS = (
    # When and how long.
    "timestamp",
    "time",
    "ts",
    "date",
    "created",
    "created_at",
    "createdAt",
    "updated_at",
    "updatedAt",
    "started_at",
    "startedAt",
    "finished_at",
    "finishedAt",
    "completed_at",
    "completedAt",
    "elapsed",
    "elapsed_ms",
    "elapsedMs",
    "duration",
    "duration_ms",
    "durationMs",
    "latency_ms",
    "took",
    # Ids minted per call (a send returns a new message id for the same message).
    "request_id",
    "requestId",
    "trace_id",
    "traceId",
    "span_id",
    "message_id",
    "messageId",
    "run_id",
    "runId",
    "receipt",
    "receipt_id",
    "session_id",
    "sessionId",
    "event_id",
    "eventId",
    "etag",
    "nonce",
    # A process: its id and where it ran.
    "pid",
    "cwd",
)
DEFAULT_VOLATILE_PATTERNS = (
    # ISO 8601 timestamps, with or without time and zone.
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?",
    # UUIDs.
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    # Long hex ids (request ids, digests).
    r"\b[0-9a-fA-F]{16,}\b",
    # Short ids with a prefix that names a per-call thing (run_3, om_17, msg_01ab,
    # call_x9, toolu_..): only these prefixes, so file_1 vs file_2 or step_3 vs step_4
    # (a counter that is progress) stay apart.
    r"\b(?:run|msg|om|call|req|evt|resp|toolu|sess|exec|proc|rcpt|txn)_[A-Za-z0-9]+\b",
    # A process id in text: "pid 1003", "PID: 1003", "pid=1003".
    r"\b(?i:pid)\b[ :=#]*\d+",
    # The shell's own line counter in its error prefix ("/bin/bash: line 13008: cd: ..",
    # dash's "sh: 1: .."): it rises with every command the shell has run.
    r"\b(?:ba|z|da|k)?sh: (?:line )?\d+:",
    # Fractional durations ("in 0.52s", "took 12.3 ms", "real 0m0.012s"); whole numbers
    # ("eta 30s") may be a countdown, which is progress, and are kept.
    r"\b(?:\d+m)?\d+\.\d+ ?(?:ms|s|sec|seconds)\b",
    # Memory addresses in reprs ("<Foo object at 0x7f3a2c1b9d60>").
    r"\b0x[0-9a-fA-F]{6,}\b",
    # Unix epoch seconds or milliseconds (Slack's "1700000000.123456").
    r"\b1[5-9]\d{8}(?:\d{3})?(?:\.\d+)?\b",
)


class LoopConfig(_Section):
    mode: Mode = "enforce"
    window: int = Field(default=64, ge=2, le=4096)
    max_repeats: int = Field(default=3, ge=1)
    max_identical_errors: int = Field(default=3, ge=1)
    max_identical_calls: int = Field(default=30, ge=1)
    # error streak: the same tool failing with the same error text this many times in
    # a row, whatever the arguments, with nothing new in between.
    max_error_streak: int = Field(default=5, ge=1)
    # Optional rules, 0 = off. no progress: the session's last N calls brought nothing
    # new (session-wide; must be below ``window``). text loop (model routes): the model
    # gave the same text N turns running without calling a tool.
    no_progress_window: int = Field(default=0, ge=0)
    max_text_repeats: int = Field(default=0, ge=0)
    # How long an admitted call counts as in flight without an outcome (its
    # reservation): a little over server.total_timeout, the longest a call can take.
    in_flight_seconds: float = Field(default=630.0, gt=0)
    volatile_keys: tuple[str, ...] = DEFAULT_VOLATILE_KEYS
    volatile_patterns: tuple[str, ...] = DEFAULT_VOLATILE_PATTERNS
    tools: dict[str, ToolOverride] = Field(default_factory=dict)
    # Profile -> words of a tool's name that give a tool without a configured profile
    # that profile (first match in this order wins); {} turns matching by name off.
    profile_names: dict[ProfileName, tuple[str, ...]] = Field(
        default_factory=lambda: dict(DEFAULT_PROFILE_NAMES)
    )

    @model_validator(mode="after")
    def _no_progress_fits(self) -> LoopConfig:
        if self.no_progress_window >= self.window:
            raise ValueError(
                f"no_progress_window ({self.no_progress_window}) must be below window "
                f"({self.window}): the window holds the calls it counts"
            )
        return self

    @field_validator("volatile_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        _check_regexes(patterns)
        return patterns


class RedactionRule(_Section):
    """A user rule: values matching ``pattern`` (or any value under one of ``keys``)."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    pattern: str | None = None
    keys: tuple[str, ...] = ()
    mode: RedactionMode = "pseudonymize"

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            _check_regexes((pattern,))
        return pattern


DEFAULT_SECRET_KEYS = (
    "password",
    "passwd",
    "token",
    "access_token",
    "refresh_token",
    "api_key",
    "apikey",
    "authorization",
    "secret",
    "client_secret",
    "cookie",
    "set-cookie",
    "x-api-key",
    "private_key",
)


class RedactionConfig(_Section):
    policy: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]+$")
    version: int = Field(default=1, ge=1)
    # Built-in detectors (emails, phones, cards, tokens, keys, JWTs, IPv4).
    builtins: bool = True
    builtin_mode: RedactionMode = "mask"
    secret_keys: tuple[str, ...] = DEFAULT_SECRET_KEYS
    rules: tuple[RedactionRule, ...] = ()
    # Env var holding the pseudonym key; without it a random per-process key is used
    # (pseudonyms then differ across restarts and replicas: set it in production).
    pseudonym_key_env: str = "LOOPGUARD_PSEUDONYM_KEY"

    @property
    def policy_id(self) -> str:
        """The versioned policy name recorded with every fingerprint, e.g. ``default-v1``."""
        return f"{self.policy}-v{self.version}"


class StoreConfig(_Section):
    backend: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "loopguard:"
    max_sessions: int = Field(default=100_000, ge=1)
    ttl_seconds: float = Field(default=3600.0, gt=0)
    # Redis: each operation waits at most this long; after breaker_failures
    # consecutive failures or timeouts the store is not asked (calls are served,
    # stage "store") until a probe after breaker_backoff s (doubling, to 30 s) succeeds.
    timeout_seconds: float = Field(default=0.5, gt=0)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_backoff_seconds: float = Field(default=1.0, gt=0)


class SessionConfig(_Section):
    # Request headers naming the session, in order; the first present wins.
    headers: tuple[str, ...] = ("x-loopguard-session", "mcp-session-id")
    # With none of them: "none" (served, untracked, a warning naming the route) or
    # "credential" (a keyed pseudonym of the Authorization / x-api-key header: one agent
    # per credential).
    fallback: Literal["none", "credential"] = "none"


class ServerConfig(_Section):
    listen: str = "127.0.0.1:8787"
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    # Bodies up to this size are parsed, redacted and hashed; a larger one is one call
    # standing for its raw bytes' hash (recorded as not parsed).
    max_parse_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    total_timeout: float = Field(default=600.0, gt=0)
    # Malformed JSON on a guarded route: forward it marked (false) or answer 400 (true).
    reject_malformed_json: bool = False
    max_connections: int = Field(default=512, ge=1)
    # Client limits. A connection whose request head is not complete this long after
    # it opened (or its last response ended) is closed; idle keep-alive as uvicorn's.
    head_timeout: float = Field(default=10.0, gt=0)
    # A request head (request line and headers) larger than this: 431 and the
    # connection closed (nginx's default buffers hold 32 KiB too).
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    keep_alive_timeout: float = Field(default=5.0, gt=0)
    # A request body that sends nothing for this long between reads: 408.
    body_read_timeout: float = Field(default=30.0, gt=0)
    # Request body bytes read and admitted at once (per worker); past it 503 +
    # Retry-After (overload).
    max_bytes_in_flight: int = Field(default=128 * 1024 * 1024, ge=1)
    # Connections and requests at once (per worker); past it 503 problem+json with
    # Retry-After (overload).
    limit_concurrency: int = Field(default=1000, ge=1)
    # Processes ``loopguard serve`` runs (one event loop each) on one listening socket.
    # Above 1 they must share sessions: store.backend = "redis".
    workers: int = Field(default=1, ge=1, le=64)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return _check_listen(value, "127.0.0.1:8787")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class AdminConfig(_Section):
    # The admin listener of ``loopguard serve`` (GET /metrics, /status, /healthz):
    # "host:port", off when unset. Never the proxy's port; one process only.
    listen: str | None = None
    # A monitoring policy TOML (``[monitor]`` + ``[[rate_cards]]``) for /status's
    # findings; without one /status shows the window's figures and no findings.
    # Relative to the config file when loaded from one.
    policy: str | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        return None if value is None else _check_listen(value, "127.0.0.1:9464")

    @property
    def host(self) -> str:
        return (self.listen or "").rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int((self.listen or ":0").rpartition(":")[2])


class TelemetryConfig(_Section):
    exporter: Literal["none", "console", "otlp"] = "none"
    # OTLP/HTTP traces endpoint; unset means the OTEL_EXPORTER_OTLP_* variables decide.
    otlp_endpoint: str | None = None
    service_name: str | None = None
    # Off by default: the only switch that lets (redacted) content onto spans.
    capture_content: bool = False
    # Durable records: a JSONL path, "-" for stdout, "" for none.
    records: str = "loopguard-records.jsonl"
    # Namespace for the app's own decision attributes taken from x-loopguard-app-* headers.
    app_namespace: str = "app."
    # At shutdown, the most time spent flushing spans, metrics and records (all three
    # together): what a collector has not taken by then is dropped.
    shutdown_timeout_seconds: float = Field(default=5.0, gt=0, le=300)


class RouteConfig(_Section):
    """A configured route: a path prefix and the upstream it forwards to. Not
    ``calls.Route``, which is what loopguard did with one call."""

    prefix: str = Field(pattern=r"^/")
    upstream: str = Field(pattern=r"^https?://")
    adapter: AdapterName
    # http-tool: which path segment after the prefix names the tool (0 = first).
    tool_segment: int = Field(default=0, ge=0)
    # Model routes: answer a continued stall with a completion ("answer") or 422 ("error").
    on_stop: Literal["answer", "error"] = "answer"
    # Model routes: first answer a stall with a nudge message before stopping.
    nudge: bool = True
    # OpenAI Chat Completions: ask for usage on streams and hide it from clients that did not.
    inject_stream_usage: bool = False
    # The stop answer's text on every route (model routes: it becomes the end user's
    # answer; MCP: the isError text; HTTP tools: the 422 problem's detail), a template
    # with {tool}, {n} (times the tool ran) and {rule}; None: loopguard's text for the model.
    stop_message: str | None = None

    @field_validator("prefix")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/") or "/"

    @field_validator("upstream")
    @classmethod
    def _upstream_base(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("stop_message")
    @classmethod
    def _stop_template(cls, value: str | None) -> str | None:
        if value is not None:
            try:  # a template that cannot be filled fails at start-up, not at the stop
                value.format(tool="t", n=3, rule="r")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"placeholders are {{tool}}, {{n}}, {{rule}}: {exc}") from exc
        return value


class Config(_Section):
    server: ServerConfig = ServerConfig()
    session: SessionConfig = SessionConfig()
    loop: LoopConfig = LoopConfig()
    redaction: RedactionConfig = RedactionConfig()
    store: StoreConfig = StoreConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    admin: AdminConfig = AdminConfig()
    routes: tuple[RouteConfig, ...] = ()

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "<config>") -> Config:
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source)) from None
        if config.server.workers > 1 and config.store.backend != "redis":
            # Each worker would keep its own sessions: a loop spread over them goes unseen.
            raise ConfigError(
                f"{source}: invalid configuration\n  server.workers: {config.server.workers} "
                'worker processes need a shared session store: set store.backend = "redis"'
            )
        _check_admin(config, source)
        return config

    @classmethod
    def load(cls, path: str | Path | None) -> Config:
        """Load a TOML file; ``None`` gives the embedded defaults."""
        if path is None:
            return cls()
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        admin = data.get("admin")
        if isinstance(admin, dict) and isinstance(admin.get("policy"), str):
            # A policy file sits beside its config: relative to the file, not the shell.
            admin["policy"] = str(path.parent / Path(admin["policy"]).expanduser())
        return cls.from_mapping(data, source=str(path))


def _check_listen(value: str, example: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected 'host:port', e.g. '{example}'")
    return value


def _check_admin(config: Config, source: str) -> None:
    admin, server = config.admin, config.server
    if admin.listen is None:
        return
    problem = None
    if admin.port == server.port:
        # Refused whatever the hosts: a wildcard address on either side would collide,
        # and /metrics must never be reachable through the proxy's port.
        problem = (
            f"admin.listen: {admin.listen} uses the proxy's port ({server.listen}): "
            "give the admin listener a port of its own, e.g. '127.0.0.1:9464'"
        )
    elif server.workers > 1:
        # N processes share one proxy socket but not a metrics registry or a window.
        problem = (
            f"admin.listen: not available with server.workers = {server.workers}: each "
            "worker process has its own metrics and live window, so one admin port "
            "would show one worker's share at random. Run one process per replica "
            "(workers = 1) and scrape each replica's admin port, or export metrics "
            'with telemetry.exporter = "otlp"'
        )
    if problem:
        raise ConfigError(f"{source}: invalid configuration\n  {problem}")


def _check_regexes(patterns: tuple[str, ...]) -> None:
    import re

    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression {pattern!r}: {exc}") from None


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)
