"""Async test wrapper: returns one of the shapes a `run_chat_completion_async` may return (picked by `mode`)."""

from __future__ import annotations

import asyncio
import json
import os
import weakref
from collections.abc import AsyncIterator
from typing import Any

from hayhooks import BasePipelineWrapper, async_streaming_generator
from hayhooks.events import create_status_event
from haystack import Pipeline
from haystack.components.agents import Agent
from haystack.components.generators.chat import OpenAIChatGenerator
from haystack.dataclasses import ChatMessage, ReasoningContent, StreamingChunk
from haystack.tools import Tool

import haystream
from haystream import components
from haystream.testing import fake_chat_generator


def llm(scenario: str, generator: str = "haystack") -> OpenAIChatGenerator:
    # `generator: "haystream"` in the body picks haystream's OpenAIChatGenerator instead of Haystack's.
    return _cached("llm", scenario, generator, lambda: _new_llm(scenario, generator))


def pipeline(scenario: str, generator: str = "haystack") -> Pipeline:
    return _cached("pipeline", scenario, generator, lambda: _new_pipeline(scenario, generator))


# Generators are cached per event loop and per fake upstream. Several test servers share this process, each on a
# loop of its own, and Haystack's generator keeps one OpenAI client, whose pooled connections belong to the loop
# that opened them: used from a second server's loop it failed ("bound to a different event loop"), in whichever
# test came second. Some test modules start a fake of their own, and a generator made for a fake that has stopped
# would fail to connect in a later module's server.
_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, ...], Any]] = weakref.WeakKeyDictionary()
_without_loop: dict[tuple[str, ...], Any] = {}


def _cached(kind: str, scenario: str, generator: str, build: Any) -> Any:
    try:
        cache = _by_loop.setdefault(asyncio.get_running_loop(), {})
    except RuntimeError:  # a sync caller
        cache = _without_loop
    key = (kind, scenario, generator, os.environ["FAKE_UPSTREAM_URL"])
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _new_llm(scenario: str, generator: str) -> OpenAIChatGenerator:
    generator_class = components.OpenAIChatGenerator if generator == "haystream" else None
    return fake_chat_generator(scenario, os.environ["FAKE_UPSTREAM_URL"], generator_class=generator_class)


def _new_pipeline(scenario: str, generator: str) -> Pipeline:
    pipe = Pipeline()
    pipe.add_component("llm", llm(scenario, generator))
    return pipe


def multiply(a: float, b: float) -> str:
    """Multiply two numbers."""
    return str(a * b)


MULTIPLY = Tool(
    name="multiply",
    description="Multiply two numbers",
    parameters={"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    function=multiply,
)


def to_messages(messages: list[dict]) -> list[ChatMessage]:
    return [ChatMessage.from_openai_dict_format(m) for m in messages]


class RateLimited(Exception):
    """Carries an HTTP status like a provider's rate-limit error does."""

    status_code = 429


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> Any:
        mode = body.get("mode", "astream")
        scenario = body.get("scenario", "fake")
        generator = body.get("generator", "haystack")
        history = to_messages(messages)
        if mode == "astream":
            return haystream.astream(pipeline(scenario, generator), messages=history)
        if mode == "client_tools":
            tools = [
                Tool(name=t["function"]["name"], description="", parameters={}, function=print) for t in body["tools"]
            ]
            return haystream.astream(llm(scenario, generator), messages=history, tools=tools)
        if mode == "agent":
            agent = Agent(chat_generator=llm(scenario, generator), tools=[MULTIPLY])
            return haystream.astream(agent, messages=history)
        if mode == "hayhooks":
            return async_streaming_generator(
                pipeline(scenario, generator), pipeline_run_args={"llm": {"messages": history}}
            )
        if mode == "string":
            return "a plain string answer"
        if mode == "echo_body":  # the chat-completions fields the wrapper was given, as its answer
            return json.dumps({key: body.get(key) for key in ("tools", "tool_choice", "response_format", "max_tokens")})
        if mode == "fail_early":
            raise ValueError("the wrapper refused this request")
        if mode == "mixed":
            return self._mixed()
        if mode == "role_then_rate_limit":
            return self._role_then_rate_limit()
        if mode == "think":
            return iter(["<think>", "weighing it", "</think>", "The answer."])
        if mode == "slow_unwind":
            return self._slow_unwind(llm(scenario, generator), history)
        raise ValueError(f"unknown mode {mode}")

    def run_task(self, task: str, messages: list[dict], body: dict) -> Any:
        """Open WebUI background tasks, when the server runs with HAYSTREAM_OPENWEBUI_TASKS=wrapper."""
        return {"title": "From the wrapper"} if task == "title" else None  # None: haystream's built-in answer

    async def _role_then_rate_limit(self) -> AsyncIterator[Any]:
        yield StreamingChunk(content="")  # what a generator's role chunk becomes: nothing a client sees
        yield {"event": {"type": "status", "data": {"description": "working", "done": False}}}
        raise RateLimited("the upstream is rate limiting")

    async def _slow_unwind(self, generator: OpenAIChatGenerator, history: list[ChatMessage]) -> AsyncIterator[Any]:
        """Yields nothing until cancelled; its clean-up then streams the scenario from the upstream, which a held
        scenario keeps going until the test releases it: a wrapper whose unwinding takes a while."""
        try:
            await asyncio.Event().wait()
            yield ""
        finally:
            async for _ in haystream.astream(generator, messages=history):
                pass

    async def _mixed(self) -> AsyncIterator[Any]:
        yield create_status_event("working")
        yield StreamingChunk(content="", reasoning=ReasoningContent(reasoning_text="thinking..."), index=0)
        yield "plain "
        yield StreamingChunk(content="chunk ")
        yield {"event": {"type": "status", "data": {"description": "done", "done": True}}}
        yield {"choices": [{"index": 0, "delta": {"content": "dict"}, "finish_reason": None}]}
