"""Logs: with `HAYSTREAM_LOG_FORMAT=json`, haystream's log lines are one JSON object each, carrying the request id
(the one in `X-Request-ID` and in error envelopes) of the chat request they belong to; the access log, one line per
HTTP request; and a serving process' stdout and stderr, written by a thread so that a log reader that stalls never
stalls the event loop."""

from __future__ import annotations

import atexit
import contextvars
import io
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

import orjson

from haystream.server.asgi import Message, Receive, Scope, Send

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("haystream_request_id", default=None)
ACCESS_LOGGER = logging.getLogger("haystream.access")
_ACCESS_FIELDS = ("client", "method", "path", "status", "duration_ms")


def printable(text: str) -> str:
    """`text` (a request path) as a log line may show it: control characters escaped. A path is percent-decoded, so a
    client without a key wrote `%0A` to start a forged log line, or `%1B[...` for a terminal escape sequence."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return _json_line(
            record.created, record.levelname, record.name, record.getMessage(), record.__dict__, exception
        )


def _json_line(
    created: float, level: str, logger: str, message: str, fields: dict[str, Any], exception: str | None = None
) -> str:
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int((created - int(created)) * 1000):03d}Z",
        "level": level.lower(),
        "logger": logger,
        "message": message,
    }
    request_id = REQUEST_ID.get()
    if request_id is not None:
        entry["request_id"] = request_id
    for name in _ACCESS_FIELDS:
        value = fields.get(name)
        if value is not None:
            entry[name] = value
    if exception:
        entry["exception"] = exception
    return orjson.dumps(entry).decode()


_TEXT_FORMAT, _TEXT_DATE_FORMAT = "%(asctime)s | %(levelname)-8s | %(message)s", "%Y-%m-%d %H:%M:%S"
_TEXT_FORMATTER = logging.Formatter(_TEXT_FORMAT, _TEXT_DATE_FORMAT)


def configure(log_format: str, log_level: str = "info", *, access_log: bool = True) -> None:
    """Send haystream's logs to stderr as JSON lines (`json`), or as text lines (`text`) unless the application has
    configured logging itself (a handler on the root logger: its own handlers then show them); give the access log
    its own handler (at `log_level`; off with `access_log=False`)."""
    _configure_access_log(log_format, log_level if access_log else "critical")
    logger = logging.getLogger("haystream")
    if log_format != "json":
        # Without a handler, Python's last resort shows warnings only: `haystream serve` hid its info lines (the
        # drain's, a client that left).
        if not logger.handlers and not logging.getLogger().handlers:
            _add_stderr_handler(logger, _TEXT_FORMATTER)
        return
    if any(isinstance(handler.formatter, JsonFormatter) for handler in logger.handlers):
        return
    _add_stderr_handler(logger, JsonFormatter())


def _add_stderr_handler(logger: logging.Logger, formatter: logging.Formatter) -> None:
    for previous in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(previous)  # one of ours at a time: text, then JSON for a later app
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (it may be replaced after configuration, as
    test runners and embedding applications do), not to the stream it was when the handler was made."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_access_log(log_format: str, log_level: str) -> None:
    ACCESS_LOGGER.setLevel(log_level.upper() if log_level.upper() in logging.getLevelNamesMapping() else "INFO")
    ACCESS_LOGGER.propagate = False
    for handler in list(ACCESS_LOGGER.handlers):
        ACCESS_LOGGER.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else _TEXT_FORMATTER)
    ACCESS_LOGGER.addHandler(handler)
    _access_output.configure(handler)


class _AccessOutput:
    """Writes access-log lines itself while the access logger is as `configure` left it (its one handler, that
    handler's formatter, no filters): exactly the line that handler would write, for ~1/10 of the CPU. A line
    through `logging` (a record, the caller's frame, the handler's lock) cost ~50 µs a request under load, a
    quarter of the serving layer's own CPU per request. Anything configured otherwise gets the records."""

    def __init__(self) -> None:
        self.handler: logging.StreamHandler[Any] | None = None
        self._formatter: logging.Formatter | None = None
        self._second = -1
        self._local_time = ""

    def configure(self, handler: logging.StreamHandler[Any]) -> None:
        self.handler, self._formatter = handler, handler.formatter

    def direct(self) -> logging.StreamHandler[Any] | None:
        """The handler to write to directly, or None when the records must go through `logging`."""
        handler = self.handler
        if (
            handler is None
            or ACCESS_LOGGER.handlers != [handler]
            or handler.formatter is not self._formatter
            or ACCESS_LOGGER.filters
            or handler.filters
            or handler.level > logging.INFO
        ):
            return None
        return handler

    def line(self, created: float, message: str, fields: dict[str, Any]) -> str:
        """The line the handler's formatter makes of an `info` record created at `created` (`time.time()`)."""
        if isinstance(self._formatter, JsonFormatter):
            return _json_line(created, "INFO", ACCESS_LOGGER.name, message, fields)
        second = int(created)
        if second != self._second:  # the formatter's `asctime`, made once a second
            self._second = second
            self._local_time = time.strftime(_TEXT_DATE_FORMAT, time.localtime(second))
        return _TEXT_FORMAT % {"asctime": self._local_time, "levelname": "INFO", "message": message}

    def write(self, handler: logging.StreamHandler[Any], message: str, fields: dict[str, Any]) -> None:
        line = self.line(time.time(), message, fields)
        try:
            handler.stream.write(line + handler.terminator)
            handler.flush()
        except (OSError, ValueError):
            pass  # the stream is closed or its reader gone: as `logging` would, the line is lost, the request is not


_access_output = _AccessOutput()


class AccessLog:
    """Pure ASGI: one access-log line per HTTP request once its response has ended (client, method, path, status,
    duration, request id).

    It replaces uvicorn's access log, which hayhooks routes through loguru (~0.35 ms of CPU per request, measured
    against this one). Streams pay one function call per chunk here, nothing more.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not ACCESS_LOGGER.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        finally:
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            method, path = scope.get("method", "-"), scope.get("path", "-")
            duration_ms = round((time.perf_counter() - started) * 1000, 1)
            request_id = REQUEST_ID.get()
            args = (
                where,
                method,
                printable(path),  # the JSON field below keeps it as sent: JSON escapes it
                scope.get("http_version", "1.1"),
                status or "-",
                duration_ms,
                f" request_id={request_id}" if request_id else "",
            )
            fields: dict[str, Any] = {
                "client": where,
                "method": method,
                "path": path,
                "status": status or None,
                "duration_ms": duration_ms,
            }
            if handler := _access_output.direct():
                _access_output.write(handler, _ACCESS_LINE % args, fields)
            else:
                ACCESS_LOGGER.info(_ACCESS_LINE, *args, extra=fields)


_ACCESS_LINE = '%s - "%s %s HTTP/%s" %s %.1f ms%s'


LINGER_SECONDS = 0.02
"""How long the writer thread waits, once a line has come, for more to go out with it."""
_BATCH_BYTES = 1 << 16  # a pipe's buffer: written at once, without waiting out the linger


class BackgroundOutput(io.TextIOBase):
    """A text stream that stands in for `sys.stdout` or `sys.stderr` in a serving process: `write` queues the text
    and returns; a daemon thread writes it to the real stream's file descriptor.

    Every log line of the process (haystream's, uvicorn's, hayhooks' loguru sink, a wrapper's `print`) is written
    from the event loop. Written straight to a pipe that nobody reads (a stalled log collector, a full `docker logs`
    buffer), the 65th KiB blocks the loop, and every stream of the process with it. Here at most `limit` characters
    wait; past that, writes are dropped and counted, and one line says how many once the stream takes output again.

    Lines go out in batches: the thread wakes for the first line and waits up to `linger` seconds for more (64 KiB
    cut it short; so does `drain`). A write, and a wake of the thread and of the reader, per line cost ~50 µs of CPU
    per request under load; a batch costs that once.
    """

    def __init__(self, real: TextIO, *, limit: int = 1 << 20, linger: float = LINGER_SECONDS) -> None:
        super().__init__()
        self._fd = real.fileno()
        self._encoding = getattr(real, "encoding", None) or "utf-8"
        self._tty = real.isatty()  # loguru and uvicorn decide on colours by it
        self._limit = limit
        self._linger = linger
        self._pending: list[str] = []
        self._size = 0
        self._dropped = 0
        self._writing = False
        self._hurried = 0  # `drain` calls waiting: the thread writes at once
        self._changed = threading.Condition()
        self.writes = 0
        """How many writes to the real stream's descriptor the thread has made."""
        self._thread = threading.Thread(target=self._write_out, name=f"haystream-output-{self._fd}", daemon=True)
        self._thread.start()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return self._tty

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            with self._changed:
                if self._size + len(text) > self._limit:
                    self._dropped += 1
                else:
                    self._pending.append(text)
                    self._size += len(text)
                    # Only the first line of a batch wakes the thread (and a full batch ends its linger): the lines
                    # in between join it without a wake each.
                    if len(self._pending) == 1 or self._size >= _BATCH_BYTES:
                        self._changed.notify()
        return len(text)

    def flush(self) -> None:
        """Returns at once: the thread writes as soon as it can (`drain` waits for it)."""

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until everything written so far is out; False if the stream stayed blocked."""
        with self._changed:
            self._hurried += 1
            self._changed.notify_all()
            try:
                return self._changed.wait_for(lambda: not self._pending and not self._writing, timeout)
            finally:
                self._hurried -= 1

    def _write_out(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending)
                if self._linger > 0:
                    self._changed.wait_for(lambda: self._hurried or self._size >= _BATCH_BYTES, self._linger)
                text = "".join(self._pending)
                self._pending.clear()
                self._size = 0
                dropped, self._dropped = self._dropped, 0
                self._writing = True
            if dropped:
                text += f"haystream: {dropped} writes to this stream were dropped while it was blocked\n"
            try:
                # os.write, not the real stream's write: a daemon thread blocked inside a buffered stream holds its
                # lock, and the interpreter aborts when it flushes that stream on exit.
                data = memoryview(text.encode(self._encoding, "backslashreplace"))
                while data:
                    data = data[os.write(self._fd, data) :]
                    self.writes += 1
            except OSError:
                pass  # the reader is gone (EPIPE) or the descriptor closed: nothing can be written any more
            with self._changed:
                self._writing = False
                self._changed.notify_all()


def write_output_in_background(*, limit: int = 1 << 20) -> bool:
    """Replace `sys.stdout` and `sys.stderr` with `BackgroundOutput`s, written out before the interpreter exits (for
    up to two seconds if a stream stays blocked). Call it before logging is configured, so that handlers pick them
    up. False, and nothing replaced, where they are not file descriptors (an embedding test runner, say)."""
    streams = (sys.stdout, sys.stderr)
    if all(isinstance(stream, BackgroundOutput) for stream in streams):
        return True
    try:
        for stream in streams:
            stream.flush()
            stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    sys.stdout, sys.stderr = (BackgroundOutput(stream, limit=limit) for stream in streams)
    atexit.register(drain_output)
    return True


def drain_output(timeout: float = 2.0) -> None:
    """Wait (up to `timeout` seconds each) until what was written to a `BackgroundOutput` stdout and stderr is out.
    Processes that end without `atexit` (multiprocessing's children) call it themselves."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, BackgroundOutput):
            stream.drain(timeout)
