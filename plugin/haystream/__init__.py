"""haystream: generator-based streaming for Haystack, served as OpenAI-compatible chat endpoints."""

from haystream.components.streaming_chat import LazyChunkStream, StreamingChatGenerator
from haystream.openai.messages import chat_messages
from haystream.streaming import (
    AsyncChunkStream,
    ChunkStream,
    StreamCancelled,
    astream,
    chunks_to_message,
    stream,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncChunkStream",
    "ChunkStream",
    "LazyChunkStream",
    "StreamCancelled",
    "StreamingChatGenerator",
    "__version__",
    "astream",
    "chat_messages",
    "chunks_to_message",
    "stream",
]
