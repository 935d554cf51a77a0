"""Every wire shape haystream sends, as a named type (the OpenAI Chat Completions API; checked against the `openai`
SDK's own models in tests/test_wire.py). Requests are parsed by the pydantic models in `request.py`."""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class FunctionDelta(TypedDict, total=False):
    """A piece of a function call: the name on the first piece, then argument text."""

    name: str
    arguments: str


class ToolCallDelta(TypedDict):
    """A piece of one tool call; `id` and `type` only on a call's first piece."""

    index: int
    id: NotRequired[str]
    type: NotRequired[Literal["function"]]
    function: FunctionDelta


class Delta(TypedDict, total=False):
    """The `delta` of a `chat.completion.chunk` (null fields are left out, never sent)."""

    role: Literal["assistant"]
    content: str | None
    reasoning_content: str
    tool_calls: list[ToolCallDelta]


class Usage(TypedDict):
    """Token counts of one response."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCall(TypedDict):
    """A complete function call."""

    name: str
    arguments: str


class ToolCall(TypedDict):
    """A complete tool call of a non-streamed answer."""

    id: str | None
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(TypedDict):
    """The `message` of a non-streamed answer."""

    role: Literal["assistant"]
    content: str | None
    refusal: None
    reasoning_content: NotRequired[str]
    tool_calls: NotRequired[list[ToolCall]]


class Choice(TypedDict):
    """The one choice of a non-streamed answer."""

    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str


class ChatCompletion(TypedDict):
    """A non-streamed answer (`stream: false`)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: NotRequired[Usage]


class ErrorObject(TypedDict):
    """What went wrong, as OpenAI describes it."""

    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorEnvelope(TypedDict):
    """An error body: `{"error": {...}}` (an HTTP error's body, or one `data:` line after the stream started)."""

    error: ErrorObject


class Model(TypedDict):
    """One entry of `GET /v1/models`."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    name: str


class ModelList(TypedDict):
    """`GET /v1/models`."""

    object: Literal["list"]
    data: list[Model]
