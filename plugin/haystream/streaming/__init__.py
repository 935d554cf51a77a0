"""The streaming core: Haystack only, no web imports."""

from haystream.streaming.channel import StreamCancelled
from haystream.streaming.loop import use_event_loop
from haystream.streaming.message import chunks_to_message
from haystream.streaming.stream import AsyncChunkStream, ChunkStream, astream, stream

__all__ = [
    "AsyncChunkStream",
    "ChunkStream",
    "StreamCancelled",
    "astream",
    "chunks_to_message",
    "stream",
    "use_event_loop",
]
