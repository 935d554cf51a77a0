"""The OpenAI Responses API on the wire: the request, its input as chat messages, and the event stream.

`ResponseEvents` turns the neutral deltas of `DeltaMapper` (`{"content"}`, `{"reasoning_content"}`,
`{"tool_calls"}`) into Responses events (`response.output_text.delta`, reasoning items, `function_call` items) and
keeps the `response` object they describe, so the chat-completions and Responses endpoints share one item mapping.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NotRequired, TypedDict

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from haystream.openai.errors import OpenAIError
from haystream.openai.messages import chat_messages
from haystream.openai.request import parse_body

TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete", "response.cancelled"})
EXTENSION = "haystream.extension"  # the type of a log entry that is not a Responses event (see `ExtensionLine`)
Status = Literal["queued", "in_progress", "completed", "failed", "incomplete", "cancelled"]


_METADATA_PAIRS, _METADATA_KEY_CHARS, _METADATA_VALUE_CHARS = 16, 64, 512


class ResponsesRequest(BaseModel):
    """The subset of a `POST /v1/responses` body that haystream reads; the rest reaches the wrapper in `body`."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    stream: bool = Field(False, strict=True)
    background: bool = Field(False, strict=True)
    store: bool = Field(True, strict=True)
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, strict=True)
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = Field(True, strict=True)
    metadata: dict[str, str] | None = None
    # Strict: the wrapper gets the body as sent, so a value accepted here must already have the right JSON type.
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, ge=0, le=1, strict=True)
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None

    # Before the unions' own validation, whose errors would name a union member ("input.str").
    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(i, dict) for i in value)):
            raise ValueError("must be a string or an array of input items (objects)")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_within_openais_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # OpenAI's limits; the response echoes `metadata` and stores it, so without them one request's thousands of
        # pairs were kept with every stored response and sent back in every event that carries the response.
        if value is not None:
            if len(value) > _METADATA_PAIRS:
                raise ValueError(f"at most {_METADATA_PAIRS} key-value pairs, got {len(value)}")
            for key, text in value.items():
                if len(key) > _METADATA_KEY_CHARS:
                    raise ValueError(f"keys are at most {_METADATA_KEY_CHARS} characters; {key[:20]!r}… is longer")
                if len(text) > _METADATA_VALUE_CHARS:
                    raise ValueError(f"values are at most {_METADATA_VALUE_CHARS} characters; {key!r}'s is longer")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, value: Any) -> Any:
        if not isinstance(value, str | dict):
            raise ValueError('must be "none", "auto", "required" or an object')
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_named(cls, value: Any) -> Any:
        # Function tools reach wrappers as chat tools: one without a name fails their conversion (a 500).
        if isinstance(value, list):
            for position, tool in enumerate(value):
                if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
                    raise ValueError(f"tool {position} must be an object with a 'type'")
                name = tool.get("name")
                if tool["type"] == "function" and not (isinstance(name, str) and name):
                    raise ValueError(f"tool {position}: a function tool needs a name")
        return value


class ResponseEvent(TypedDict):
    """Every Responses stream event: its type and its place in the stream."""

    type: str
    sequence_number: int


class ResponseLifecycleEvent(ResponseEvent):
    """`response.created`, `.queued`, `.in_progress`, `.completed`, `.failed`, `.incomplete`, `.cancelled`."""

    response: dict[str, Any]


class ResponseFailedEvent(ResponseLifecycleEvent):
    """`response.failed`, with the error also at the top level: the openai SDK raises `APIError` for an event that
    carries one, so a failed stream fails in the client instead of ending quietly."""

    error: dict[str, Any]


class OutputItemEvent(ResponseEvent):
    """`response.output_item.added` / `.done`."""

    output_index: int
    item: dict[str, Any]


class ContentPartEvent(ResponseEvent):
    """`response.content_part.added` / `.done`."""

    item_id: str
    output_index: int
    content_index: int
    part: dict[str, Any]


class TextDeltaEvent(ResponseEvent):
    """`response.output_text.delta` / `response.reasoning_text.delta`."""

    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: NotRequired[list[Any]]


class TextDoneEvent(ResponseEvent):
    """`response.output_text.done` / `response.reasoning_text.done`."""

    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: NotRequired[list[Any]]


class ArgumentsDeltaEvent(ResponseEvent):
    """`response.function_call_arguments.delta`."""

    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(ResponseEvent):
    """`response.function_call_arguments.done`."""

    item_id: str
    output_index: int
    name: str
    arguments: str


class ExtensionLine(ResponseEvent):
    """A line of the stream outside the Responses protocol (Open WebUI's `{"event": ...}` lines), kept in the event
    log with the Responses events: sent as a bare `data:` line with its `payload`, without an `event:` name or a
    sequence number of its own. Its `sequence_number` is the one of the event before it, which places it in the log
    (a resume after that event does not repeat it)."""

    payload: dict[str, Any]


def is_extension(event: Mapping[str, Any]) -> bool:
    """Whether a log entry is an `ExtensionLine` rather than a Responses event."""
    return bool(event["type"] == EXTENSION)


def parse_responses_request(
    raw: bytes, max_input_items: int | None = None, max_content_parts: int | None = None
) -> tuple[ResponsesRequest, dict[str, Any]]:
    """Parse and validate a Responses body.

    :raises OpenAIError: 400 for malformed JSON, more than `max_input_items` input items or `max_content_parts`
        content parts in all, or a body that does not fit the schema.
    """
    request, body = parse_body(raw, ResponsesRequest, {"input": max_input_items}, {"input": max_content_parts})
    if request.background and not request.store:
        raise OpenAIError(400, "background responses need store=true.", param="store", code="invalid_request")
    return request, body


def input_messages(input: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Responses `input` as chat-completions messages (text, images, function calls and their outputs).

    :raises OpenAIError: 400 for an item Haystack cannot represent.
    """
    if isinstance(input, str):
        return [{"role": "user", "content": input}] if input else []
    messages: list[dict[str, Any]] = []
    for position, item in enumerate(input):
        kind = item.get("type", "message")
        where = f"input.{position}"
        if kind == "message":
            role = _string(item, "role", where, default="user")
            if role not in _MESSAGE_ROLES:
                # A `tool` message has no call id here (results are `function_call_output` items): it failed the
                # wrapper's generator, a 500.
                raise OpenAIError(
                    400,
                    f"{where}.role: expected one of {', '.join(sorted(_MESSAGE_ROLES))}; got {role[:50]!r}.",
                    param=f"{where}.role",
                )
            messages.append({"role": role, "content": _chat_content(item.get("content", ""), f"{where}.content")})
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", where),
                "type": "function",
                "function": {
                    "name": _string(item, "name", where),
                    "arguments": _string(item, "arguments", where, default=""),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)  # parallel calls belong to one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            text = output if isinstance(output, str) else _text_of(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": text})
        elif kind == "reasoning":
            continue  # the model's own earlier reasoning: not part of a chat prompt
        else:
            raise OpenAIError(400, f"{where}: items of type {kind!r} are not supported.", param="input")
    chat_messages(messages)  # 400 now for what Haystack cannot represent, not a pipeline failure later
    return messages


# The roles of a Responses message item (OpenAI's); tool results are `function_call_output` items.
_MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})

# Id prefixes of the input items a client sent without an id (OpenAI's for messages, calls and reasoning).
_ITEM_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


def input_items(input: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Responses `input` as the items `GET /v1/responses/{id}/input_items` lists: each with an `id` and a `status`,
    a string input as one user message, a message's string content as one `input_text` part (`output_text` for an
    assistant), everything else as the client sent it. Call it on an input `input_messages` accepted."""
    if isinstance(input, str):
        return [_message_item({"role": "user", "content": input})] if input else []
    items = []
    seen: set[str] = set()
    for item in input:
        kind = item.get("type", "message")
        if kind == "message":
            listed = _message_item(item)
        else:
            listed = {**item, "id": _item_id(item, kind), "status": item.get("status", "completed")}
        if listed["id"] in seen:
            # Ids are the cursors: a repeated one would send a client that pages by it back to its first place.
            listed["id"] = _item_id({}, kind)
        seen.add(listed["id"])
        items.append(listed)
    return items


def input_item_page(
    items: Sequence[Mapping[str, Any]],
    *,
    limit: int = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    before: str | None = None,
    image_urls: bool = False,
) -> dict[str, Any]:
    """One page of input items as OpenAI lists them: `{"object": "list", "data", "first_id", "last_id",
    "has_more"}`, `after`/`before` being item ids in the listed order. `image_urls`: keep the URLs of `input_image`
    parts (OpenAI leaves them out unless `include` asks for `message.input_image.image_url`).

    :raises OpenAIError: 400 naming the cursor when `after` or `before` is not an item of this list.
    """
    ordered = list(items) if order == "asc" else list(reversed(items))
    ids = [item["id"] for item in ordered]
    start, end = 0, len(ordered)
    for name, cursor in (("after", after), ("before", before)):
        if cursor is None:
            continue
        if cursor not in ids:
            raise OpenAIError(400, f"No input item with id '{cursor}' in this response.", param=name)
        if name == "after":
            start = ids.index(cursor) + 1
        else:
            end = ids.index(cursor)
    window = ordered[start:end]
    # `before` alone pages backwards: the items right before the cursor, still in the listed order.
    page = window[-limit:] if before is not None and after is None else window[:limit]
    data = [item if image_urls else _without_image_urls(item) for item in page]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(window) > limit,
    }


def _message_item(message: Mapping[str, Any]) -> dict[str, Any]:
    role = message.get("role", "user")
    content = message.get("content", "")
    text_type = "output_text" if role == "assistant" else "input_text"  # an assistant's item is an output message
    if isinstance(content, str):
        content = [{"type": text_type, "text": content}]
    parts = []
    for part in content:
        part = dict(part)
        if part.get("type") in ("text", "input_text", "output_text"):  # chat-style `text` parts too
            part["type"] = text_type
            part.setdefault("text", "")
        if part.get("type") == "output_text":
            part.setdefault("annotations", [])  # required by the SDK's `ResponseOutputText`
        elif part.get("type") == "input_image":
            part.setdefault("detail", "auto")  # required by the SDK's `ResponseInputImage`
        parts.append(part)
    return {
        "id": _item_id(message, "message"),
        "type": "message",
        "role": role,
        "content": parts,
        "status": message.get("status", "completed"),
    }


def _item_id(item: Mapping[str, Any], kind: str) -> str:
    given = item.get("id")
    if isinstance(given, str) and given:
        return given  # an item passed back from an earlier output keeps its id, as with OpenAI
    return _ITEM_PREFIXES.get(kind, "item_") + secrets.token_hex(12)


def _without_image_urls(item: Mapping[str, Any]) -> Mapping[str, Any]:
    content = item.get("content")
    if item.get("type") != "message" or not isinstance(content, list):
        return item
    if not any(part.get("type") == "input_image" and part.get("image_url") for part in content):
        return item
    parts = [{**part, "image_url": None} if part.get("type") == "input_image" else part for part in content]
    return {**item, "content": parts}


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses function tools (`{"type": "function", "name", ...}`) in the chat-completions shape."""
    converted = []
    for tool in tools:
        if tool.get("type") != "function":
            continue  # hosted tools (web search, ...) have no meaning for a pipeline
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    """A Responses `tool_choice` in the chat-completions shape (`{"type": "function", "name"}` gains `function`)."""
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def chat_response_format(text: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as a chat-completions `response_format` (None for plain text)."""
    format = (text or {}).get("format")
    if not isinstance(format, dict) or format.get("type") not in ("json_object", "json_schema"):
        return None
    if format["type"] == "json_object":
        return {"type": "json_object"}
    schema = {key: format[key] for key in ("name", "description", "schema", "strict") if key in format}
    return {"type": "json_schema", "json_schema": schema}


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A finished response's output items as chat messages (for `previous_response_id` chaining)."""
    return input_messages([item for item in output if item.get("type") in ("message", "function_call")])


def response_id() -> str:
    """A fresh `resp_…` id."""
    return "resp_" + secrets.token_hex(16)


def _string(item: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    """A required (or defaulted) string field of an input item; 400 when missing or not a string."""
    value = item.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        wanted = "a non-empty string" if default is None else "a string"
        raise OpenAIError(400, f"{where}.{key}: expected {wanted}.", param=f"{where}.{key}")
    return value


def _chat_content(content: Any, where: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise OpenAIError(400, f"{where}: expected a string or a list of content parts.", param=where)
    parts: list[dict[str, Any]] = []
    for position, part in enumerate(content):
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": _string(part, "text", f"{where}.{position}", default="")})
        elif kind == "input_image":
            url = _string(part, "image_url", f"{where}.{position}")  # a URL: file ids are not supported
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "refusal":
            parts.append({"type": "text", "text": _string(part, "refusal", f"{where}.{position}", default="")})
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _text_of(parts: Any, where: str) -> str:
    if not isinstance(parts, list) or not all(isinstance(part, dict) for part in parts):
        raise OpenAIError(400, f"{where}: expected a string or a list of content parts.", param=where)
    return "".join(_string(part, "text", where, default="") for part in parts)


class ResponseEvents:
    """Stateful: the events of one response, numbered, and the `response` object they build.

    Each method returns the events to send, in order; `response` is always the current snapshot.
    """

    def __init__(self, request: ResponsesRequest, *, id: str | None = None, created_at: int | None = None) -> None:
        self.response: dict[str, Any] = {
            "id": id or response_id(),
            "object": "response",
            "created_at": created_at or int(time.time()),
            "status": "queued" if request.background else "in_progress",
            "background": request.background,
            "error": None,
            "incomplete_details": None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "metadata": request.metadata or {},
            "model": request.model,
            "output": [],
            "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": request.previous_response_id,
            "store": request.store,
            "temperature": request.temperature,
            "text": request.text or {"format": {"type": "text"}},
            "reasoning": request.reasoning,
            "tool_choice": request.tool_choice,
            "tools": request.tools,
            "top_p": request.top_p,
            "truncation": "disabled",
            "usage": None,
        }
        self._sequence = 0
        self._open: dict[str, Any] | None = None  # the message or reasoning item receiving text
        self._text: list[str] = []

    @property
    def id(self) -> str:
        """The response id."""
        return self.response["id"]

    def created(self) -> list[ResponseEvent]:
        """`response.created`, then `response.in_progress` (or `response.queued` for a background response)."""
        first = self._lifecycle("response.created")
        if self.response["status"] == "queued":
            return [first, self._lifecycle("response.queued")]
        return [first, self._lifecycle("response.in_progress")]

    def started(self) -> list[ResponseEvent]:
        """A queued (background) response begins running."""
        self.response["status"] = "in_progress"
        return [self._lifecycle("response.in_progress")]

    @staticmethod
    def shows(delta: Mapping[str, Any]) -> bool:
        """Whether `feed` makes any event of this delta."""
        return bool(delta.get("reasoning_content") or delta.get("content"))

    def feed(self, delta: Mapping[str, Any]) -> list[ResponseEvent]:
        """The events of one neutral delta (`content`, `reasoning_content` or `tool_calls`)."""
        events: list[ResponseEvent] = []
        if delta.get("reasoning_content"):
            events += self._text_delta("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            events += self._text_delta("message", delta["content"])
        return events

    def extension(self, payload: dict[str, Any]) -> ExtensionLine:
        """A line outside the protocol, placed after the events so far (it takes no sequence number)."""
        return {"type": EXTENSION, "sequence_number": self._sequence - 1, "payload": payload}

    def finish(
        self, tool_deltas: Sequence[Mapping[str, Any]], finish_reason: str, usage: Mapping[str, int]
    ) -> list[ResponseEvent]:
        """Close open items, add the client's function calls, and end with `response.completed` (or incomplete)."""
        events = self._close()
        events += self._function_calls(tool_deltas)
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        self.response["usage"] = {
            "input_tokens": prompt,
            # Both counts are required by the SDK's `ResponseUsage` (a strict client rejects the response otherwise).
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
        self.response["completed_at"] = int(time.time())
        if finish_reason in ("length", "content_filter"):
            reason = "max_output_tokens" if finish_reason == "length" else "content_filter"
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": reason}
            return [*events, self._lifecycle("response.incomplete")]
        self.response["status"] = "completed"
        return [*events, self._lifecycle("response.completed")]

    def fail(self, error: OpenAIError) -> list[ResponseEvent]:
        """End with `response.failed` carrying the error."""
        events = self._close(status="incomplete")
        self.response["status"] = "failed"
        self.response["error"] = {"code": "server_error", "message": error.message}
        failed: ResponseFailedEvent = {**self._lifecycle("response.failed"), "error": dict(error.to_dict()["error"])}
        return [*events, failed]

    def cancel(self) -> list[ResponseEvent]:
        """End a cancelled background response (`response.cancelled`: not an OpenAI event type, but terminal)."""
        events = self._close(status="incomplete")
        self.response["status"] = "cancelled"
        return [*events, self._lifecycle("response.cancelled")]

    # items ----------------------------------------------------------------------------------------------------

    def _text_delta(self, kind: str, text: str) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        item = self._open
        if item is None or item["type"] != kind:
            events += self._close()
            events += self._open_item(kind)
            item = self._open
            assert item is not None
        self._text.append(text)
        delta_type = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        event: TextDeltaEvent = {
            "type": delta_type,
            "sequence_number": self._next(),
            "item_id": item["id"],
            "output_index": len(self.response["output"]) - 1,
            "content_index": 0,
            "delta": text,
        }
        if kind == "message":
            event["logprobs"] = []
        events.append(event)
        return events

    def _open_item(self, kind: str) -> list[ResponseEvent]:
        item: dict[str, Any]
        part: dict[str, Any]
        if kind == "message":
            item = {"id": "msg_" + secrets.token_hex(12), "type": "message", "role": "assistant"}
            item.update(status="in_progress", content=[])
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": "rs_" + secrets.token_hex(12), "type": "reasoning", "summary": [], "content": []}
            item["status"] = "in_progress"
            part = {"type": "reasoning_text", "text": ""}
        self.response["output"].append(item)
        self._open = item
        self._text = []
        index = len(self.response["output"]) - 1
        added: OutputItemEvent = {
            "type": "response.output_item.added",
            "sequence_number": self._next(),
            "output_index": index,
            "item": {**item, "content": []},
        }
        item["content"].append(part)
        part_added: ContentPartEvent = {
            "type": "response.content_part.added",
            "sequence_number": self._next(),
            "item_id": item["id"],
            "output_index": index,
            "content_index": 0,
            "part": dict(part),
        }
        return [added, part_added]

    def _close(self, status: str = "completed") -> list[ResponseEvent]:
        item = self._open
        if item is None:
            return []
        self._open = None
        index = len(self.response["output"]) - 1
        part = item["content"][0]
        part["text"] = "".join(self._text)
        item["status"] = status
        kind = "output_text" if item["type"] == "message" else "reasoning_text"
        text_done: TextDoneEvent = {
            "type": f"response.{kind}.done",
            "sequence_number": self._next(),
            "item_id": item["id"],
            "output_index": index,
            "content_index": 0,
            "text": part["text"],
        }
        if item["type"] == "message":
            text_done["logprobs"] = []
        part_done: ContentPartEvent = {
            "type": "response.content_part.done",
            "sequence_number": self._next(),
            "item_id": item["id"],
            "output_index": index,
            "content_index": 0,
            "part": dict(part),
        }
        return [text_done, part_done, self._item_done(index)]

    def _function_calls(self, tool_deltas: Sequence[Mapping[str, Any]]) -> list[ResponseEvent]:
        """Client tool calls (released by `DeltaMapper.finish`) as `function_call` items."""
        calls: dict[int, dict[str, Any]] = {}
        pieces: dict[int, list[str]] = {}
        for delta in tool_deltas:
            for call in delta["tool_calls"]:
                if "id" in call:
                    calls[call["index"]] = {"call_id": call["id"], "name": call["function"]["name"]}
                pieces.setdefault(call["index"], []).append(call["function"].get("arguments") or "")
        events: list[ResponseEvent] = []
        for position in sorted(calls):
            item = {
                "id": "fc_" + secrets.token_hex(12),
                "type": "function_call",
                "call_id": calls[position]["call_id"],
                "name": calls[position]["name"],
                "arguments": "",
                "status": "in_progress",
            }
            self.response["output"].append(item)
            index = len(self.response["output"]) - 1
            added: OutputItemEvent = {
                "type": "response.output_item.added",
                "sequence_number": self._next(),
                "output_index": index,
                "item": dict(item),
            }
            events.append(added)
            for piece in pieces[position]:
                if piece:
                    delta_event: ArgumentsDeltaEvent = {
                        "type": "response.function_call_arguments.delta",
                        "sequence_number": self._next(),
                        "item_id": item["id"],
                        "output_index": index,
                        "delta": piece,
                    }
                    events.append(delta_event)
            item["arguments"] = "".join(pieces[position])
            item["status"] = "completed"
            done: ArgumentsDoneEvent = {
                "type": "response.function_call_arguments.done",
                "sequence_number": self._next(),
                "item_id": item["id"],
                "output_index": index,
                "name": item["name"],
                "arguments": item["arguments"],
            }
            events += [done, self._item_done(index)]
        return events

    def _item_done(self, index: int) -> OutputItemEvent:
        item = self.response["output"][index]
        return {
            "type": "response.output_item.done",
            "sequence_number": self._next(),
            "output_index": index,
            "item": {**item, "content": [dict(part) for part in item["content"]]} if "content" in item else dict(item),
        }

    def _lifecycle(self, type: str) -> ResponseLifecycleEvent:
        return {"type": type, "sequence_number": self._next(), "response": snapshot(self.response)}

    def _next(self) -> int:
        number = self._sequence
        self._sequence += 1
        return number


def output_of(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The output items that a response's events built, as far as they go (a log cut short ends with an item still
    `in_progress`)."""
    output: list[dict[str, Any]] = []
    for event in events:
        kind = event["type"]
        if kind in ("response.output_item.added", "response.output_item.done"):
            item = snapshot(event["item"])
            if event["output_index"] < len(output):
                output[event["output_index"]] = item
            else:
                output.append(item)
        elif kind == "response.content_part.added":
            output[event["output_index"]]["content"].append(snapshot(event["part"]))
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta"):
            output[event["output_index"]]["content"][event["content_index"]]["text"] += event["delta"]
        elif kind == "response.function_call_arguments.delta":
            output[event["output_index"]]["arguments"] += event["delta"]
    return output


def snapshot(response: dict[str, Any]) -> dict[str, Any]:
    """A copy of the response object that later events cannot change."""
    return orjson.loads(orjson.dumps(response))


def event_frame(event: Mapping[str, Any]) -> bytes:
    """One Responses event as SSE: an `event:` line naming its type, and its JSON (an `ExtensionLine`: its payload
    alone, as a `data:` line)."""
    if event["type"] == EXTENSION:
        return b"data: " + orjson.dumps(event["payload"]) + b"\n\n"
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
