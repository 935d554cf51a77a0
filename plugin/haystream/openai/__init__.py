"""The OpenAI wire format: request model, item-to-delta mapping, SSE frames, aggregation, errors. No web imports."""

from haystream.openai.completion import CompletionBuilder
from haystream.openai.deltas import DeltaMapper, Event, ToolActivity, ToolCallStarted
from haystream.openai.errors import (
    OpenAIError,
    classify_failure,
    describe_failure,
    refused_upstream,
    status_for_failure,
)
from haystream.openai.frames import DONE, PING, ChunkFramer, data_frame
from haystream.openai.messages import chat_messages
from haystream.openai.request import UTF8_BOM, ChatCompletionRequest, loads_json_body, parse_chat_request

__all__ = [
    "DONE",
    "PING",
    "UTF8_BOM",
    "ChatCompletionRequest",
    "ChunkFramer",
    "CompletionBuilder",
    "DeltaMapper",
    "Event",
    "OpenAIError",
    "ToolActivity",
    "ToolCallStarted",
    "chat_messages",
    "classify_failure",
    "data_frame",
    "describe_failure",
    "loads_json_body",
    "parse_chat_request",
    "refused_upstream",
    "status_for_failure",
]
