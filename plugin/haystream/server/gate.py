"""The one gate every request passes, whoever serves its route: probes, host, origin, key, route policy, body limits.

Default deny: with keys configured, every HTTP request and WebSocket needs one, except the probes `/health` and
`/ready`, which the gate answers itself (nothing behind it is reached without a key, however the path is spelled).
The few decisions that depend on the route (deploy, docs, draw) are taken on every path the router behind could
route on — the raw path and the path without each root path, with `//` collapsed, case folded and trailing slashes
dropped — so a variant can only make the gate stricter, never open a route.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware

from haystream.openai import OpenAIError, loads_json_body
from haystream.server.asgi import (
    BoundedBody,
    ClientDisconnected,
    Message,
    Receive,
    Scope,
    Send,
    check_declared_length,
    header,
    read_body,
    replay_body,
    send_error,
    send_json,
)
from haystream.server.auth import KeyCheck, check_deploy_request, unauthorized
from haystream.server.hayhooks_errors import INTERNAL_ERROR
from haystream.server.logs import printable
from haystream.settings import ServerSettings

logger = logging.getLogger("haystream.server")

PROBES = frozenset({"/health", "/ready"})
DEPLOY_PREFIXES = ("/deploy", "/undeploy")
DOCS_PATHS = frozenset({"/docs", "/redoc", "/openapi.json"})
CALLER_KEY = "haystream.caller"  # where the gate leaves the identified `Caller` in the scope
_SLASHES = re.compile(r"//+")
_RUN_ROUTE = re.compile(r"/[^/]+/run")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape of a high or low UTF-16 surrogate
# A body's bytes with every digit as `0`, `e` and `E` as `e`, `+` kept and anything else a space: where a number may
# be beyond a float's range (a 3-digit exponent, 309 digits) is then found by substring search (linear, in C; a regex
# with those alternatives took ~0.5 s over a 4 MB body).
_NUMBER_SHAPE = bytes(
    b"0"[0] if byte in b"0123456789" else b"e"[0] if byte in b"eE" else byte if byte == b"+"[0] else b" "[0]
    for byte in range(256)
)
_PRIVATE_HEADERS = frozenset({b"authorization", b"cookie", b"proxy-authorization"})


class Gate:
    """Pure ASGI, outermost: lets a request through to `app` only when policy allows it."""

    def __init__(
        self,
        app: Any,
        settings: ServerSettings,
        *,
        root_paths: tuple[str, ...] = (),
        ready: Callable[[], bool] = lambda: True,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.settings = settings
        self._root_paths = tuple(root.rstrip("/") for root in root_paths if root.rstrip("/"))
        self._ready = ready
        self._draining = draining
        self._keys = KeyCheck(settings.keys, settings.deploy_key_list)
        self._origins = frozenset(settings.cors_origin_list)
        self._hosts = allowed_hosts(settings)
        self._entry: Any = self._guarded
        if self._origins:
            # Starlette's CORS middleware answers preflights itself (no key needed for them) and adds the headers.
            self._entry = CORSMiddleware(
                self._guarded,
                allow_origins=sorted(self._origins),
                allow_methods=["*"],
                # Any header: the OpenAI SDKs (JS in a browser too) send their own `x-stainless-*` set, which changes
                # between versions, and a preflight naming one header not listed fails the whole request. A listed
                # origin gains nothing by it: the key is still required, and cookies are not allowed.
                allow_headers=["*"],
                # Retry-After: the SDKs' backoff on a 429 or 503 reads it, and a browser hides headers not listed.
                expose_headers=["x-request-id", "retry-after"],
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        if self._origins and _is_preflight(scope):
            send = self._shaped_preflight_refusals(scope, send)
        try:
            await self._entry(scope, receive, send)
        except Exception:
            if scope["type"] != "http":
                raise
            # A fault nobody foresaw (a bug, here or in hayhooks' middleware): logged with its traceback, and the
            # client gets the envelope rather than uvicorn's plain-text 500 (if its answer has not started already).
            logger.exception("unexpected error answering %s %s", scope["method"], printable(scope["path"][:256]))
            with contextlib.suppress(Exception):
                await send_error(send, INTERNAL_ERROR)

    def _shaped_preflight_refusals(self, scope: Scope, send: Send) -> Send:
        """Starlette's CORS middleware refuses a preflight with a plain-text 400 ("Disallowed CORS origin, method"):
        the OpenAI envelope instead, a 403 `origin_not_allowed` for an origin, as its request without a preflight
        gets. Its CORS headers are kept."""
        held: Message | None = None

        async def shaped(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] == 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            failures = message.get("body", b"").decode("latin-1").removeprefix("Disallowed CORS ").split(", ")
            kept = [(n, v) for n, v in held["headers"] if n.lower() not in (b"content-type", b"content-length")]
            if "origin" in failures:
                error = _origin_not_allowed((header(scope, b"origin") or b"").decode("latin-1"))
            else:
                error = OpenAIError(
                    400,
                    f"The CORS preflight asks for what this server does not allow: {', '.join(failures)}.",
                    code="cors_not_allowed",
                )
            await send_error(send, error, headers=kept)

        return shaped

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_http = scope["type"] == "http"
        exact = self._route_paths(scope)
        if is_http and not PROBES.isdisjoint(exact):
            await self._probe(scope, send, "/ready" if "/ready" in exact else "/health")
            return
        routes = {_normalise(path) for path in exact}
        is_deploy = any(route.startswith(DEPLOY_PREFIXES) for route in routes)
        try:
            self._check_host(scope)
            self._check_origin(scope)
            caller = self._keys.identify(header(scope, b"authorization"))
            if caller is None:
                raise unauthorized()
            check_declared_length(scope, self.settings.max_body_bytes)
            if is_deploy:
                self._check_deploy(caller.can_deploy)
            elif not self.settings.enable_docs and any(r in DOCS_PATHS or r.startswith("/docs/") for r in routes):
                raise OpenAIError(404, "API docs are disabled; set HAYSTREAM_ENABLE_DOCS=true.", code="not_found")
            elif not self.settings.enable_draw and any(r.startswith("/draw") for r in routes):
                raise OpenAIError(404, "/draw is disabled; set HAYSTREAM_ENABLE_DRAW=true.", code="not_found")
        except OpenAIError as error:
            await self._refuse(scope, send, error, before_body=True)
            return
        scope[CALLER_KEY] = caller
        is_run = any(_RUN_ROUTE.fullmatch(route) for route in routes)
        if not self.settings.forward_auth_headers and is_run:
            scope["headers"] = without_private_headers(scope)  # hayhooks hands them to run_api wrappers
        if not is_http:
            await self.app(scope, receive, send)
        elif is_deploy:
            await self._deploy(scope, receive, send, min(exact, key=len))
        elif is_run and _is_json(scope):
            await self._run(scope, receive, send)
        else:
            await self._forward(scope, receive, send)

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with its body streamed as it arrives, refusing it (413, 408) past the limits."""
        body = BoundedBody(receive, send, self.settings.max_body_bytes, self.settings.body_timeout_seconds)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            if body.refusal is None:
                raise
            # The app failed on the body it was denied (it saw the client leave); the refusal says why.
        if body.refusal is not None:
            await self._refuse(scope, send, body.refusal)

    async def _deploy(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        """Deploy requests are read whole and checked (names, paths) before hayhooks sees them."""
        await self._checked_whole(scope, receive, send, lambda raw: check_deploy_request(path, _json_or_none(raw)))

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        """hayhooks' `/{name}/run` with a JSON body: read whole (hayhooks parses it whole anyway) and refused if it is
        not text. Python's `json` takes an unpaired UTF-16 surrogate escape (`"\\ud800"`) into a `str` that no
        encoder accepts: the wrapper's result, or its upstream request, then failed with a 500 and a traceback (the
        OpenAI routes refuse it with a 400 already)."""
        await self._checked_whole(scope, receive, send, check_text_json)

    async def _checked_whole(
        self, scope: Scope, receive: Receive, send: Send, check: Callable[[bytes], object]
    ) -> None:
        """Read the body whole and `check` it (an `OpenAIError` refuses the request), then pass the request on."""
        try:
            raw = await read_body(
                scope, receive, self.settings.max_body_bytes, timeout=self.settings.body_timeout_seconds
            )
            check(raw)
        except ClientDisconnected:
            logger.info("client left before its request was read: %s", printable(scope["path"]))
            return
        except OpenAIError as error:
            await self._refuse(scope, send, error)
            return
        await self.app(scope, replay_body(raw, receive), send)

    def _route_paths(self, scope: Scope) -> set[str]:
        """The paths a router behind may route this request on: as sent, and without each root path: hayhooks' and
        the server's (`uvicorn --root-path`: every path arrives with it in front, and Starlette routes without it)."""
        path = scope["path"]
        paths = {path}
        server_root = str(scope.get("root_path", "")).rstrip("/")
        for root in (*self._root_paths, server_root) if server_root else self._root_paths:
            if path.startswith(root + "/") or path == root:
                paths.add(path[len(root) :] or "/")
        return paths

    def _check_host(self, scope: Scope) -> None:
        """DNS rebinding: a page whose domain is made to resolve to this server is same-origin in the browser (no
        `Origin` check sees it), but the browser still names that domain in `Host`."""
        if self._hosts is None:
            return
        raw = header(scope, b"host")
        if raw is None:
            return  # browsers always send one
        value = raw.decode("latin-1").strip().lower()
        name = _host_name(value)
        if _is_ip(name) or value in self._hosts or _name_matches(name, self._hosts):
            return  # an address literal cannot be rebound to another server
        raise OpenAIError(
            400,
            f"Requests for the host {name[:100]!r} are not allowed; list it in HAYSTREAM_ALLOWED_HOSTS.",
            code="host_not_allowed",
        )

    def _check_origin(self, scope: Scope) -> None:
        """Browsers say where a request comes from; a page of another origin may not drive this server."""
        origin = header(scope, b"origin")
        if origin is None or "*" in self._origins:
            return
        text = origin.decode("latin-1")
        if text in self._origins:
            return
        host = (header(scope, b"host") or b"").decode("latin-1").lower()
        if host and _netloc(text) == host:
            return  # same origin (e.g. hayhooks' own /docs page, when enabled)
        raise _origin_not_allowed(text)

    def _check_deploy(self, can_deploy: bool) -> None:
        if not self.settings.enable_deploy:
            raise OpenAIError(
                403,
                "Deploy routes are disabled; start the server with HAYSTREAM_ENABLE_DEPLOY=true "
                "and HAYSTREAM_API_KEYS (or HAYSTREAM_DEPLOY_KEYS).",
                code="deploy_disabled",
            )
        if not self._keys.enabled:
            raise OpenAIError(
                403,
                "Deploy routes need a key; set HAYSTREAM_API_KEYS or HAYSTREAM_DEPLOY_KEYS as well.",
                code="deploy_needs_key",
            )
        if not can_deploy:
            raise OpenAIError(403, "This key cannot deploy; use one of HAYSTREAM_DEPLOY_KEYS.", code="deploy_forbidden")

    async def _probe(self, scope: Scope, send: Send, probe: str) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            refusal = OpenAIError(
                405, f"Method {scope['method']} is not allowed here; use GET.", headers={"allow": "GET, HEAD"}
            )
            await send_error(send, refusal)
            return
        if probe == "/health":
            await send_json(send, 200, {"status": "ok"})
        elif self._draining():
            await send_json(send, 503, {"status": "draining"})  # shutting down: not "starting", which would recover
        elif self._ready():
            await send_json(send, 200, {"status": "ready"})
        else:
            await send_json(send, 503, {"status": "starting"})

    async def _refuse(self, scope: Scope, send: Send, error: OpenAIError, *, before_body: bool = False) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accept: the client gets a 403
            return
        headers = []
        if before_body and (header(scope, b"expect") or b"").lower() == b"100-continue":
            # The client waits for "100 Continue" before sending its body, and gets this refusal instead: the body
            # will not be read (nor sent), so the connection cannot carry another request. Without saying so, the
            # client's next request on it was taken for that body, and hung.
            headers.append((b"connection", b"close"))
        await send_error(send, error, headers=headers, detail=True)


def allowed_hosts(settings: ServerSettings) -> frozenset[str] | None:
    """The host names requests may be addressed to (None: any). Unless configured: any when keys are set (a
    rebinding page cannot present one), else `localhost` (and its subdomains) and the name the server binds."""
    configured = settings.allowed_host_list
    if configured:
        return None if "*" in configured else frozenset(configured)
    if settings.keys or settings.deploy_key_list:
        return None
    bound = settings.host.lower()
    return frozenset({"localhost", ".localhost"} | (set() if _is_ip(bound) else {bound}))


def _host_name(value: str) -> str:
    """The name in a `Host` value, without its port, IPv6 brackets or trailing dot."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _name_matches(name: str, allowed: frozenset[str]) -> bool:
    if name in allowed:
        return True
    return any(entry.startswith(".") and (name.endswith(entry) or name == entry[1:]) for entry in allowed)


def _is_ip(name: str) -> bool:
    # No address literal is longer (an IPv6 one with a zone is at most ~60): longer names are not cached, so that
    # the cache holds at most 1,024 short strings whatever clients send as `Host`.
    return len(name) <= 64 and _parses_as_ip(name)


@functools.lru_cache(maxsize=1024)  # parsed per request otherwise (~8 µs)
def _parses_as_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _origin_not_allowed(origin: str) -> OpenAIError:
    return OpenAIError(
        403,
        f"Requests from the web origin {origin[:100]!r} are not allowed; list it in HAYSTREAM_CORS_ORIGINS.",
        code="origin_not_allowed",
    )


def _netloc(url: str) -> str | None:
    """The lower-cased host and port of `url`, or None for one that is not a URL: `urlsplit` raises on an unclosed
    IPv6 bracket (`http://[evil`), which was a plain-text 500, before any key was asked for."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return None


def _normalise(path: str) -> str:
    return _SLASHES.sub("/", path).lower().rstrip("/") or "/"


def without_private_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The request's headers without credentials (Authorization, Cookie): what wrappers get by default."""
    return [(name, value) for name, value in scope.get("headers", ()) if name not in _PRIVATE_HEADERS]


def _is_preflight(scope: Scope) -> bool:
    """A CORS preflight, as Starlette's middleware tells one (and answers it itself)."""
    return (
        scope["type"] == "http"
        and scope["method"] == "OPTIONS"
        and header(scope, b"origin") is not None
        and header(scope, b"access-control-request-method") is not None
    )


def _is_json(scope: Scope) -> bool:
    content_type = (header(scope, b"content-type") or b"application/json").split(b";", 1)[0].strip().lower()
    return content_type.endswith(b"json")


def check_text_json(raw: bytes) -> None:
    """Refuse (400) what Python's json (hayhooks' parser) reads but no JSON encoder writes back, which failed the
    route with a 500: an unpaired UTF-16 surrogate in a string (`\\ud800` alone), and `NaN`, `Infinity` or a number
    beyond a float's range (`1e999`). Only a body that may hold one is parsed here: one with a surrogate escape, such
    a word or a long number, or one that is not UTF-8 (Python's json also reads UTF-16 and UTF-32 bodies, and
    surrogates encoded as UTF-8 bytes). A malformed one is left to the route."""
    if json.detect_encoding(raw) == "utf-8":  # how Python's json tells UTF-16 and UTF-32 apart (by zero bytes)
        try:
            raw.decode()  # strict: refuses surrogates encoded as bytes
        except UnicodeDecodeError:
            pass
        else:
            if _SURROGATE_ESCAPE.search(raw) is None and not _may_hold_a_number_json_has_not(raw):
                return
    try:
        json.dumps(json.loads(raw, parse_constant=_not_a_json_number, parse_float=_finite), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise OpenAIError(
            400,
            "The request body holds an unpaired UTF-16 surrogate escape (such as \\ud800 without its pair), "
            "which is not text; send valid Unicode.",
            code="invalid_json",
        ) from None
    except _NotAJSONNumber:
        raise OpenAIError(
            400,
            "The request body holds NaN, Infinity or a number beyond a float's range, which is not JSON.",
            code="invalid_json",
        ) from None
    except (ValueError, RecursionError):
        return  # not JSON, or nested too deep: the route answers it as before


def _may_hold_a_number_json_has_not(raw: bytes) -> bool:
    """Whether `raw` may hold `NaN`, `Infinity` or a number beyond a float's range (it is parsed to tell)."""
    if b"NaN" in raw or b"Infinity" in raw:
        return True
    shape = raw.translate(_NUMBER_SHAPE)
    return b"e000" in shape or b"e+000" in shape or b"0" * 309 in shape


class _NotAJSONNumber(Exception):
    pass


def _not_a_json_number(_: str) -> Any:
    raise _NotAJSONNumber


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotAJSONNumber
    return value


def _json_or_none(raw: bytes) -> Any:
    if not raw:
        return None
    return loads_json_body(raw)
