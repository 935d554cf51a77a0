"""Server-sent-event frames of one chat completion, built from prepared byte fragments (hot path: one per chunk)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any

import orjson

from haystream.openai.protocol import Delta, Usage

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


def completion_id() -> str:
    """A fresh `chatcmpl-…` id."""
    return "chatcmpl-" + secrets.token_hex(12)


class ChunkFramer:
    """Frames `chat.completion.chunk` events that share one id, `created` and model."""

    def __init__(self, model: str, *, id: str | None = None, created: int | None = None) -> None:
        self.id = id or completion_id()
        self.created = created or int(time.time())
        self.model = model
        head = orjson.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": model})
        self._head = b"data: " + head[:-1]
        self._delta_open = self._head + b',"choices":[{"index":0,"delta":'

    def delta(self, delta: Delta) -> bytes:
        """A chunk carrying one delta and no finish reason."""
        return self._delta_open + orjson.dumps(delta) + b',"logprobs":null,"finish_reason":null}]}\n\n'

    def role(self, content: str | None = "") -> bytes:
        """The first chunk: the assistant role with empty content (`None` when the answer has no text: tool calls)."""
        return self.delta({"role": "assistant", "content": content})

    def finish(self, reason: str) -> bytes:
        """The one chunk that carries the finish reason."""
        return self._delta_open + b'{},"logprobs":null,"finish_reason":' + orjson.dumps(reason) + b"}]}\n\n"

    def usage(self, usage: Usage | dict[str, int]) -> bytes:
        """The final usage chunk (`choices: []`), sent when the client asked with `stream_options.include_usage`."""
        return self._head + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"


def data_frame(payload: Mapping[str, Any]) -> bytes:
    """Any JSON object as one `data:` event (errors, Open WebUI events)."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"
