"""Every haystream setting, in one place: `HAYSTREAM_*` environment variables (and, for the server, CLI flags).

One class per layer, so that a layer reads only its own: `StreamingSettings` (the streaming core),
`LocalModelSettings` (the embedded model), `ServerSettings` (`haystream serve` / `create_app()`). hayhooks' own
`HAYHOOKS_*` settings keep working beside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# inf/nan are not durations an operator means (and `int(inf)` fails deep in uvicorn): refuse them with the rest.
_CONFIG = SettingsConfigDict(env_prefix="HAYSTREAM_", extra="ignore", allow_inf_nan=False)
_SECRET_FIELDS = ("api_keys", "deploy_keys", "redis_url")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# Finite is not enough: 1e300 seconds is a drain grace that never ends, a timeout that never fires (and an overflow in
# whatever converts it to an int). Every duration is at most a day; stored responses at most 30 days, as OpenAI's.
MAX_SECONDS = 86_400
MAX_TTL_SECONDS = 30 * 86_400


class StreamingSettings(BaseSettings):
    """Settings of `haystream.stream` / `astream`."""

    model_config = _CONFIG

    producer_threads: int = Field(2048, ge=1, description="Threads for sync-only runs (one per running stream).")
    abandon_sockets: bool = Field(
        True, description="Close the HTTP responses and sockets a sync-only run is blocked on when its consumer leaves."
    )


class LocalModelSettings(BaseSettings):
    """Settings of the embedded model (`haystream.local`)."""

    model_config = _CONFIG

    local_model: str | None = Field(None, description="A GGUF file of your own instead of the bundled SmolLM2.")
    local_queue_timeout: float = Field(
        60.0, gt=0, le=MAX_SECONDS, description="Seconds a request waits for the model's turn."
    )


class ServerSettings(BaseSettings):
    """Settings of `haystream serve` and `haystream.server.create_app()`."""

    model_config = _CONFIG

    pipelines_dir: str = Field("pipeline_wrappers", description="Folder of pipeline wrappers deployed at startup.")
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(
        1416, ge=1, le=65535, description="Port to listen on (hayhooks' default, so its CLI finds the server)."
    )
    workers: int = Field(
        1, ge=1, le=1024, description="Uvicorn worker processes (at most 1024: a typo must not fork thousands)."
    )
    worker_timeout: float = Field(
        30.0,
        ge=0,
        le=MAX_SECONDS,
        description="With several workers: a worker whose event loop is blocked this long is killed and replaced "
        "(0: never).",
    )
    api_keys: str | None = Field(
        None, description="Comma-separated keys; when set, every route except /health and /ready needs one."
    )
    deploy_keys: str | None = Field(
        None, description="Comma-separated keys for the deploy routes; when set, API keys cannot deploy."
    )
    allow_unauthenticated: bool = Field(
        False, description="Silence the warning for a non-loopback bind without keys (it is intended)."
    )
    enable_deploy: bool = Field(False, description="Expose hayhooks' deploy/undeploy routes (they need a key too).")
    enable_docs: bool = Field(False, description="Expose hayhooks' /docs, /redoc and /openapi.json.")
    enable_draw: bool = Field(False, description="Expose hayhooks' /draw/{name} (it calls mermaid.ink).")
    cors_origins: str = Field("", description="Comma-separated origins allowed to call from a browser ('*': any).")
    allowed_hosts: str = Field(
        "",
        description="Comma-separated host names requests may be addressed to (`Host`), against DNS rebinding: "
        "'*' any, '.example.com' a domain and its subdomains; IP addresses always pass. Default: any when keys are "
        "set, else localhost and the --host name.",
    )
    forward_auth_headers: bool = Field(
        False, description="Hand the caller's Authorization and Cookie headers to wrappers."
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest accepted request body, any route.")
    body_timeout_seconds: float = Field(
        30.0, gt=0, le=MAX_SECONDS, description="Time a client has to send its whole request body."
    )
    head_timeout_seconds: float = Field(
        30.0, gt=0, le=MAX_SECONDS, description="Time a client has to send a request's line and headers (408 after it)."
    )
    max_streams: int = Field(
        1024, ge=1, description="Chat and Responses requests (and resumes) running at once; more get 429."
    )
    max_streams_per_key: int = Field(
        256, ge=1, description="Chat and Responses requests (and resumes) running at once per API key."
    )
    send_timeout_seconds: float = Field(
        60.0,
        gt=0,
        le=MAX_SECONDS,
        description="A client that reads nothing for this long is dropped and its run cancelled.",
    )
    max_messages: int = Field(
        2048,
        ge=1,
        description="Most chat messages, or Responses input items, a request may carry, and a chained Responses "
        "conversation in all (400 above).",
    )
    max_content_parts: int = Field(
        4096,
        ge=1,
        description="Most content parts (text, images, ...) and assistant tool calls all messages of a request may "
        "carry together.",
    )
    max_tokens: int = Field(32768, ge=1, description="Largest max_tokens / max_completion_tokens a client may ask.")
    responses_ttl_seconds: float = Field(
        3600.0,
        gt=0,
        le=MAX_TTL_SECONDS,
        description="How long stored Responses (and their event logs, for resuming) are kept.",
    )
    # Per key id, not in all: a key that stores more then drops its own oldest responses, never another key's.
    responses_max_stored: int = Field(
        1000,
        ge=1,
        description="Stored Responses kept per API key at most, in memory or Redis (that key's oldest finished one "
        "dropped first).",
    )
    responses_max_stored_bytes: int = Field(
        128 * 1024 * 1024,
        ge=1024,
        description="Size (as JSON) of the stored Responses kept per API key at most, in memory or Redis, "
        "conversations and background events included (that key's oldest finished one dropped first).",
    )
    redis_url: str | None = Field(
        None,
        description="Keep stored and background Responses in Redis (shared by replicas), e.g. redis://host:6379/0.",
    )
    keepalive_seconds: float = Field(
        15.0, gt=0, le=MAX_SECONDS, description="Idle time after which a `: ping` comment is sent."
    )
    stream_buffer: int = Field(64, ge=1, description="Chunks a producer may run ahead of a slow client.")
    log_level: str = Field("info", description="Uvicorn log level.")
    access_log: bool = Field(True, description="One log line per HTTP request (at the `info` level).")
    gc_freeze: bool = Field(
        True, description="Move what start-up created out of the garbage collector's reach (shorter GC pauses)."
    )
    gc_threshold: int = Field(
        50_000,
        ge=0,
        le=2**31 - 1,  # the collector's counter is a C int
        description="Allocations between the garbage collector's young-generation passes (Python's default: 700); "
        "0 keeps Python's.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="haystream's log lines as text or as one JSON object per line (with the request id)."
    )
    drain_grace_seconds: float = Field(
        5.0,
        ge=0,
        le=MAX_SECONDS,
        description="After SIGTERM, how long the server keeps listening (new chat and Responses requests get 503).",
    )
    drain_timeout: float = Field(
        30.0,
        gt=0,
        le=MAX_SECONDS,
        description="After SIGTERM, how long running streams and background responses may take before they end with an "
        "error.",
    )
    openwebui_tasks: Literal["heuristic", "wrapper", "pipeline"] = Field(
        "heuristic",
        description="Open WebUI background tasks (title, tags, ...): a fast built-in answer, the wrapper's "
        "run_task(), or the pipeline like any chat turn.",
    )
    tool_trace: Literal["none", "text"] = Field(
        "none", description="How plain clients see an agent's tool calls: not at all, or as a short text line."
    )
    openwebui_events: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Send Open WebUI event lines: auto = to clients that ask for them (the /openwebui/v1 base path, "
        "X-OpenWebUI-* headers, or X-Haystream-Events: true); plain OpenAI clients never get them.",
    )

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        # uvicorn would fail later with a bare KeyError.
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"should be one of {', '.join(LOG_LEVELS)}")
        return value.lower()

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # redis-py's own error comes at the first request, in a worker; this one comes before the server starts.
        if not value:
            return None
        url = urlsplit(value)
        if url.scheme not in ("redis", "rediss", "unix") or not (url.hostname or url.path):
            raise ValueError("should be a Redis URL: redis://host:6379/0, rediss://host:6380/0 or unix:///path.sock")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        # A browser's Origin is exactly scheme://host[:port], lower case, without a default port: anything else
        # would never match (the comparison is exact), silently.
        for origin in _split(value):
            if origin == "*" or origin == "null" or origin == (right := _origin_form(origin)):
                continue
            scheme = origin.partition("://")[0].lower() if "://" in origin else ""
            if scheme and scheme not in ("http", "https") and origin.partition("://")[2]:
                continue  # an app's or extension's own origin (chrome-extension://id, tauri://localhost): as written
            example = repr(right) if right else "scheme://host[:port], e.g. 'https://chat.example.com'"
            raise ValueError(f"{origin!r} is not an origin as a browser sends it: write {example} (or '*': any)")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # An empty host (`HAYSTREAM_HOST=` in a compose file) would listen on every interface, silently.
        if not value.strip():
            raise ValueError("is empty; write 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
        if value.startswith("[") and value.endswith("]"):  # URL syntax: the resolver would look it up as a name
            raise ValueError(f"write the IPv6 address without brackets: {value[1:-1]}")
        return value.strip()

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        # Compared with the request's `Host` name: a URL, a path or a glob there would never match, silently.
        for entry in _split(value):
            name = (urlsplit(entry).hostname or "") if "://" in entry else entry.split("/", 1)[0]
            if name.count(":") == 1:  # a port: the `Host` name is compared without one
                name = name.partition(":")[0]
            name = name.rstrip(".")  # and without a trailing dot
            right = "." + name.removeprefix("*.") if name.startswith("*.") else name
            if entry != "*" and (entry != right or not name or "*" in name):
                example = repr(right) if right and "*" not in right else "'chat.example.com' or '.example.com'"
                raise ValueError(
                    f"{entry!r} is not a host name: write {example} (a name, '.domain' for it and its subdomains, "
                    "or '*': any)"
                )
        return value

    @field_validator("api_keys", "deploy_keys")
    @classmethod
    def _no_blank_keys(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Set but blank (",", " ", an unset variable in a compose file) must not switch auth off silently.
        if value is None:
            return None
        keys = _split(value)
        if not keys:
            name = f"HAYSTREAM_{(info.field_name or '').upper()}"
            raise ValueError(f"{name} is set but holds no key; set real keys, or unset it to run without keys")
        return ",".join(keys)

    @model_validator(mode="after")
    def _deploy_needs_one_worker(self) -> ServerSettings:
        # Each worker holds its own wrappers: a runtime deploy would reach the one worker that accepted it, and the
        # others would answer 404 for the new model, by turns.
        if self.enable_deploy and self.workers > 1:
            raise ValueError(
                "HAYSTREAM_ENABLE_DEPLOY needs a single worker (a wrapper deployed at runtime reaches only the worker "
                f"that took the request, not the other {self.workers - 1}); ship wrappers in the pipelines folder "
                "instead, or serve with --workers 1"
            )
        return self

    @property
    def keys(self) -> list[str]:
        """The configured API keys."""
        return _split(self.api_keys or "")

    @property
    def deploy_key_list(self) -> list[str]:
        """The configured deploy keys."""
        return _split(self.deploy_keys or "")

    @property
    def cors_origin_list(self) -> list[str]:
        """Origins allowed to call from a browser."""
        return _split(self.cors_origins)

    @property
    def allowed_host_list(self) -> list[str]:
        """Host names requests may be addressed to, as configured (empty: the default)."""
        return [host.lower() for host in _split(self.allowed_hosts)]

    @property
    def secrets(self) -> list[str]:
        """Every configured key: redacted wherever an error message might repeat one."""
        return [*self.keys, *self.deploy_key_list]


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _origin_form(origin: str) -> str | None:
    """`origin` as a browser's `Origin` header would say it: scheme://host[:port] (https:// when no scheme is given);
    None without a usable host name."""
    url = urlsplit(origin if "://" in origin else f"https://{origin}")
    scheme = url.scheme.lower() if url.scheme.lower() in ("http", "https") else "https"
    try:
        port = url.port
    except ValueError:  # not a number: keep it, so that the suggestion still differs from what was given
        port = None
    default = {"http": 80, "https": 443}[scheme]
    host = url.hostname or ""
    if not host or "*" in host:  # the list is matched exactly: no patterns
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")


def describe(error: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """One line naming each refused `HAYSTREAM_*` setting (or the command-line flag in `flags`, by field, that set
    it), what it was given and what it accepts."""
    problems = []
    for problem in error.errors():
        message = str(problem["msg"]).removeprefix("Value error, ")
        if problem["loc"]:
            field = str(problem["loc"][0])
            name = (flags or {}).get(field) or f"HAYSTREAM_{field.upper()}"
            # Keys and a Redis URL's password must not reach a terminal or a log.
            given = "" if field in _SECRET_FIELDS else f"={problem['input']!r}"
            message = message if message.startswith(name) else f"{name}{given}: {message}"
        problems.append(message)
    return "; ".join(problems)
