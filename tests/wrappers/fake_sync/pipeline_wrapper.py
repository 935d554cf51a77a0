"""Sync test wrapper: returns one of the shapes a `run_chat_completion` may return (picked by `mode`)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from functools import cache
from typing import Any

from hayhooks import BasePipelineWrapper, streaming_generator
from haystack import Document, Pipeline
from haystack.dataclasses import ChatMessage, StreamingChunk, ToolCallDelta

import haystream
from haystream import openwebui
from haystream.streaming.loop import shared_loop
from haystream.testing import fake_chat_generator


def pipeline(scenario: str) -> Pipeline:
    # Per loop that sync streams run on, too: each test server hands haystream its own loop, and Haystack's generator
    # keeps one async OpenAI client, whose pooled connections belong to the loop that opened them (see fake_async).
    return _pipeline(scenario, os.environ["FAKE_UPSTREAM_URL"], shared_loop())


@cache  # per fake upstream too: a generator made for a fake that has stopped would fail to connect
def _pipeline(scenario: str, upstream: str, loop: asyncio.AbstractEventLoop) -> Pipeline:
    pipe = Pipeline()
    pipe.add_component("llm", fake_chat_generator(scenario, upstream))
    return pipe


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    def run_chat_completion(self, model: str, messages: list[dict], body: dict) -> Any:
        mode = body.get("mode", "stream")
        scenario = body.get("scenario", "fake")
        history = [ChatMessage.from_openai_dict_format(m) for m in messages]
        if mode == "stream":
            return haystream.stream(pipeline(scenario), messages=history)
        if mode == "generator":
            return self._relay(scenario, history)
        if mode == "hayhooks":
            return streaming_generator(pipeline(scenario), pipeline_run_args={"llm": {"messages": history}})
        if mode == "string":
            result = pipeline(scenario).run({"llm": {"messages": history}})
            return result["llm"]["replies"][0].text
        if mode == "message":  # a first-day wrapper: the reply itself, not its text
            return pipeline(scenario).run({"llm": {"messages": history}})["llm"]["replies"][0]
        if mode == "run_result":  # a first-day mistake: the whole Pipeline.run result
            return pipeline(scenario).run({"llm": {"messages": history}})
        if mode == "odd_item":  # text, then an item haystream cannot send (picked by `item`)
            return iter(["before ", {"bytes": b"raw", "error": ValueError("yielded, not raised")}[body["item"]]])
        if mode == "nameless_call":  # a generator whose tool call never names its function
            call = ToolCallDelta(index=0, id="call_x", arguments='{"a": 1}')
            return iter([StreamingChunk(content="", index=0, tool_calls=[call]), StreamingChunk(content="")])
        if mode == "events":
            return self._with_events(scenario, history)
        if mode == "whoami":
            return threading.current_thread().name
        if mode == "fail_early":
            raise ValueError("the wrapper refused this request")
        raise ValueError(f"unknown mode {mode}")

    def _with_events(self, scenario: str, history: list[ChatMessage]) -> Iterator[Any]:
        yield openwebui.status("Thinking…")
        yield from haystream.stream(pipeline(scenario), messages=history)
        yield openwebui.source(Document(content="Flan sets in 4 hours.", meta={"name": "flan.md"}))  # a citation
        yield openwebui.status("Done", done=True)

    def _relay(self, scenario: str, history: list[ChatMessage]) -> Iterator[Any]:
        with haystream.stream(pipeline(scenario), messages=history) as chunks:
            yield from chunks
