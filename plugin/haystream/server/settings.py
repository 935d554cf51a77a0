"""Server settings: CLI flags and `HAYSTREAM_*` environment variables (hayhooks' own `HAYHOOKS_*` keep working)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """Settings of `haystream serve` and `haystream.server.create_app()`."""

    model_config = SettingsConfigDict(env_prefix="HAYSTREAM_", extra="ignore")

    pipelines_dir: str = Field("pipeline_wrappers", description="Folder of pipeline wrappers deployed at startup.")
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(1416, description="Port to listen on (hayhooks' default, so its CLI finds the server).")
    workers: int = Field(1, ge=1, description="Uvicorn worker processes.")
    api_keys: str = Field("", description="Comma-separated keys; when set, chat and model routes need a Bearer key.")
    enable_deploy: bool = Field(False, description="Expose hayhooks' deploy/undeploy routes (they need a key too).")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    keepalive_seconds: float = Field(15.0, gt=0, description="Idle time after which a `: ping` comment is sent.")
    stream_buffer: int = Field(64, ge=1, description="Chunks a producer may run ahead of a slow client.")
    log_level: str = Field("info", description="Uvicorn log level.")
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

    @field_validator("api_keys")
    @classmethod
    def _strip(cls, value: str) -> str:
        return ",".join(key.strip() for key in value.split(",") if key.strip())

    @property
    def keys(self) -> list[str]:
        """The configured API keys."""
        return [key for key in self.api_keys.split(",") if key]
