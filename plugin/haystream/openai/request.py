"""The chat-completions request, parsed tolerantly: unknown fields are kept and handed to the wrapper."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from haystream.openai.depth import MAX_JSON_DEPTH
from haystream.openai.errors import OpenAIError
from haystream.openai.messages import chat_messages


class StreamOptions(BaseModel):
    """`stream_options` of a streaming request."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool = Field(False, strict=True)


RequestT = TypeVar("RequestT", bound=BaseModel)
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class ChatMessageIn(BaseModel):
    """One message of the request; content may be a string, a list of parts, or absent (assistant tool-call turns)."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"must be one of {', '.join(sorted(ROLES))}")
        return value

    # Before the union's own validation, whose errors would name a union member ("messages.0.content.str: Input
    # should be a valid string") rather than what the client sent.
    @field_validator("content", mode="before")
    @classmethod
    def _typed_parts(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str | list):
            raise ValueError("must be a string or an array of content parts")
        if isinstance(value, list):
            for part in value:
                if not isinstance(part, dict):
                    raise ValueError("each content part must be an object")
                if not isinstance(part.get("type"), str):
                    raise ValueError("each content part needs a 'type'")
                if part["type"] == "image_url" and not _image_url_of(part):
                    # An object, as OpenAI requires: Haystack's conversion, which wrappers run on these messages,
                    # fails on any other shape (a bare string URL was a 500).
                    raise ValueError('an image_url part needs an image_url object with a url: {"url": "..."}')
        return value

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessageIn:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for {self.role} messages")
        # OpenAI requires the ids that pair a result with its call; Haystack accepts them absent, and an OpenAI
        # generator then fails the run (a 500 for the client's mistake).
        extra = self.model_extra or {}
        if self.role == "tool" and not isinstance(extra.get("tool_call_id"), str):
            raise ValueError("tool messages need a tool_call_id (the id of the call they answer)")
        if self.role == "assistant" and not _calls_have_ids(extra.get("tool_calls")):
            raise ValueError("each of an assistant's tool_calls needs an id")
        return self


def _calls_have_ids(calls: Any) -> bool:
    # Only a list is checked here: other shapes are refused by the conversion to Haystack messages.
    if not isinstance(calls, list):
        return True
    return all(isinstance(call, dict) and isinstance(call.get("id"), str) for call in calls)


def _non_empty(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _image_url_of(part: dict[str, Any]) -> str:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else None
    return url if isinstance(url, str) else ""


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
    # Strict: the wrapper gets the body as sent, so a value accepted here must already have the right JSON type.
    n: int | None = Field(None, ge=1, le=1, strict=True, description="Only one choice per request is served.")
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, ge=0, le=1, strict=True)

    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool | None = Field(None, strict=True)
    stop: str | list[str] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_sequences(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        # No count limit: OpenAI takes 4, but local models take more, and Open WebUI users set them.
        if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            raise ValueError("must be a string or an array of strings")
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _tool_shapes(cls, value: Any) -> Any:
        # Wrappers turn these into Haystack tools or send them upstream: a shape OpenAI refuses fails them (a 500).
        if value is None:
            return value
        if not isinstance(value, list):
            raise ValueError("must be an array of tools")
        for position, tool in enumerate(value):
            if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
                raise ValueError(f"tool {position} must be an object with a 'type'")
            function = tool.get("function")
            if tool["type"] == "function" and not (isinstance(function, dict) and _non_empty(function.get("name"))):
                raise ValueError(f"tool {position} needs a function object with a name")
        return value

    @field_validator("user", mode="before")
    @classmethod
    def _user_shape(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str | dict):
            raise ValueError("must be a string")
        return value

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


def parse_chat_request(
    raw: bytes, max_messages: int | None = None, max_content_parts: int | None = None
) -> tuple[ChatCompletionRequest, dict[str, Any]]:
    """Parse and validate a request body; returns the model and the full body as a dict.

    :raises OpenAIError: 400 for malformed JSON, more than `max_messages` messages or `max_content_parts` content
        parts in all, or a body that does not fit the schema.
    """
    request, body = parse_body(raw, ChatCompletionRequest, {"messages": max_messages}, {"messages": max_content_parts})
    # Every wrapper may hand the messages to Haystack: one it cannot represent is the client's mistake (400), not a
    # failure of the pipeline (500).
    chat_messages(body["messages"])
    return request, body


UTF8_BOM = b"\xef\xbb\xbf"
# The first bytes of UTF-16 and UTF-32 text: a byte order mark, or JSON's first (ASCII) character with its NUL bytes.
_WIDE_STARTS = (b"\xfe\xff", b"\xff\xfe", b"\x00\x00\xfe\xff")


def loads_json_body(raw: bytes) -> Any:
    """A request body parsed as JSON. A UTF-8 byte order mark is skipped (RFC 8259 §8.1 lets a parser ignore it;
    PowerShell and .NET clients send one).

    :raises OpenAIError: 400 for a body that is not JSON, saying so when it is UTF-16 or UTF-32 (JSON on the wire
        must be UTF-8).
    """
    try:
        body = orjson.loads(memoryview(raw)[3:] if raw.startswith(UTF8_BOM) else raw)
    except orjson.JSONDecodeError as error:
        if raw.startswith(_WIDE_STARTS) or b"\x00" in raw[:4]:
            raise OpenAIError(
                400,
                "The request body must be JSON encoded as UTF-8 (RFC 8259); it looks like UTF-16 or UTF-32.",
                code="invalid_json",
            ) from None
        raise OpenAIError(400, f"Malformed JSON body: {error}", code="invalid_json") from None
    _check_depth(raw, body)
    return body


def _check_depth(raw: bytes, body: Any) -> None:
    """Refuse (400) a body nested deeper than `MAX_JSON_DEPTH`: orjson reads 1,024 levels but writes 254, and a
    Responses request's `tools` or `text.format` schema is written back inside the response, its events and the
    store, a level or two deeper (a 500 from 254 levels); a Haystack `Pipeline` deep-copies its inputs with two Python
    frames a level. Only a body with that many brackets can be that deep: the rest is not looked at again."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return
    try:
        orjson.dumps([[[body]]])  # three levels to spare: where the body's fields end up inside other objects
    except orjson.JSONEncodeError:
        raise OpenAIError(
            400, f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json"
        ) from None


def check_bounds(
    items: Any, field: str, max_length: int | None, max_parts: int | None, *, what: str | None = None
) -> None:
    """Refuse (400 `array_above_max_length`, `param` = `field`) an array of more than `max_length` messages or items,
    or whose items' `content` parts and tool calls number more than `max_parts` together; `what` names the array in
    the message (default: `'field'`).

    Checked before the per-item (costly) validation and conversion, on the event loop: each message is converted and
    copied on its way to the model (~14 µs a message, ~100 µs a part through a Haystack Pipeline), and 40,000
    one-word parts fit in a 4 MiB body.
    """
    if not isinstance(items, list):
        return
    named = what or f"'{field}'"
    if max_length is not None and len(items) > max_length:
        raise OpenAIError(
            400,
            f"Invalid {named}: array too long. Expected an array with maximum length {max_length}, but got an array "
            f"with length {len(items)} instead.",
            param=field,
            code="array_above_max_length",
        )
    if max_parts is None:
        return
    parts = sum(_parts(item) for item in items)
    if parts > max_parts:
        raise OpenAIError(
            400,
            f"Invalid {named}: too many content parts (an assistant's tool calls count as parts). Expected at most "
            f"{max_parts} in all, but got {parts} instead.",
            param=field,
            code="array_above_max_length",
        )


def _parts(item: Any) -> int:
    """The content parts of a message or input item, and its tool calls: each is converted on its way to the model
    like a part (40,000 calls in one assistant message, 3 MB, held the event loop 3.4 s)."""
    if not isinstance(item, dict):
        return 0
    content, calls = item.get("content"), item.get("tool_calls")
    return (len(content) if isinstance(content, list) else 0) + (len(calls) if isinstance(calls, list) else 0)


def parse_body(
    raw: bytes,
    model: type[RequestT],
    max_lengths: Mapping[str, int | None] | None = None,
    max_parts: Mapping[str, int | None] | None = None,
) -> tuple[RequestT, dict[str, Any]]:
    """A JSON object body validated by `model`; returns the model and the body as a dict. `max_lengths` bounds
    top-level arrays, and `max_parts` the `content` parts of their items together, both checked before the
    (per-item, costly) validation.

    :raises OpenAIError: 400 for malformed JSON, an array over its bound, or a body that does not fit the schema,
        naming the first bad field.
    """
    body = loads_json_body(raw)
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    for field in {**(max_lengths or {}), **(max_parts or {})}:
        check_bounds(body.get(field), field, (max_lengths or {}).get(field), (max_parts or {}).get(field))
    try:
        return model.model_validate(body), body
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise OpenAIError(
            400,
            f"Invalid request: {param}: {first['msg'].removeprefix('Value error, ')}",
            param=param,
            code="invalid_request",
        ) from None
