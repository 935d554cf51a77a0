"""What can be streamed: a Pipeline, or a single component (any chat generator, an Agent).

A target knows which of its components stream, how to run itself once with a chunk sink injected as those
components' `streaming_callback` (sync and async twins), and where its final reply is in the result. User callbacks
that were already configured (at init or in the run inputs) keep being called next to the sink.
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

import networkx as nx
from haystack import Pipeline
from haystack.core.pipeline.base import PipelineBase
from haystack.dataclasses import ChatMessage, StreamingChunk

from haystream._compat import pipeline_input_data

SyncSink = Callable[[StreamingChunk], None]
AsyncSink = Callable[[StreamingChunk], Awaitable[None]]
StreamingComponents = Sequence[str] | Literal["all"] | None


class StreamTarget:
    """A runnable thing whose streaming components feed one chunk sink."""

    #: Names of the components whose chunks are streamed (empty for a single component).
    streamed: tuple[str, ...] = ()

    @property
    def supports_async(self) -> bool:
        """True when every streamed component can run natively on the event loop."""
        raise NotImplementedError

    def run(self, sink: SyncSink) -> dict[str, Any]:
        """Run once in the calling thread; every chunk goes to `sink`."""
        raise NotImplementedError

    async def run_async(self, sink: AsyncSink) -> dict[str, Any]:
        """Run once on the event loop; every chunk is awaited into `sink`."""
        raise NotImplementedError

    def reply(self, result: dict[str, Any]) -> ChatMessage | None:
        """The final `ChatMessage` in a run's result, if there is one."""
        raise NotImplementedError


def resolve_target(
    target: Any,
    data: dict[str, Any] | None,
    *,
    messages: list[ChatMessage] | None,
    streaming_components: StreamingComponents,
    run_kwargs: dict[str, Any],
) -> StreamTarget:
    """Pick the target kind for `target` and validate everything that can be checked before running."""
    if isinstance(target, type):  # its run() looks streamable, and the first call fails for want of `self`
        raise TypeError(f"Cannot stream the class {target.__name__}: pass an instance, e.g. {target.__name__}(...).")
    if data is not None and not isinstance(data, Mapping):
        raise TypeError(f"data must be a dict of run inputs, not {type(data).__name__}.")
    if isinstance(target, PipelineBase):
        return PipelineTarget(
            target, data, messages=messages, streaming_components=streaming_components, run_kwargs=run_kwargs
        )
    if streaming_components is not None:
        raise ValueError("streaming_components applies to Pipelines only; a single component always streams.")
    return ComponentTarget(target, data, messages=messages, run_kwargs=run_kwargs)


class PipelineTarget(StreamTarget):
    """A Haystack `Pipeline`.

    By default the streamed components are the pipeline's *final* streaming components: those that accept a
    `streaming_callback` and have no other such component downstream of them (components in the same loop count as
    one). In `retriever -> prompt -> llm -> answer_builder` that is `llm`; in `llm_a -> prompt -> llm_b` it is
    `llm_b`; two parallel final generators both stream. Pass `"all"` or a list of names to choose otherwise.
    """

    def __init__(
        self,
        pipeline: PipelineBase,
        data: dict[str, Any] | None,
        *,
        messages: list[ChatMessage] | None,
        streaming_components: StreamingComponents,
        run_kwargs: dict[str, Any],
    ) -> None:
        self._pipeline = pipeline
        plan = _plan_for(pipeline, streaming_components)
        self.streamed = plan.streamed
        self._supports_async = plan.supports_async
        # Pipeline.run deep-copies its inputs itself: only flat inputs need Haystack's normalisation (another copy).
        self._data = _nested_inputs(pipeline, data)
        if messages is not None:
            if not plan.message_receivers:
                raise ValueError(
                    "messages= was given but no component of the pipeline has an unconnected 'messages' input."
                )
            for name in plan.message_receivers:
                self._data.setdefault(name, {}).setdefault("messages", messages)
        self._run_kwargs = dict(run_kwargs)
        # The streamed components' outputs are kept so that `reply` finds them even when they feed other components.
        self._run_kwargs["include_outputs_from"] = set(run_kwargs.get("include_outputs_from") or ()) | set(
            self.streamed
        )

    @property
    def supports_async(self) -> bool:
        return self._supports_async

    def run(self, sink: SyncSink) -> dict[str, Any]:
        run: Callable[..., dict[str, Any]] = self._pipeline.run  # type: ignore[attr-defined]  # Pipeline and AsyncPipeline alike
        return run(self._inputs(sink, sync_forwarder), **self._run_kwargs)

    async def run_async(self, sink: AsyncSink) -> dict[str, Any]:
        assert isinstance(self._pipeline, Pipeline)
        return await self._pipeline.run_async(self._inputs(sink, async_forwarder), **self._run_kwargs)

    def reply(self, result: dict[str, Any]) -> ChatMessage | None:
        for name in reversed(self.streamed):
            message = _reply_from_output(result.get(name))
            if message is not None:
                return message
        return None

    def _inputs(self, sink: Any, make_forwarder: Callable[[Any, Any], Any]) -> dict[str, dict[str, Any]]:
        data = {name: dict(inputs) for name, inputs in self._data.items()}  # the caller's dicts stay untouched
        for name in self.streamed:
            inputs = data.setdefault(name, {})
            user_callback = inputs.get("streaming_callback") or getattr(
                self._pipeline.get_component(name), "streaming_callback", None
            )
            inputs["streaming_callback"] = make_forwarder(sink, user_callback)
        return data


class ComponentTarget(StreamTarget):
    """A single component whose `run` takes a `streaming_callback`: any chat generator, or an `Agent`."""

    def __init__(
        self,
        component: Any,
        data: dict[str, Any] | None,
        *,
        messages: list[ChatMessage] | None,
        run_kwargs: dict[str, Any],
    ) -> None:
        if not _accepts_streaming_callback(component):
            raise TypeError(
                f"Cannot stream {type(component).__name__}: expected a Pipeline, an Agent or a component whose run() "
                "takes a streaming_callback (every chat generator does)."
            )
        self._component = component
        self._inputs = {**(data or {}), **run_kwargs}
        if messages is not None:
            self._inputs["messages"] = messages
        self._user_callback = self._inputs.pop("streaming_callback", None) or getattr(
            component, "streaming_callback", None
        )

    @property
    def supports_async(self) -> bool:
        return _supports_async(self._component)

    def run(self, sink: SyncSink) -> dict[str, Any]:
        if hasattr(self._component, "warm_up"):
            self._component.warm_up()
        return self._component.run(**self._inputs, streaming_callback=sync_forwarder(sink, self._user_callback))

    async def run_async(self, sink: AsyncSink) -> dict[str, Any]:
        if hasattr(self._component, "warm_up_async"):
            await self._component.warm_up_async()
        elif hasattr(self._component, "warm_up"):
            # Warm-up may load a model; keep it off the loop (once per stream, not per chunk).
            await asyncio.to_thread(self._component.warm_up)
        callback = async_forwarder(sink, self._user_callback)
        return await self._component.run_async(**self._inputs, streaming_callback=callback)

    def reply(self, result: dict[str, Any]) -> ChatMessage | None:
        return _reply_from_output(result)


def sync_forwarder(sink: SyncSink, user_callback: Callable[[StreamingChunk], Any] | None) -> SyncSink:
    """A streaming callback that feeds `sink` and then the user's own callback."""
    if user_callback is not None and inspect.iscoroutinefunction(user_callback):
        raise ValueError("An async streaming_callback cannot be used with stream(); use astream() instead.")

    # A closure, not a bound method or callable object: Pipeline.run deep-copies its inputs, which would copy the
    # object (and its state) but leaves functions alone.
    def forward(chunk: StreamingChunk) -> None:
        sink(chunk)
        if user_callback is not None:
            user_callback(chunk)

    return forward


def async_forwarder(sink: AsyncSink, user_callback: Callable[[StreamingChunk], Any] | None) -> AsyncSink:
    """An async streaming callback that feeds `sink` and then the user's own (sync or async) callback."""
    user_is_async = user_callback is not None and inspect.iscoroutinefunction(user_callback)

    async def forward(chunk: StreamingChunk) -> None:
        await sink(chunk)
        if user_callback is not None:
            if user_is_async:
                await user_callback(chunk)
            else:
                user_callback(chunk)

    return forward


def _instances(pipeline: PipelineBase) -> list[tuple[str, Any]]:
    return [(name, pipeline.get_component(name)) for name in pipeline.graph.nodes]


def _accepts_streaming_callback(component: Any) -> bool:
    sockets = getattr(component, "__haystack_input__", None)
    if sockets is not None:
        return "streaming_callback" in sockets
    run = getattr(component, "run", None)
    return run is not None and "streaming_callback" in inspect.signature(run).parameters


def _supports_async(component: Any) -> bool:
    if not getattr(component, "__haystack_supports_async__", hasattr(component, "run_async")):
        return False
    # An Agent (or a wrapper) over a sync-only chat generator would hand an async callback to that generator's run().
    inner = getattr(component, "chat_generator", None)
    return inner is None or _supports_async(inner)


def _select_streamed(
    pipeline: PipelineBase, capable: list[str], streaming_components: StreamingComponents
) -> tuple[str, ...]:
    if isinstance(streaming_components, str) and streaming_components != "all":
        raise ValueError(f"streaming_components must be None, 'all' or a list of names, not {streaming_components!r}")
    if not capable:
        # It would run to its end and stream nothing: a wrapper would answer every request with an empty reply.
        names = ", ".join(sorted(pipeline.graph.nodes)) or "none"
        raise ValueError(
            f"Nothing in this pipeline can stream: no component takes a streaming_callback (components: {names})."
        )
    if streaming_components is None:
        return _final_components(pipeline, capable)
    if streaming_components == "all":
        return tuple(capable)
    requested = list(streaming_components)
    if not requested:
        raise ValueError("streaming_components is empty: nothing would stream (None streams the final generator).")
    unknown = sorted(set(requested) - set(pipeline.graph.nodes))
    if unknown:
        raise ValueError(f"Unknown components in streaming_components: {unknown}")
    not_streaming = sorted(set(requested) - set(capable))
    if not_streaming:
        raise ValueError(f"These components do not take a streaming_callback: {not_streaming}")
    return tuple(name for name in capable if name in requested)


def _final_components(pipeline: PipelineBase, capable: list[str]) -> tuple[str, ...]:
    downstream = {name: nx.descendants(pipeline.graph, name) for name in capable}

    def feeds_another(name: str) -> bool:
        return any(other in downstream[name] and name not in downstream[other] for other in capable if other != name)

    return tuple(name for name in capable if not feeds_another(name))


class _PipelinePlan:
    """What a pipeline's streams need to know about its graph, worked out once per pipeline and choice."""

    __slots__ = ("message_receivers", "streamed", "supports_async")

    def __init__(self, pipeline: PipelineBase, streaming_components: StreamingComponents) -> None:
        capable = [name for name, instance in _instances(pipeline) if _accepts_streaming_callback(instance)]
        self.streamed = _select_streamed(pipeline, capable, streaming_components)
        self.supports_async = isinstance(pipeline, Pipeline) and all(
            _supports_async(pipeline.get_component(name)) for name in self.streamed
        )
        self.message_receivers = tuple(name for name, sockets in pipeline.inputs().items() if "messages" in sockets)


# Per pipeline: {(choice of streaming components, graph shape): plan}. Building a plan walks the graph (networkx
# descendants, input sockets); a server does it for every request otherwise. Pipelines compare by value and are not
# hashable, so the cache is keyed by identity, and an entry goes when its pipeline does.
_plans: dict[int, tuple[weakref.ref[PipelineBase], dict[tuple[Any, ...], _PipelinePlan]]] = {}


def _plan_for(pipeline: PipelineBase, streaming_components: StreamingComponents) -> _PipelinePlan:
    choice = (
        streaming_components
        if streaming_components is None or isinstance(streaming_components, str)
        else (tuple(streaming_components))
    )
    graph = pipeline.graph
    key = (choice, tuple(graph), len(graph.edges))  # a pipeline still being built changes its key
    entry = _plans.get(id(pipeline))
    if entry is None or entry[0]() is not pipeline:
        try:
            entry = _plans[id(pipeline)] = (weakref.ref(pipeline, _forget(id(pipeline))), {})
        except TypeError:  # not weak-referenceable: no cache
            return _PipelinePlan(pipeline, streaming_components)
    plans = entry[1]
    plan = plans.get(key)
    if plan is None:
        if len(plans) > 16:  # a pipeline reshaped many times: forget old shapes
            plans.clear()
        plan = plans[key] = _PipelinePlan(pipeline, streaming_components)
    return plan


def _forget(pipeline_id: int) -> Callable[[weakref.ref[PipelineBase]], None]:
    def forget(ref: weakref.ref[PipelineBase]) -> None:
        entry = _plans.get(pipeline_id)
        if entry is not None and entry[0] is ref:  # not a newer pipeline that got the same id
            del _plans[pipeline_id]

    return forget


def _nested_inputs(pipeline: PipelineBase, data: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """`data` as `{component: {input: value}}` (shallow copies); flat inputs are resolved by Haystack."""
    if not data:
        return {}
    if all(isinstance(value, dict) and name in pipeline.graph.nodes for name, value in data.items()):
        return {name: dict(inputs) for name, inputs in data.items()}
    return pipeline_input_data(pipeline, dict(data))


def _reply_from_output(output: Any) -> ChatMessage | None:
    if not isinstance(output, dict):
        return None
    replies = output.get("replies")
    if isinstance(replies, list) and replies and isinstance(replies[-1], ChatMessage):
        return replies[-1]
    last = output.get("last_message")
    return last if isinstance(last, ChatMessage) else None
