"""The ASGI app: haystream's OpenAI routes in front of hayhooks' own app.

`create_app()` builds hayhooks' app (`hayhooks.create_app()`: registry, `/status`, deploy routes, MCP as configured)
and wraps it in a pure ASGI app that answers the chat and model routes itself and hands everything else, lifespan
included, to hayhooks. Editing hayhooks' nested route list would be fragile; standing in front of it is not.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.datastructures import Headers

from haystream.openai import OpenAIError, parse_chat_request
from haystream.server.asgi import (
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    read_body,
    run_until_disconnect,
    send_error,
    send_json,
)
from haystream.server.auth import KeyCheck, check_deploy_request
from haystream.server.chat import ChatResponse, failure_error
from haystream.server.settings import ServerSettings
from haystream.server.tasks import Task, answer_as_text, detect_task, heuristic_answer
from haystream.server.wrappers import as_async_items, is_chat_wrapper, open_items

logger = logging.getLogger("haystream.server")

OPENWEBUI_PREFIX = "/openwebui"
CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODEL_PATHS = frozenset({"/v1/models", "/models"})
DEPLOY_PREFIXES = ("/deploy", "/undeploy")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class HaystreamApp:
    """Pure ASGI: chat completions and models here, the rest to hayhooks' app."""

    def __init__(self, hayhooks_app: Any, settings: ServerSettings, registry: Any) -> None:
        self.hayhooks_app = hayhooks_app
        self.settings = settings
        self.registry = registry
        self._keys = KeyCheck(settings.keys)
        self._created: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.hayhooks_app(scope, receive, send)
            return
        path = _route_path(scope)
        for_openwebui = path.startswith(OPENWEBUI_PREFIX + "/")
        if for_openwebui:
            path = path[len(OPENWEBUI_PREFIX) :]
        try:
            if path in CHAT_PATHS:
                await self._chat(scope, receive, send, for_openwebui=for_openwebui)
            elif path in MODEL_PATHS:
                await self._models(scope, send)
            elif path.startswith(DEPLOY_PREFIXES):
                await self._deploy(scope, receive, send, path)
            else:
                await self.hayhooks_app(scope, receive, send)
        except OpenAIError as error:
            await send_error(send, error)
        except ClientDisconnected:
            logger.info("client left before its request was read: %s", path)

    # routes -------------------------------------------------------------------------------------------------

    async def _models(self, scope: Scope, send: Send) -> None:
        _require_method(scope, "GET", "HEAD")
        self._authorize(scope)
        data = []
        for name in self.registry.get_names():
            if is_chat_wrapper(self.registry.get(name)):
                created = self._created.setdefault(name, _now())
                data.append({"id": name, "object": "model", "created": created, "owned_by": "haystream", "name": name})
        await send_json(send, 200, {"object": "list", "data": data})

    async def _chat(self, scope: Scope, receive: Receive, send: Send, *, for_openwebui: bool = False) -> None:
        _require_method(scope, "POST")
        self._authorize(scope)
        raw = await read_body(scope, receive, self.settings.max_body_bytes)
        request, body = parse_chat_request(raw)
        wrapper = self.registry.get(request.model)
        if wrapper is None:
            raise OpenAIError(
                404, f"The model '{request.model}' does not exist.", param="model", code="model_not_found"
            )
        if not is_chat_wrapper(wrapper):
            raise OpenAIError(
                404,
                f"The model '{request.model}' does not implement chat completions.",
                param="model",
                code="model_not_found",
            )
        request_id = _request_id(_header(scope, b"x-request-id"))
        task = detect_task(body["messages"]) if self.settings.openwebui_tasks != "pipeline" else None

        async def respond() -> None:
            try:
                if task is not None:
                    items = await self._task_items(task, wrapper, body)
                else:
                    items = await open_items(
                        wrapper,
                        model=request.model,
                        body=body,
                        headers=_headers(scope),
                        buffer_size=self.settings.stream_buffer,
                    )
            except Exception as error:
                await send_error(
                    send, failure_error(error, request_id), headers=[(b"x-request-id", request_id.encode())]
                )
                return
            response = ChatResponse(
                request,
                items,
                request_id=request_id,
                keepalive_seconds=self.settings.keepalive_seconds,
                **self._client_style(scope, for_openwebui),
            )
            await response.send(send)

        if await run_until_disconnect(respond(), receive):
            logger.info("request %s: client disconnected; the run was cancelled", request_id)

    async def _deploy(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        if not self.settings.enable_deploy:
            raise OpenAIError(
                403,
                "Deploy routes are disabled; start the server with HAYSTREAM_ENABLE_DEPLOY=true.",
                code="deploy_disabled",
            )
        if not self._keys.enabled:
            raise OpenAIError(
                403, "Deploy routes need an API key; set HAYSTREAM_API_KEYS as well.", code="deploy_needs_key"
            )
        self._authorize(scope)
        raw = await read_body(scope, receive, self.settings.max_body_bytes)
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            raise OpenAIError(400, "Malformed JSON body.", code="invalid_json") from None
        check_deploy_request(path, body)
        await self.hayhooks_app(scope, _replay(raw, receive), send)

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

    def _client_style(self, scope: Scope, for_openwebui: bool) -> dict[str, Any]:
        """Whether this client gets event lines, and how it sees an agent's tool calls."""
        is_openwebui = for_openwebui or any(name.startswith(b"x-openwebui-") for name, _ in scope.get("headers", ()))
        asked = (_header(scope, b"x-haystream-events") or "").lower() in ("1", "true", "yes")
        mode = self.settings.openwebui_events
        events = mode == "always" or (mode == "auto" and (is_openwebui or asked))
        tool_style = "details" if events and is_openwebui else self.settings.tool_trace
        return {"events": events, "tool_style": tool_style}

    def _authorize(self, scope: Scope) -> None:
        self._keys.check(_bearer_or_basic(_header(scope, b"authorization")))


def create_app(settings: ServerSettings | None = None) -> HaystreamApp:
    """Build hayhooks' app (deploying the wrappers in `settings.pipelines_dir` at startup) with haystream in front."""
    settings = settings or ServerSettings()
    from hayhooks.server.pipelines.registry import registry
    from hayhooks.settings import StartupDeployStrategy
    from hayhooks.settings import settings as hayhooks_settings

    # hayhooks reads these when its app starts; its CLI finds the server through host and port.
    hayhooks_settings.pipelines_dir = settings.pipelines_dir
    hayhooks_settings.host = settings.host
    hayhooks_settings.port = settings.port
    if "HAYHOOKS_STARTUP_DEPLOY_STRATEGY" not in os.environ:
        # hayhooks' parallel start-up imports wrapper modules from several threads at once, which races in
        # Haystack's lazy imports ("cannot import name 'ComponentTool' from 'haystack.tools'"): one at a time.
        hayhooks_settings.startup_deploy_strategy = StartupDeployStrategy.SEQUENTIAL
    from hayhooks import create_app as create_hayhooks_app

    return HaystreamApp(create_hayhooks_app(), settings, registry)


def _request_id(presented: str | None) -> str:
    """The client's `X-Request-ID` if it is a plain token (it is echoed into headers and logs), else a new one."""
    if presented and REQUEST_ID.fullmatch(presented):
        return presented
    return secrets.token_hex(8)


def _route_path(scope: Scope) -> str:
    path = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _require_method(scope: Scope, *methods: str) -> None:
    if scope["method"] not in methods:
        raise OpenAIError(405, f"Method {scope['method']} is not allowed here; use {' or '.join(methods)}.")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _headers(scope: Scope) -> Headers:
    return Headers(scope=scope)


def _bearer_or_basic(authorization: str | None) -> str | None:
    """Normalise `Basic` credentials (what hayhooks' CLI sends from ~/.netrc) to `Bearer <password>`."""
    if not authorization or not authorization.lower().startswith("basic "):
        return authorization
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return "Bearer " + decoded.partition(":")[2]


def _replay(raw: bytes, receive: Receive) -> Receive:
    """A `receive` that hands over the body already read, then passes on the real one (for the disconnect)."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay


def _now() -> int:
    return int(time.time())
