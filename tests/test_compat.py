"""The private names haystream uses from other libraries (`haystream._compat`) still exist and behave: an upgrade
that breaks one fails here, by name, instead of silently somewhere in a stream."""

from __future__ import annotations

from haystack import Pipeline, component
from haystack.dataclasses import ChatMessage, StreamingChunk
from starlette.datastructures import Headers  # resolved by hayhooks from the wrapper module's globals

from haystream import _compat


@component
class Echo:
    @component.output_types(text=str)
    def run(self, text: str) -> dict:
        return {"text": text}


def test_pipeline_input_data_distributes_flat_and_nested_inputs():
    pipe = Pipeline()
    pipe.add_component("echo", Echo())
    assert _compat.pipeline_input_data(pipe, {"text": "x"}) == {"echo": {"text": "x"}}
    assert _compat.pipeline_input_data(pipe, {"echo": {"text": "y"}}) == {"echo": {"text": "y"}}


def test_haystack_folding_normalising_and_finish_checks():
    meta = {"model": "m", "index": 0}
    message = _compat.fold_chunks_like_haystack(
        [StreamingChunk(content="a", meta=meta), StreamingChunk(content="b", finish_reason="stop", meta=meta)]
    )
    assert message.text == "ab" and message.meta["finish_reason"] == "stop" and message.meta["model"] == "m"
    assert _compat.normalize_messages("hi") == [ChatMessage.from_user("hi")]
    _compat.check_finish_reason({"finish_reason": "length", "index": 0})  # warns, does not raise


def test_llama_context_tokens_reads_the_loaded_model():
    from haystream.local import LocalChatGenerator

    generator = LocalChatGenerator()
    generator.warm_up()
    generator.run([ChatMessage.from_user("Hello!")], streaming_callback=lambda chunk: None)
    assert _compat.llama_context_tokens(generator._shared[0]) > 10


def test_sockets_support_membership():
    """`"streaming_callback" in component.__haystack_input__` is the public way to ask for a socket."""
    from haystack.components.generators.chat import OpenAIChatGenerator
    from haystack.utils import Secret

    generator = OpenAIChatGenerator(api_key=Secret.from_token("x"))
    assert "streaming_callback" in generator.__haystack_input__
    assert "nonsense" not in generator.__haystack_input__


def test_hayhooks_internals():
    from pathlib import Path

    from hayhooks import BasePipelineWrapper

    assert hasattr(_compat.hayhooks_registry(), "get") and hasattr(_compat.hayhooks_registry(), "get_names")
    assert hasattr(_compat.hayhooks_settings(), "pipelines_dir") and hasattr(_compat.hayhooks_settings(), "root_path")
    assert _compat.sequential_startup().value == "sequential"

    class Wrapper(BasePipelineWrapper):
        def setup(self) -> None: ...

        def run_chat_completion(self, model: str, messages: list, body: dict, headers: Headers | None = None): ...

    assert _compat.accepts_request_headers(Wrapper().run_chat_completion)
    files = _compat.read_pipeline_files(Path(__file__).parent / "deployable" / "echo")
    assert "pipeline_wrapper.py" in files
    tracing = _compat.hayhooks_tracing()
    assert tracing.SPAN_OPENAI_RUN == "hayhooks.openai.run"
    for name in ("build_trace_tags", "build_streaming_trace_tags", "start_trace_operation"):
        assert callable(getattr(tracing, name)), name
