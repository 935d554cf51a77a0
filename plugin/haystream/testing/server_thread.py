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

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


class _ThreadedServer(uvicorn.Server):
    """uvicorn for a non-main thread (uvicorn installs no signal handlers there), start-up reported through a
    threading.Event."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets=sockets)
        finally:
            self._ready.set()


class ServerThread:
    """Serve `app` with uvicorn in a daemon thread with its own event loop; use as a context manager.

    `port=0` binds a free port before the server starts, so `port` and `url` are known at once.
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
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._lifespan = lifespan
        self._graceful_shutdown = graceful_shutdown
        self._before_stop = before_stop
        self._server: _ThreadedServer | None = None
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
        return self._server.loop if self._server else None

    def start(self) -> ServerThread:
        """Start serving; returns once the socket listens (and the app's lifespan has started)."""
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
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan=self._lifespan,  # type: ignore[arg-type]  # "on" | "off" | "auto", checked by uvicorn
            access_log=False,
            timeout_keep_alive=30,
            backlog=2048,
            timeout_graceful_shutdown=math.ceil(self._graceful_shutdown),
        )
        ready = threading.Event()
        self._server = _ThreadedServer(config, ready)
        self._thread = threading.Thread(
            target=self._serve, args=(self._server, sock, ready), name=f"uvicorn-{self.port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(_START_TIMEOUT) or not self._server.started:
            self.stop()
            raise RuntimeError(f"server failed to start on {self.host}:{self.port}") from self._error
        return self

    def _serve(self, server: _ThreadedServer, sock: socket.socket, ready: threading.Event) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit from a failed start-up included
            self._error = exc
        finally:
            sock.close()
            ready.set()

    def stop(self) -> None:
        """Stop gracefully and join the thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        if self._before_stop is not None and server.loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                server.loop.call_soon_threadsafe(self._before_stop)
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            server.force_exit = True
            thread.join(_STOP_TIMEOUT)
        self._server = self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
