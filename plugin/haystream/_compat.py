"""The private names of other libraries that haystream relies on, in one place.

Each has no public equivalent in the pinned versions (Haystack 3.4, hayhooks 2.1, llama-cpp-haystack 3.0):
private functions, or modules that the package does not re-export. `tests/test_compat.py` fails loudly, naming the
function, when an upgrade removes or reshapes one. hayhooks is imported lazily: the streaming core must not need it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from haystack.components.generators.chat.openai import _check_finish_reason
from haystack.components.generators.utils import _convert_streaming_chunks_to_chat_message, _normalize_messages
from haystack.core.pipeline.base import PipelineBase
from haystack.dataclasses import ChatMessage, StreamingChunk

__all__ = [
    "accepts_request_headers",
    "check_finish_reason",
    "fold_chunks_like_haystack",
    "hayhooks_registry",
    "hayhooks_settings",
    "hayhooks_tracing",
    "llama_context_tokens",
    "normalize_messages",
    "pipeline_input_data",
    "read_pipeline_files",
    "sequential_startup",
]


def pipeline_input_data(pipeline: PipelineBase, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`Pipeline.run`'s own distribution of flat or nested inputs to components (with its deep copies), so that
    `haystream.stream(pipeline, data)` accepts exactly what `pipeline.run(data)` accepts."""
    return pipeline._prepare_component_input_data(data)


def fold_chunks_like_haystack(chunks: list[StreamingChunk]) -> ChatMessage:
    """The reply Haystack's `OpenAIChatGenerator` builds from its streamed chunks (same meta, same tool-call rules)."""
    return _convert_streaming_chunks_to_chat_message(chunks=chunks)


def normalize_messages(messages: Any) -> list[ChatMessage]:
    """Haystack's normalisation of a generator's `messages` input (a str or ChatMessages)."""
    return _normalize_messages(messages)


def check_finish_reason(meta: dict[str, Any]) -> None:
    """Haystack's warnings for a reply cut by length or a content filter."""
    _check_finish_reason(meta)


def llama_context_tokens(generator: Any) -> int:
    """Tokens in a `LlamaCppChatGenerator`'s context after a run (prompt + answer): llama.cpp reports no usage when
    streaming."""
    return int(generator._model.n_tokens)


def hayhooks_registry() -> Any:
    """hayhooks' process-wide registry of deployed wrappers (`get(name)`, `get_names()`)."""
    from hayhooks.server.pipelines.registry import registry

    return registry


def hayhooks_settings() -> Any:
    """hayhooks' settings object (`HAYHOOKS_*`), which its app reads when it is built and started."""
    from hayhooks.settings import settings

    return settings


def sequential_startup() -> Any:
    """hayhooks' startup strategy that deploys wrappers one at a time."""
    from hayhooks.settings import StartupDeployStrategy

    return StartupDeployStrategy.SEQUENTIAL


def accepts_request_headers(method: Any) -> bool:
    """Whether a wrapper method opts in to the request headers (`headers: Headers | None = None`), hayhooks' rule."""
    from hayhooks.server.utils.request_headers import accepts_request_headers as accepts

    return bool(accepts(method))


def read_pipeline_files(directory: Path) -> dict[str, str]:
    """The files of a wrapper folder, as `hayhooks pipeline deploy-files` sends them to the deploy route."""
    from hayhooks.server.utils.deploy_utils import read_pipeline_files_from_dir

    return dict(read_pipeline_files_from_dir(directory))


def hayhooks_tracing() -> ModuleType:
    """hayhooks' tracing helpers (`SPAN_OPENAI_RUN`, `build_trace_tags`, ...), so chat spans look like its own."""
    import hayhooks.server.tracing as tracing

    return tracing
