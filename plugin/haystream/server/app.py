"""The ASGI app: haystream's OpenAI routes in front of hayhooks' own app, all behind one gate.

`create_app()` builds hayhooks' app (`hayhooks.create_app()`: registry, `/status`, deploy routes, MCP as configured)
and wraps it in a pure ASGI app that answers the chat and model routes itself and hands everything else, lifespan
included, to hayhooks. Editing hayhooks' nested route list would be fragile; standing in front of it is not. The
`Gate` (auth, origin, route policy, body limits) stands in front of both.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import gc
import inspect
import logging
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from pydantic import TypeAdapter
from starlette.datastructures import Headers

from haystream._compat import hayhooks_registry, sequential_startup
from haystream._compat import hayhooks_settings as hayhooks_settings_object
from haystream.openai import OpenAIError, parse_chat_request
from haystream.openai.request import check_bounds
from haystream.openai.responses import input_items, parse_responses_request
from haystream.openwebui.activity import ClientStyle, client_style
from haystream.openwebui.tasks import Task, answer_as_text, detect_task, heuristic_answer
from haystream.server import logs, metrics, tracing
from haystream.server.asgi import (
    ClientDisconnected,
    Message,
    Receive,
    Scope,
    Send,
    check_json_body,
    header,
    read_body,
    run_until_disconnect,
    send_error,
    send_json,
)
from haystream.server.auth import ANONYMOUS, Caller
from haystream.server.chat import ChatResponse, failure_error
from haystream.server.drain import Drain
from haystream.server.gate import CALLER_KEY, Gate, allowed_hosts, without_private_headers
from haystream.server.hayhooks_errors import INTERNAL_ERROR, openai_shaped_errors
from haystream.server.limits import StreamLimits
from haystream.server.redirects import relative_redirects
from haystream.server.response_store import create_store
from haystream.server.responses import ResponsesEndpoint, wrapper_body
from haystream.server.wrappers import (
    as_async_items,
    is_async_chat_wrapper,
    is_chat_wrapper,
    is_responses_wrapper,
    open_items,
    open_response_items,
)
from haystream.settings import ServerSettings

logger = logging.getLogger("haystream.server")

OPENWEBUI_PREFIX = "/openwebui"
CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODEL_PATHS = frozenset({"/v1/models", "/models"})
MODEL_PATH = re.compile(r"/(?:v1/)?models/([^/]{1,256})")
RESPONSES_PATHS = frozenset({"/v1/responses", "/responses"})
RESPONSE_PATH = re.compile(r"/(?:v1/)?responses/([A-Za-z0-9_-]{1,128})(?:/(cancel|input_items))?")
METRICS_PATH = "/metrics"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SLASHES = re.compile(r"//+")
# The apps between their lifespan's start-up and shutdown in this process (see `HaystreamApp._claim_registry`).
_live_apps: weakref.WeakSet[HaystreamApp] = weakref.WeakSet()
_live_apps_lock = threading.Lock()


class HaystreamApp:
    """Pure ASGI: chat completions and models here, the rest to hayhooks' app."""

    def __init__(self, hayhooks_app: Any, settings: ServerSettings, registry: Any, *, root_path: str = "") -> None:
        self.hayhooks_app = hayhooks_app
        # hayhooks' router also routes `/{root}/v1/chat/completions` (its own chat route, past every haystream
        # limit): haystream's routes answer under the root path too.
        self._root_path = root_path.rstrip("/")
        self.settings = settings
        self._redacted = settings.secrets  # every key, redacted from error messages (made once, not per request)
        self.registry = registry
        self.limits = StreamLimits(settings.max_streams, settings.max_streams_per_key)
        self.ready = False  # True once hayhooks' lifespan has deployed the wrappers
        self.load_failures: dict[str, str] = {}  # wrapper folders that did not deploy at startup, and why
        self.drain = Drain(settings.drain_grace_seconds, settings.drain_timeout)
        self._created: dict[str, int] = {}
        self.responses = ResponsesEndpoint(
            create_store(
                settings.redis_url,
                settings.responses_ttl_seconds,
                settings.responses_max_stored,
                settings.responses_max_stored_bytes,
                max_streams=settings.max_streams,
            ),
            drain=self.drain,
            keepalive_seconds=settings.keepalive_seconds,
            send_timeout_seconds=settings.send_timeout_seconds,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            receive = self._finish_runs_at_shutdown(self._claim_registry(receive))
            await self.hayhooks_app(scope, receive, self._watch_lifespan(send))
            return
        if scope["type"] != "http":
            await self.hayhooks_app(scope, receive, send)
            return
        path = _route_path(scope, self._root_path)
        for_openwebui = path.startswith(OPENWEBUI_PREFIX + "/")
        if for_openwebui:
            path = path[len(OPENWEBUI_PREFIX) :]
        try:
            if path in CHAT_PATHS:
                await self._chat(scope, receive, send, for_openwebui=for_openwebui)
            elif path in MODEL_PATHS:
                await self._models(scope, send)
            elif scope["method"] in ("GET", "HEAD") and (match := MODEL_PATH.fullmatch(path)):
                # GET only: hayhooks routes `POST /{name}/run` for a wrapper that may be called `models`.
                await self._model(send, match.group(1))
            elif path == METRICS_PATH and not for_openwebui:
                await self._metrics(scope, send)
            elif path in RESPONSES_PATHS:
                await self._create_response(scope, receive, send, for_openwebui=for_openwebui)
            elif match := RESPONSE_PATH.fullmatch(path):
                await self._response(scope, receive, send, match.group(1), action=match.group(2))
            else:
                shaped = openai_shaped_errors(scope, relative_redirects(scope, send), self._redacted)
                await self.hayhooks_app(scope, receive, shaped)
        except OpenAIError as error:
            if path in CHAT_PATHS:
                metrics.refused(_chat_route(for_openwebui), error.status)
                tracing.record_refusal(error.status, error.message)
            await send_error(send, error)
        except ClientDisconnected:
            # The client left, or the gate stopped the body at its size or time limit (and answers 413/408 itself).
            logger.debug("request body not read to its end (client left or body limit): %s", logs.printable(path))
        except Exception:
            # A fault nobody foresaw (a bug): logged with its traceback, and the client gets the OpenAI envelope, not
            # uvicorn's plain-text 500. If the response had started, uvicorn closes the connection when we return.
            logger.exception("unexpected error answering %s %s", scope["method"], logs.printable(path[:256]))
            with contextlib.suppress(Exception):
                await send_error(send, INTERNAL_ERROR)

    # routes -------------------------------------------------------------------------------------------------

    def _claim_registry(self, receive: Receive) -> Receive:
        """hayhooks' registry is process-wide, and its start-up deploy skips every name already in it: a server
        started after another one in the same process stopped (tests, `ServerThread`) served that server's wrapper
        objects, not its own folder's, and had no `/{name}/run` routes. The first app to start in a process with
        none running starts from an empty registry; apps running side by side still share one."""

        async def watched() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                with _live_apps_lock:
                    if not _live_apps:
                        self.registry.clear()
                    _live_apps.add(self)
            elif message["type"] == "lifespan.shutdown":
                with _live_apps_lock:
                    _live_apps.discard(self)
            return message

        return watched

    def _finish_runs_at_shutdown(self, receive: Receive) -> Receive:
        """Let the Responses runs still going finish (while draining, until its timeout) before hayhooks hears of the
        shutdown: background runs use its wrappers, and no connection keeps uvicorn waiting for them."""

        async def watched() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.responses.finish_runs()
            return message

        return watched

    def _watch_lifespan(self, send: Send) -> Send:
        async def watched(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.load_failures = _load_failures(Path(self.settings.pipelines_dir), self.registry)
                for name, reason in self.load_failures.items():
                    logger.error("wrapper %r did not load: %s", name, reason)
                await self.responses.start()
                if self.settings.gc_freeze:
                    # What importing and deploying made lives as long as the process: keeping it out of every full
                    # collection means those walk only what requests made (~75k objects, not ~270k, in one run).
                    gc.freeze()
                if self.settings.gc_threshold:
                    # Every live stream holds a few hundred young objects: at Python's 700 allocations per pass, many
                    # live streams are walked again and again before they age (bench, 1,000 slow streams: ~10% less
                    # CPU per chunk, TTFT p99 ~1.45 -> ~1.2 s; RSS per stream unchanged).
                    gc.set_threshold(self.settings.gc_threshold, *gc.get_threshold()[1:])
                self.ready = True
            elif message["type"].startswith("lifespan.shutdown"):
                self.ready = False
                await self.responses.close()
            await send(message)

        return watched

    async def _models(self, scope: Scope, send: Send) -> None:
        _require_method(scope, "GET", "HEAD")
        names = [name for name in self.registry.get_names() if is_chat_wrapper(self.registry.get(name))]
        data = [self._model_entry(name) for name in names]
        await send_json(send, 200, {"object": "list", "data": data})

    async def _model(self, send: Send, name: str) -> None:
        """`GET /v1/models/{id}` (the SDK's `models.retrieve`): one entry of the list, or 404."""
        if not is_chat_wrapper(self.registry.get(name)):
            raise _model_not_found(name)
        await send_json(send, 200, self._model_entry(name))

    def _model_entry(self, name: str) -> dict[str, Any]:
        created = self._created.setdefault(name, _now())
        return {"id": name, "object": "model", "created": created, "owned_by": "haystream", "name": name}

    async def _metrics(self, scope: Scope, send: Send) -> None:
        _require_method(scope, "GET", "HEAD")
        body, content_type = metrics.scrape()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type.encode())]}
        )
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The request's body, whole. Its time is the gate's to bound (`BoundedBody`, from the request's start, which
        answers 408): a second timer here never fired first, and cost ~10 µs a request."""
        return await read_body(scope, receive, self.settings.max_body_bytes)

    async def _chat(self, scope: Scope, receive: Receive, send: Send, *, for_openwebui: bool = False) -> None:
        _require_method(scope, "POST")
        self.drain.check()  # 503 while shutting down
        raw = await self._read_body(scope, receive)
        check_json_body(scope, raw)
        request, body = parse_chat_request(raw, self.settings.max_messages, self.settings.max_content_parts)
        for field, asked_tokens in (
            ("max_tokens", request.max_tokens),
            ("max_completion_tokens", request.max_completion_tokens),
        ):
            if (asked_tokens or 0) > self.settings.max_tokens:
                raise OpenAIError(
                    400,
                    f"{field} is {asked_tokens}; this server allows at most {self.settings.max_tokens}.",
                    param=field,
                    code="max_tokens_too_large",
                )
        wrapper = self.registry.get(request.model)
        if wrapper is None and request.model in self.load_failures:
            raise OpenAIError(
                404,
                f"The model '{request.model}' failed to load at startup: {self.load_failures[request.model]}",
                param="model",
                code="model_not_loaded",
            )
        if wrapper is None:
            raise _model_not_found(request.model)
        if not is_chat_wrapper(wrapper):
            raise OpenAIError(
                404,
                f"The model '{request.model}' does not implement chat completions.",
                param="model",
                code="model_not_found",
            )
        request_id = _request_id(header(scope, b"x-request-id"))
        logs.REQUEST_ID.set(request_id)  # for JSON log lines (each request runs in its own context)
        task = detect_task(body["messages"]) if self.settings.openwebui_tasks != "pipeline" else None
        caller: Caller = scope.get(CALLER_KEY, ANONYMOUS)
        secrets_ = self._redacted
        style = self._client_style(scope, for_openwebui)
        body["messages"] = style.history(body["messages"])  # without the tool blocks Open WebUI was shown

        async def respond(send: Send) -> None:
            try:
                if task is not None:
                    items = await self._task_items(task, wrapper, body)
                else:
                    items = await open_items(
                        wrapper,
                        model=request.model,
                        body=body,
                        headers=self._wrapper_headers(scope),
                        buffer_size=self.settings.stream_buffer,
                    )
            except Exception as error:
                await send_error(
                    send,
                    failure_error(error, request_id, secrets_),
                    headers=[(b"x-request-id", request_id.encode())],
                )
                return
            response = ChatResponse(
                request,
                items,
                request_id=request_id,
                keepalive_seconds=self.settings.keepalive_seconds,
                send_timeout_seconds=self.settings.send_timeout_seconds,
                secrets=secrets_,
                style=style,
            )
            await response.send(send)

        with self.limits.admit(caller.key_id, per_key=caller is not ANONYMOUS):
            observed = metrics.ChatObservation(send, request.model, _chat_route(for_openwebui))
            mode = "async" if is_async_chat_wrapper(wrapper) else "sync"
            trace = tracing.ChatTrace(request.model, stream=bool(request.stream), mode=mode, request_id=request_id)
            cancelled = False
            try:
                cancelled = await run_until_disconnect(self.drain.run(respond, observed.send, request_id), receive)
            finally:
                observed.finish(cancelled=cancelled)
                trace.finish(
                    status=observed.status,
                    ttft=observed.ttft,
                    chunks=max(observed.chunks, 0),
                    cancelled=cancelled,
                    failed=observed.failed,
                )
            if cancelled:
                logger.info("request %s: client disconnected; the run was cancelled", request_id)

    async def _create_response(self, scope: Scope, receive: Receive, send: Send, *, for_openwebui: bool) -> None:
        _require_method(scope, "POST")
        self.drain.check()  # 503 while shutting down, as for chat
        raw = await self._read_body(scope, receive)
        check_json_body(scope, raw)
        request, body = parse_responses_request(raw, self.settings.max_messages, self.settings.max_content_parts)
        if (request.max_output_tokens or 0) > self.settings.max_tokens:
            raise OpenAIError(
                400,
                f"max_output_tokens is {request.max_output_tokens}; this server allows at most "
                f"{self.settings.max_tokens}.",
                param="max_output_tokens",
                code="max_tokens_too_large",
            )
        wrapper = self.registry.get(request.model)
        if wrapper is None or not is_responses_wrapper(wrapper):
            raise _model_not_found(request.model)
        caller: Caller = scope.get(CALLER_KEY, ANONYMOUS)
        conversation = await self.responses.conversation(request, caller.key_id)
        if request.previous_response_id:
            # The caps hold for the conversation a chain builds up, not only for each request's own input: 20 chained
            # requests of 2,000 items each held the event loop for 15 s.
            check_bounds(
                conversation,
                "previous_response_id",
                self.settings.max_messages,
                self.settings.max_content_parts,
                what="conversation (the previous response's and this input's messages)",
            )
            # And its size: a chat client sends its whole history in one body, within HAYSTREAM_MAX_BODY_BYTES; a chain
            # grew by a body's size a request, each stored record holding all of it (sized, written and sent to the
            # wrapper whole, on the event loop).
            size = len(orjson.dumps(conversation))
            if size > self.settings.max_body_bytes:
                raise OpenAIError(
                    400,
                    f"The conversation (the previous response's and this input's messages) is {size} bytes as JSON; "
                    f"this server allows at most {self.settings.max_body_bytes}, as for a chat request's body. Start "
                    "a new conversation.",
                    param="previous_response_id",
                    code="conversation_too_large",
                )
        if not conversation:
            # Chat completions refuse an empty `messages` the same way: a wrapper given none failed (a 500).
            raise OpenAIError(
                400,
                "The request has nothing to answer: send an input (text or message items) or a previous_response_id.",
                param="input",
                code="invalid_request",
            )
        system = [{"role": "system", "content": request.instructions}] if request.instructions else []
        messages = system + conversation
        style = self._client_style(scope, for_openwebui)
        # Without the tool blocks Open WebUI was shown, however the wrapper reads the conversation: as chat messages,
        # or as the request's input items (`run_response`).
        messages = style.history(messages)
        chat_body = wrapper_body(request, body, messages)
        wrapper_items = style.history(request.input) if isinstance(request.input, list) else messages[-1:]
        headers = self._wrapper_headers(scope)
        # Open WebUI sends its background tasks (title, tags, follow-ups) through a Responses connection too.
        task = detect_task(messages) if self.settings.openwebui_tasks != "pipeline" else None

        async def items() -> AsyncIterator[Any]:
            if task is not None:
                return await self._task_items(task, wrapper, chat_body)
            return await open_response_items(
                wrapper,
                model=request.model,
                input_items=wrapper_items,
                body=chat_body,
                headers=headers,
                buffer_size=self.settings.stream_buffer,
            )

        run = self.responses.new_run(
            request,
            open_items=items,
            key_id=caller.key_id,
            conversation=conversation,
            input_items=input_items(request.input),
            request_id=_request_id(header(scope, b"x-request-id")),
            style=style,
            secrets=self._redacted,
        )
        admission = self.limits.admit(caller.key_id, per_key=caller is not ANONYMOUS)
        await self.responses.create(run, receive, send, admission)

    async def _response(self, scope: Scope, receive: Receive, send: Send, id: str, *, action: str | None) -> None:
        caller: Caller = scope.get(CALLER_KEY, ANONYMOUS)
        if action == "input_items":
            _require_method(scope, "GET", "HEAD")
            await self.responses.input_items(id, caller.key_id, scope.get("query_string", b""), send)
        elif action == "cancel":
            _require_method(scope, "POST")
            admission = self.limits.admit(caller.key_id, per_key=caller is not ANONYMOUS)
            await self.responses.cancel(id, caller.key_id, send, admission=admission)
        elif scope["method"] == "DELETE":
            await self.responses.delete(id, caller.key_id, send)
        else:
            _require_method(scope, "GET", "HEAD", also=("DELETE",))
            query = scope.get("query_string", b"")
            admission = self.limits.admit(caller.key_id, per_key=caller is not ANONYMOUS)
            head = scope["method"] == "HEAD"
            await self.responses.retrieve(id, caller.key_id, query, receive, send, admission=admission, head=head)

    async def _task_items(self, task: Task, wrapper: Any, body: dict[str, Any]) -> AsyncIterator[Any]:
        """Items answering an Open WebUI background task without running the pipeline."""
        run_task = getattr(wrapper, "run_task", None) if self.settings.openwebui_tasks == "wrapper" else None
        answer: Any = None
        if run_task is not None and inspect.iscoroutinefunction(run_task):
            answer = await run_task(task.kind, body["messages"], body)
        elif run_task is not None:
            answer = await asyncio.to_thread(run_task, task.kind, body["messages"], body)
        if answer is None:  # no run_task, or it declined this task
            answer = heuristic_answer(task)
        logger.debug("answered the Open WebUI %s task without the pipeline", task.kind)
        return as_async_items(answer_as_text(answer), self.settings.stream_buffer)

    def _client_style(self, scope: Scope, for_openwebui: bool) -> ClientStyle:
        """Whether this client gets event lines, and how it sees an agent's tool calls."""
        return client_style(
            scope.get("headers", ()),
            for_openwebui=for_openwebui,
            events_mode=self.settings.openwebui_events,
            tool_trace=self.settings.tool_trace,
        )

    def _wrapper_headers(self, scope: Scope) -> Headers:
        """The request headers a wrapper may see: without credentials unless the operator opts in."""
        if self.settings.forward_auth_headers:
            return Headers(scope=scope)
        return Headers(raw=without_private_headers(scope))


def create_app(settings: ServerSettings | None = None) -> logs.AccessLog:
    """Build hayhooks' app (deploying the wrappers in `settings.pipelines_dir` at startup) with haystream in front,
    behind the gate, with the access log around it all."""
    settings = settings or ServerSettings()
    logs.configure(settings.log_format, settings.log_level, access_log=settings.access_log)
    warn_if_exposed(settings)
    registry = hayhooks_registry()
    hayhooks_settings = hayhooks_settings_object()

    # hayhooks reads these when its app starts; its CLI finds the server through host and port.
    hayhooks_settings.pipelines_dir = settings.pipelines_dir
    hayhooks_settings.host = settings.host
    hayhooks_settings.port = settings.port
    if "HAYHOOKS_STARTUP_DEPLOY_STRATEGY" not in os.environ:
        # hayhooks' parallel start-up imports wrapper modules from several threads at once, which races in
        # Haystack's lazy imports ("cannot import name 'ComponentTool' from 'haystack.tools'"): one at a time.
        hayhooks_settings.startup_deploy_strategy = sequential_startup()
    if "HAYHOOKS_TRACING_ENABLED" in os.environ:
        hayhooks_settings.tracing_enabled = TypeAdapter(bool).validate_python(os.environ["HAYHOOKS_TRACING_ENABLED"])
    else:
        # hayhooks' trace dashboard (`/traces`) keeps the spans of recent requests in process memory, and each span
        # it records costs ~100 µs on a busy server (it re-sorts its buffer): opt-in under haystream. Spans still
        # reach an enabled Haystack tracer (OpenTelemetry, Langfuse).
        hayhooks_settings.tracing_enabled = False
    if not hayhooks_settings.tracing_enabled and "HAYHOOKS_TRACING_INCLUDE_HAYSTACK_SPANS" not in os.environ:
        hayhooks_settings.tracing_include_haystack_spans = False  # mirrored into a buffer no route shows
    # CORS is the gate's business (off unless HAYSTREAM_CORS_ORIGINS): hayhooks' default of '*' must not apply.
    hayhooks_settings.cors_allow_origins = []
    hayhooks_settings.cors_allow_methods = ["GET", "POST"]
    hayhooks_settings.cors_allow_headers = ["authorization", "content-type"]
    from hayhooks import create_app as create_hayhooks_app

    app = HaystreamApp(create_hayhooks_app(), settings, registry, root_path=hayhooks_settings.root_path)
    # haystream's access log (`logs.AccessLog`) replaces uvicorn's, which hayhooks has just routed through loguru.
    # Without a handler to reach, uvicorn does not even build a line's arguments (the client, the quoted path).
    uvicorn_access = logging.getLogger("uvicorn.access")
    for handler in list(uvicorn_access.handlers):
        uvicorn_access.removeHandler(handler)
    uvicorn_access.propagate = False
    uvicorn_access.disabled = True
    gate = Gate(
        app,
        settings,
        root_paths=(hayhooks_settings.root_path,),
        ready=lambda: app.ready,
        draining=lambda: app.drain.draining,
    )
    return logs.AccessLog(gate)


def _model_not_found(name: str) -> OpenAIError:
    """The 404 for a model this server does not have; a long name is cut (it comes from the client, up to the whole
    body's size)."""
    shown = name if len(name) <= _NAME_SHOWN else name[:_NAME_SHOWN] + "…"
    return OpenAIError(404, f"The model '{shown}' does not exist.", param="model", code="model_not_found")


_NAME_SHOWN = 256


def _load_failures(pipelines_dir: Path, registry: Any) -> dict[str, str]:
    """Wrapper folders hayhooks skipped at startup, with a reason a client may see (a syntax error's place, or that
    the server may not read the file)."""
    failures: dict[str, str] = {}
    try:
        folders = sorted(pipelines_dir.iterdir()) if pipelines_dir.is_dir() else []
    except OSError as error:  # hayhooks has said why it deployed nothing; the server still starts
        logger.warning("The wrappers folder %s cannot be listed: %s", pipelines_dir, error.strerror or error)
        return failures
    for folder in folders:
        if registry.get(folder.name) is not None:
            continue
        source = folder / "pipeline_wrapper.py"
        try:
            if not source.is_file():
                continue
            code = source.read_bytes()
        except OSError as error:  # an unreadable file or folder (permissions): named, not a failed startup
            failures[folder.name] = f"{source.name} cannot be read ({error.strerror or error})"
            continue
        try:
            tree = ast.parse(code, source.name)
        except SyntaxError as error:
            failures[folder.name] = f"SyntaxError: {error.msg} ({source.name}, line {error.lineno})"
            continue
        except ValueError as error:  # null bytes
            failures[folder.name] = f"{source.name} is not Python source ({error})"
            continue
        if not _binds_name(tree, "PipelineWrapper"):
            failures[folder.name] = f"{source.name} defines no class named PipelineWrapper"
            continue
        # hayhooks logs why (its 'Skipping pipeline directory' warning) but not the traceback; the reason may hold a
        # secret (a key in setup()'s error), so the client is pointed at the log rather than told.
        failures[folder.name] = (
            "its import or setup() raised; the server log's 'Skipping pipeline directory' line says why"
        )
    return failures


def _binds_name(tree: ast.Module, name: str) -> bool:
    """Whether a module's top level defines, assigns or imports `name` (or star-imports, which may)."""
    for node in ast.walk(tree):  # nested places too (under `if`/`try`): a false "yes" only loses the detail
        if isinstance(node, ast.ClassDef) and node.name == name:
            return True
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id == name:
            return True
        if isinstance(node, ast.Import | ast.ImportFrom) and any(
            alias.name == "*" or (alias.asname or alias.name.split(".")[0]) == name for alias in node.names
        ):
            return True
    return False


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def warn_if_exposed(settings: ServerSettings) -> None:
    """Say loudly when the server listens beyond this machine without keys (unless the operator said it is meant),
    and, keyless or not meant, that clients reaching it by a name the Host check does not allow get 400."""
    if settings.host in LOOPBACK_HOSTS or settings.host.startswith("127."):
        return
    names = allowed_hosts(settings)
    refused = (
        ""
        if names is None or settings.allowed_host_list  # keys (any name passes), or names the operator listed
        else "Clients that reach it by a host name other than "
        + ", ".join(f"*{name}" if name.startswith(".") else name for name in sorted(names, key=_by_name))
        + " get 400 host_not_allowed (the DNS-rebinding guard; IP addresses pass): "
        "list the names they use in HAYSTREAM_ALLOWED_HOSTS."
    )
    if not settings.keys and not settings.allow_unauthenticated:
        logger.warning(
            "haystream listens on %s WITHOUT API keys: anyone who can reach it can run your pipelines. "
            "Set HAYSTREAM_API_KEYS, bind 127.0.0.1, or set HAYSTREAM_ALLOW_UNAUTHENTICATED=true if this is intended."
            "%s",
            settings.host,
            " " + refused if refused else "",
        )
    elif refused:
        logger.warning("haystream listens on %s without API keys. %s", settings.host, refused)


def _by_name(name: str) -> tuple[str, bool]:
    return name.lstrip("."), name.startswith(".")  # `localhost` before `*.localhost`


def _request_id(presented: bytes | None) -> str:
    """The client's `X-Request-ID` if it is a plain token (it is echoed into headers and logs), else a new one."""
    if presented and len(presented) <= 128 and REQUEST_ID.fullmatch(presented.decode("latin-1")):
        return presented.decode("latin-1")
    return secrets.token_hex(8)


def _chat_route(for_openwebui: bool) -> str:
    return OPENWEBUI_PREFIX + "/v1/chat/completions" if for_openwebui else "/v1/chat/completions"


def _route_path(scope: Scope, root_path: str = "") -> str:
    """The path to route on: repeated slashes collapsed and trailing ones dropped, then without the server's root
    path and hayhooks' (as Starlette's router does).

    Open WebUI (`OPENAI_API_BASE_URLS`: `f"{url}/chat/completions"`) and clients that format URLs themselves join a
    base URL written with a trailing slash into `.../v1//chat/completions`; `/v1/chat/completions/` would reach
    hayhooks' router, whose 307 names the `Host` the client sent. Each is served as the route it spells."""
    path = _SLASHES.sub("/", scope["path"]).rstrip("/") or "/"
    for root in (scope.get("root_path", ""), root_path):
        if root and path.startswith(root + "/"):
            path = path[len(root) :]
    return path


def _require_method(scope: Scope, *methods: str, also: tuple[str, ...] = ()) -> None:
    """405 unless the request uses one of `methods`; `also` names the route's other methods, served elsewhere, for
    the `Allow` header (which a 405 must carry, RFC 9110)."""
    if scope["method"] not in methods:
        raise OpenAIError(
            405,
            f"Method {scope['method']} is not allowed here; use {' or '.join(methods + also)}.",
            headers={"allow": ", ".join(methods + also)},
        )


def _now() -> int:
    return int(time.time())
