"""`StreamingChatGenerator`: any chat generator with a `stream` output socket next to `replies`."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from haystack import component, default_from_dict, default_to_dict
from haystack.core.serialization import component_to_dict
from haystack.core.serialization_security import allow_deserialization_module
from haystack.dataclasses import ChatMessage, StreamingCallbackT, StreamingChunk
from haystack.utils import deserialize_chatgenerator_inplace

from haystream.streaming.stream import astream, stream

StreamingMode = Literal["callback", "generator"] | None

# Haystack 3.4 only rebuilds components from allow-listed modules; installing haystream is trusting this one.
allow_deserialization_module(__name__)


class LazyChunkStream:
    """The chunks of one chat-generator call that has not happened yet.

    Iterating it (sync with `for`, or async with `async for`) performs the call and yields its `StreamingChunk`s.
    It can be consumed once. When it is exhausted, the `replies` list that was returned next to it is filled in, and
    `reply` holds the final message.
    """

    def __init__(self, chat_generator: Any, inputs: dict[str, Any], replies: list[ChatMessage]) -> None:
        self._chat_generator = chat_generator
        self._inputs = inputs
        self._replies = replies
        self._consumed = False

    @property
    def reply(self) -> ChatMessage | None:
        """The final reply, once the stream has been consumed."""
        return self._replies[-1] if self._replies else None

    def __iter__(self) -> Iterator[StreamingChunk]:
        self._claim()
        with stream(self._chat_generator, **self._inputs) as chunks:
            yield from chunks
            self._replies[:] = chunks.result.get("replies", [])

    async def __aiter__(self) -> AsyncIterator[StreamingChunk]:
        self._claim()
        async with astream(self._chat_generator, **self._inputs) as chunks:
            async for chunk in chunks:
                yield chunk
            self._replies[:] = chunks.result.get("replies", [])

    def __deepcopy__(self, memo: dict[int, Any]) -> LazyChunkStream:
        # Pipelines deep-copy component inputs. A copy would perform the call with a copy of the generator (and its
        # HTTP client) and fill a copy of `replies`; this is a handle to one pending call, so it is shared instead.
        return self

    def _claim(self) -> None:
        if self._consumed:
            raise RuntimeError("This LazyChunkStream has already been consumed; it performs its call only once.")
        self._consumed = True


@component
class StreamingChatGenerator:
    """Wraps a chat generator and adds a `stream` output socket next to `replies`.

    - `streaming_mode="generator"` (default): `run()` returns at once. `stream` is a `LazyChunkStream` that performs
      the call when a consumer iterates it (sync or async); `replies` is an empty list until then, and is filled in
      place when the stream has been consumed. Connect `stream` to a downstream component that iterates it.
    - `streaming_mode="callback"`: behaves exactly like the wrapped generator (`stream` is None).
    - `streaming_mode=None`: no streaming at all: the generator is called without a callback (`stream` is None).
    """

    def __init__(self, chat_generator: Any, streaming_mode: StreamingMode = "generator") -> None:
        if streaming_mode not in ("callback", "generator", None):
            raise ValueError(f"streaming_mode must be 'callback', 'generator' or None, not {streaming_mode!r}")
        self.chat_generator = chat_generator
        self.streaming_mode = streaming_mode
        self._accepted = set(inspect.signature(chat_generator.run).parameters)

    def warm_up(self) -> None:
        """Warm up the wrapped generator."""
        if hasattr(self.chat_generator, "warm_up"):
            self.chat_generator.warm_up()

    @component.output_types(replies=list[ChatMessage], stream=LazyChunkStream)
    def run(
        self,
        messages: list[ChatMessage],
        streaming_callback: StreamingCallbackT | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        tools: Any = None,
    ) -> dict[str, Any]:
        """Call the wrapped generator, or (generator mode) return a lazy stream of its call."""
        inputs = self._inputs(messages, streaming_callback, generation_kwargs, tools)
        if self.streaming_mode == "generator":
            return self._lazy(inputs)
        return {"replies": self.chat_generator.run(**inputs)["replies"], "stream": None}

    @component.output_types(replies=list[ChatMessage], stream=LazyChunkStream)
    async def run_async(
        self,
        messages: list[ChatMessage],
        streaming_callback: StreamingCallbackT | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        tools: Any = None,
    ) -> dict[str, Any]:
        """Async twin of `run`."""
        inputs = self._inputs(messages, streaming_callback, generation_kwargs, tools)
        if self.streaming_mode == "generator":
            return self._lazy(inputs)
        if hasattr(self.chat_generator, "run_async"):
            result = await self.chat_generator.run_async(**inputs)
        else:
            result = self.chat_generator.run(**inputs)
        return {"replies": result["replies"], "stream": None}

    def _inputs(
        self, messages: list[ChatMessage], streaming_callback: Any, generation_kwargs: Any, tools: Any
    ) -> dict[str, Any]:
        inputs: dict[str, Any] = {"messages": messages}
        optional = {"generation_kwargs": generation_kwargs, "tools": tools}
        if self.streaming_mode is not None:
            optional["streaming_callback"] = streaming_callback
        inputs.update({key: value for key, value in optional.items() if value is not None and key in self._accepted})
        return inputs

    def _lazy(self, inputs: dict[str, Any]) -> dict[str, Any]:
        replies: list[ChatMessage] = []
        return {"replies": replies, "stream": LazyChunkStream(self.chat_generator, inputs, replies)}

    def to_dict(self) -> dict[str, Any]:
        """Serialize, wrapped generator included."""
        return default_to_dict(
            self,
            chat_generator=component_to_dict(obj=self.chat_generator, name="chat_generator"),
            streaming_mode=self.streaming_mode,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamingChatGenerator:
        """Deserialize, wrapped generator included."""
        deserialize_chatgenerator_inplace(data["init_parameters"], key="chat_generator")
        return default_from_dict(cls, data)
