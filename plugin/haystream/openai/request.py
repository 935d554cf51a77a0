"""The chat-completions request, parsed tolerantly: unknown fields are kept and handed to the wrapper."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from haystream.openai.errors import OpenAIError


class StreamOptions(BaseModel):
    """`stream_options` of a streaming request."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatMessageIn(BaseModel):
    """One message of the request; content may be a string, a list of parts, or absent (tool-call turns)."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """The subset of the OpenAI request that haystream reads; everything else passes through in `body`."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | dict[str, Any] | None = None  # Open WebUI sends an object for pipeline models
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    n: int | None = Field(None, ge=1, le=1, description="Only one choice per request is served.")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)

    @field_validator("stream", mode="before")
    @classmethod
    def _strict_bool(cls, value: Any) -> Any:
        if value is None:
            return False
        if not isinstance(value, bool):
            raise ValueError("must be a boolean")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether the client asked for a final usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def parse_chat_request(raw: bytes) -> tuple[ChatCompletionRequest, dict[str, Any]]:
    """Parse and validate a request body; returns the model and the full body as a dict.

    :raises OpenAIError: 400 for malformed JSON or a body that does not fit the schema.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise OpenAIError(400, f"Malformed JSON body: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(body), body
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise OpenAIError(
            400, f"Invalid request: {param}: {first['msg']}", param=param, code="invalid_request"
        ) from None
