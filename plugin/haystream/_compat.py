"""The private names of other libraries that haystream relies on, in one place.

Each has no public equivalent in the pinned versions (Haystack 3.4, hayhooks 2.1, llama-cpp-haystack 3.0);
`tests/test_compat.py` fails loudly, naming the function, when an upgrade removes or reshapes one.
"""

from __future__ import annotations

from typing import Any

from haystack.components.generators.chat.openai import _check_finish_reason
from haystack.components.generators.utils import _convert_streaming_chunks_to_chat_message, _normalize_messages
from haystack.core.pipeline.base import PipelineBase
from haystack.dataclasses import ChatMessage, StreamingChunk

__all__ = [
    "check_finish_reason",
    "fold_chunks_like_haystack",
    "llama_context_tokens",
    "normalize_messages",
    "pipeline_input_data",
]


def pipeline_input_data(pipeline: PipelineBase, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`Pipeline.run`'s own distribution of flat or nested inputs to components (with its deep copies), so that
    `haystream.stream(pipeline, data)` accepts exactly what `pipeline.run(data)` accepts."""
    return pipeline._prepare_component_input_data(data)


def fold_chunks_like_haystack(chunks: list[StreamingChunk]) -> ChatMessage:
    """The reply Haystack's `OpenAIChatGenerator` builds from its streamed chunks (same meta, same tool-call rules)."""
    return _convert_streaming_chunks_to_chat_message(chunks=chunks)


def normalize_messages(messages: Any) -> list[ChatMessage]:
    """Haystack's normalisation of a generator's `messages` input (a str or ChatMessages)."""
    return _normalize_messages(messages)


def check_finish_reason(meta: dict[str, Any]) -> None:
    """Haystack's warnings for a reply cut by length or a content filter."""
    _check_finish_reason(meta)


def llama_context_tokens(generator: Any) -> int:
    """Tokens in a `LlamaCppChatGenerator`'s context after a run (prompt + answer): llama.cpp reports no usage when
    streaming."""
    return int(generator._model.n_tokens)
