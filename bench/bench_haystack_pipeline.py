"""What Haystack's `Pipeline.run_async` costs per run around one chat component, and where that CPU goes.

The HTTP bench (`bench_http.py`) shows a burst of 200 streams reaching its first tokens only once the server has
spent every request's setup CPU, so the TTFT p99 of the `Pipeline` rows is that sum. This script isolates the
`Pipeline`'s share of it, without sockets or an upstream: one component with a chat generator's inputs, whose
`run_async` returns at once a reply shaped like a chat generator's (text, model, finish reason, usage), run with
the inputs `haystream.astream` passes (the messages and an async `streaming_callback`).

It prints, in µs of CPU per run (median of several repetitions):

- the component's `run_async` called directly, and inside a one-component `Pipeline`, and the difference;
- the parts of that difference that can be timed on their own, with Haystack's own functions and the inputs and
  output of one run: the deep copies it makes (each input value on entry, the component's inputs before it runs,
  its output after), of which the runtime `Component` protocol checks made on every copied leaf; and the component
  span (its tags are built whether a tracer is enabled or not);
- the rest: scheduling, the component's task, queues, input checks.

Run: ``python bench/bench_haystack_pipeline.py`` (a few seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

import haystack
from haystack import Pipeline, component
from haystack.core.component import Component
from haystack.core.pipeline.base import PipelineBase
from haystack.core.pipeline.utils import _deepcopy_with_exceptions
from haystack.dataclasses import ChatMessage, StreamingCallbackT, StreamingChunk
from haystack.tools import Tool, Toolset, ToolsType


@component
class Replier:
    """A chat component that answers at once, with a chat generator's inputs and the reply one gives."""

    def __init__(self) -> None:
        component.set_input_type(self, "messages", list[ChatMessage] | str)
        for name, type_ in (
            ("streaming_callback", StreamingCallbackT | None),
            ("generation_kwargs", dict[str, Any] | None),
            ("tools", ToolsType | None),
            ("tools_strict", bool | None),
        ):
            component.set_input_type(self, name, type_, default=None)

    @component.output_types(replies=list[ChatMessage])
    def run(self, **inputs: Any) -> dict[str, Any]:
        return {"replies": [_reply()]}

    @component.output_types(replies=list[ChatMessage])
    async def run_async(self, **inputs: Any) -> dict[str, Any]:
        return {"replies": [_reply()]}


def _reply() -> ChatMessage:
    usage = {"completion_tokens": 50, "prompt_tokens": 12, "total_tokens": 62}
    return ChatMessage.from_assistant(
        "An answer.", meta={"model": "fake", "index": 0, "finish_reason": "stop", "usage": usage}
    )


async def _on_chunk(chunk: StreamingChunk) -> None:
    pass


def _leaves(value: Any) -> list[Any]:
    """What Haystack's copy checks against `Component`, `Tool` and `Toolset`: everything but lists, tuples, sets and
    dicts, which it walks into."""
    if isinstance(value, list | tuple | set):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return [value]


def _cpu_per_call(call: Callable[[], Any], runs: int) -> float:
    start = time.process_time()
    for _ in range(runs):
        call()
    return (time.process_time() - start) / runs * 1e6


async def _cpu_per_await(call: Callable[[], Awaitable[Any]], runs: int) -> float:
    start = time.process_time()
    for _ in range(runs):
        await call()
    return (time.process_time() - start) / runs * 1e6


async def _measure(runs: int, repeats: int) -> dict[str, float]:
    replier = Replier()
    pipeline = Pipeline()
    pipeline.add_component("llm", replier)
    messages = [ChatMessage.from_user("Tell me something.")]
    inputs = {"messages": messages, "streaming_callback": _on_chunk}
    output = {"replies": [_reply()]}
    # The copies one run makes: each input value on entry, the component's inputs, its output.
    copied: list[Any] = [*inputs.values(), inputs, output]
    leaves = [leaf for value in copied for leaf in _leaves(value)]

    def copies() -> None:
        for value in copied:
            _deepcopy_with_exceptions(value)

    def protocol_checks() -> None:
        for leaf in leaves:
            isinstance(leaf, Component | Tool | Toolset)

    def span() -> None:
        with PipelineBase._create_component_span(component_name="llm", instance=replier, inputs=inputs):
            pass

    samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        row = {
            "component": await _cpu_per_await(lambda: replier.run_async(**inputs), runs),
            "pipeline": await _cpu_per_await(lambda: pipeline.run_async({"llm": inputs}), runs),
            "copies": _cpu_per_call(copies, runs),
            "protocol checks": _cpu_per_call(protocol_checks, runs),
            "span": _cpu_per_call(span, runs),
        }
        for name, value in row.items():
            samples.setdefault(name, []).append(value)
    result = {name: statistics.median(values) for name, values in samples.items()}
    result["checks per run"] = len(leaves)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000, help="runs per measurement (default 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per row; the median is printed")
    args = parser.parse_args()
    if args.runs < 1 or args.repeats < 1:
        parser.error("--runs and --repeats must be at least 1")
    result = asyncio.run(_measure(args.runs, args.repeats))
    overhead = result["pipeline"] - result["component"]
    rest = overhead - result["copies"] - result["span"]
    print(f"# Python {platform.python_version()}, haystack-ai {haystack.__version__}; µs of CPU per run")
    print(f"{'component.run_async, called directly':52s} {result['component']:7.1f}")
    print(f"{'the same in a one-component Pipeline.run_async':52s} {result['pipeline']:7.1f}")
    print(f"{'  the Pipeline around it':52s} {overhead:7.1f}  100%")
    for label, value in (
        ("    deep copies of inputs and output", result["copies"]),
        (
            f"      of which {int(result['checks per run'])} runtime Component protocol checks",
            result["protocol checks"],
        ),
        ("    the component span (tags built without a tracer)", result["span"]),
        ("    the rest: scheduling, the component's task, queues", rest),
    ):
        print(f"{label:52s} {value:7.1f}  {value / overhead:4.0%}")


if __name__ == "__main__":
    main()
