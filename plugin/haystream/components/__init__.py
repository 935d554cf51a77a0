"""Haystack components from haystream: a fast OpenAI-compatible chat generator."""

from haystream.components.openai_chat import OpenAIChatGenerator

__all__ = ["OpenAIChatGenerator"]
