"""Running an ASGI app under a real uvicorn server in a background thread, on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import threading
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.types import Message, Receive, Scope, Send

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


class _StartupSignal:
    """The app, wrapped: its lifespan start-up tells `ServerThread.start` that the server is about to serve, and on
    which loop. uvicorn has no public start-up hook, but its lifespan protocol is public ASGI; with lifespan "off"
    the start-up is answered here and the app never sees it, as uvicorn would do."""

    def __init__(self, app: Any, lifespan: str) -> None:
        self.app = app
        self.lifespan = lifespan
        self.loop: asyncio.AbstractEventLoop | None = None
        self.settled = threading.Event()
        self.failed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        self.loop = asyncio.get_running_loop()
        if self.lifespan == "off":
            await self._answer(receive, send)
            return

        async def watched(message: Message) -> None:
            await send(message)
            if message["type"] in ("lifespan.startup.complete", "lifespan.startup.failed"):
                self.failed = message["type"] == "lifespan.startup.failed"
                self.settled.set()

        try:
            await self.app(scope, receive, watched)
        except BaseException:
            # uvicorn fails the start-up with lifespan "on"; with "auto" it serves without a lifespan.
            self.failed = self.failed or (self.lifespan == "on" and not self.settled.is_set())
            raise
        finally:
            self.settled.set()

    async def _answer(self, receive: Receive, send: Send) -> None:
        while (kind := (await receive())["type"]) == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
            self.settled.set()
        await send({"type": f"{kind}.complete"})  # lifespan.shutdown


class ServerThread:
    """Serve `app` with uvicorn in a daemon thread with its own event loop; use as a context manager.

    `port=0` binds a free port before the server starts, so `port` and `url` are known at once. uvicorn installs no
    signal handlers off the main thread; `stop()` ends the server.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        lifespan: str = "off",
        graceful_shutdown: float = 5,
        before_stop: Callable[[], None] | None = None,
        root_path: str = "",
    ) -> None:
        self.app = app
        self._root_path = root_path  # uvicorn's --root-path: every request's path arrives with it in front
        self.host = host
        self.port = port
        self._lifespan = lifespan
        self._graceful_shutdown = graceful_shutdown
        self._before_stop = before_stop
        self._server: uvicorn.Server | None = None
        self._signal: _StartupSignal | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """`http://HOST:PORT`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server's event loop while it runs."""
        return self._signal.loop if self._signal and self._server else None

    def start(self) -> ServerThread:
        """Start serving; returns once the app's lifespan has started. The socket listens from the start, so a
        client that connects before uvicorn accepts waits in the backlog."""
        if self._thread is not None:
            raise RuntimeError("already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(2048)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._signal = _StartupSignal(self.app, self._lifespan)
        config = uvicorn.Config(
            self._signal,
            log_level="warning",
            lifespan="on" if self._lifespan == "off" else self._lifespan,  # type: ignore[arg-type]  # checked by uvicorn
            access_log=False,
            timeout_keep_alive=30,
            backlog=2048,
            timeout_graceful_shutdown=math.ceil(self._graceful_shutdown),
            root_path=self._root_path,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._serve, args=(self._server, sock, self._signal), name=f"uvicorn-{self.port}", daemon=True
        )
        self._thread.start()
        if not self._signal.settled.wait(_START_TIMEOUT) or self._signal.failed or self._error is not None:
            self.stop()
            raise RuntimeError(f"server failed to start on {self.host}:{self.port}") from self._error
        return self

    def _serve(self, server: uvicorn.Server, sock: socket.socket, signal: _StartupSignal) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit from a failed start-up included
            self._error = exc
        finally:
            sock.close()
            signal.settled.set()

    def stop(self) -> None:
        """Stop gracefully and join the thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        loop = self.loop
        if self._before_stop is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._before_stop)
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            server.force_exit = True
            thread.join(_STOP_TIMEOUT)
        self._server = self._thread = self._signal = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
