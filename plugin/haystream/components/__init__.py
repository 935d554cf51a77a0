"""Haystack components from haystream, to put in pipelines: a fast OpenAI-compatible chat generator, and a wrapper
that gives any chat generator a `stream` output socket."""

from haystream.components.openai_chat import OpenAIChatGenerator
from haystream.components.streaming_chat import LazyChunkStream, StreamingChatGenerator

__all__ = ["LazyChunkStream", "OpenAIChatGenerator", "StreamingChatGenerator"]
