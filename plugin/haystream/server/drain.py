"""Graceful drain: what the server does between SIGTERM and exit, so that no answer is cut in half.

On SIGTERM (`DrainingServer.handle_exit`): `/ready` turns 503 at once; for `drain_grace_seconds` the server keeps
accepting connections (load balancers need a moment to notice) but answers new chat and Responses requests with a 503
and `Retry-After`; then uvicorn stops listening and waits for the streams still running (and the app, at its
shutdown, for its background Responses runs). At `drain_timeout_seconds` after the signal, whatever still runs ends
properly: chat streams with an error event and `[DONE]`, Responses runs with a stored `response.failed` (see
`ResponsesEndpoint`), never a bare cut; the process exits 0. A second signal ends all of it at once and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator
from types import FrameType
from typing import Any

import uvicorn

from haystream.openai import DONE, OpenAIError, data_frame
from haystream.server import metrics
from haystream.server.asgi import Message, Send, send_error

logger = logging.getLogger("haystream.server")

_DRAINS: weakref.WeakSet[Drain] = weakref.WeakSet()  # every app's drain in this process (one, when served)


def shutdown_error(what: str) -> OpenAIError:
    """The 503 of work the server ended because it shuts down; `what` says which and what to do."""
    return OpenAIError(503, what, type="server_error", code="server_shutting_down", headers={"retry-after": "1"})


class Drain:
    """One app's drain state, the chat answers it must end if the drain times out, and what else must end then."""

    def __init__(self, grace_seconds: float, timeout_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.timeout_seconds = timeout_seconds
        self.draining = False
        self.expired = False
        self.deadline = float("inf")  # `time.monotonic()` at which the drain times out, once it has begun
        self._running: set[asyncio.Task[Any]] = set()
        self._expired: set[asyncio.Task[Any]] = set()
        self._at_timeout: list[Callable[[], None]] = []
        _DRAINS.add(self)

    @property
    def running(self) -> int:
        """Chat answers running now."""
        return len(self._running)

    def begin(self) -> None:
        """Stop taking chat and Responses requests (`/ready` says 503 from now on); running answers go on."""
        if not self.draining:
            self.draining = True
            self.deadline = time.monotonic() + self.timeout_seconds
            metrics.draining(True)
            logger.info(
                "draining: %d chat answers running; new chat and Responses requests get 503", len(self._running)
            )

    def at_timeout(self, end: Callable[[], None]) -> None:
        """Have `end` called (once, on the loop) when the drain times out: work other than chat answers that must end
        properly then (the Responses runs and streams)."""
        self._at_timeout.append(end)

    def expire(self) -> None:
        """The drain timed out (or a second signal came): end every answer still running (chat: an error event and
        `[DONE]`), and call what `at_timeout` registered. Once: a second call would interrupt the first's endings."""
        if self.expired:
            return
        self.expired = True
        if self._running:
            logger.warning("drain timeout: ending %d chat answers that are still running", len(self._running))
        for task in self._running:
            self._expired.add(task)
            task.cancel()
        for end in self._at_timeout:
            end()

    def check(self) -> None:
        """:raises OpenAIError: 503 with `Retry-After` while draining."""
        if self.draining:
            raise shutdown_error("The server is shutting down; retry on another replica.")

    async def run(self, answer: Callable[[Send], Awaitable[None]], send: Send, request_id: str) -> None:
        """Run one chat answer (in the current task); if the drain times out, end its response properly."""
        task = asyncio.current_task()
        assert task is not None
        response = _ResponseState(send)
        self._running.add(task)
        try:
            await answer(response.send)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            task.uncancel()
            await response.end_for_shutdown(request_id)
        finally:
            self._running.discard(task)
            self._expired.discard(task)


class _ResponseState:
    """Remembers how far a response got, so that a shutdown can end it the right way. One call per message."""

    __slots__ = ("_send", "ended", "started")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.ended = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif not message.get("more_body", False):
            self.ended = True
        await self._send(message)

    async def end_for_shutdown(self, request_id: str) -> None:
        error = shutdown_error(f"The server shut down before the answer was complete (request id {request_id}).")
        if self.ended:
            return
        if not self.started:
            await send_error(self._send, error, headers=[(b"x-request-id", request_id.encode())])
            return
        body = data_frame(error.to_dict()) + DONE
        await self._send({"type": "http.response.body", "body": body, "more_body": False})


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that drain a server: SIGINT, SIGTERM, and SIGHUP unless this process was started with it ignored
    (`nohup`: then hang-ups must not stop it)."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        return (signal.SIGINT, signal.SIGTERM)
    return (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM/SIGINT/SIGHUP starting a drain of this process' apps instead of closing at
    once. (uvicorn leaves SIGHUP, a closed terminal, to its default action: the process dies and cuts every stream.)
    """

    def __init__(self, config: uvicorn.Config, *, grace_seconds: float, timeout_seconds: float) -> None:
        super().__init__(config)
        self.grace_seconds = grace_seconds
        self.timeout_seconds = timeout_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    @property
    def draining(self) -> bool:
        """True once a signal has started the drain."""
        return self._draining

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            if threading.current_thread() is not threading.main_thread() or signal.SIGHUP not in stop_signals():
                yield
                return
            previous = signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining and self._loop is not None:
            # A second signal: end what still runs at once, as the drain timeout would (each with its proper end,
            # stored), so that nothing holds the exit: the app's shutdown may be waiting for background runs.
            self._loop.call_soon_threadsafe(self._expire, list(_DRAINS))
        if self._draining or self._loop is None or not self.started:
            # Not serving yet, or a second signal: exit without waiting for running responses.
            super().handle_exit(sig, frame)
            self.force_exit = self._draining or self.force_exit
            return
        self._draining = True
        # Signal handlers run between bytecodes of the loop's thread: hand the work to the loop.
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        assert self._loop is not None
        drains = list(_DRAINS)
        for drain in drains:
            drain.begin()
        self._loop.call_later(self.grace_seconds, self._stop_listening)
        self._loop.call_later(self.timeout_seconds, self._expire, drains)

    def _stop_listening(self) -> None:
        # uvicorn's shutdown: close the listening socket, close idle connections, wait for running responses.
        self.should_exit = True

    def _expire(self, drains: list[Drain]) -> None:
        for drain in drains:
            drain.expire()
