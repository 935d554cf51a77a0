"""Logs: with `HAYSTREAM_LOG_FORMAT=json`, haystream's log lines are one JSON object each, carrying the request id
(the one in `X-Request-ID` and in error envelopes) of the chat request they belong to; and the access log, one line
per HTTP request."""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

from haystream.server.asgi import Message, Receive, Scope, Send

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("haystream_request_id", default=None)
ACCESS_LOGGER = logging.getLogger("haystream.access")
_ACCESS_FIELDS = ("client", "method", "path", "status", "duration_ms")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for name in _ACCESS_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(log_format: str, log_level: str = "info", *, access_log: bool = True) -> None:
    """Send haystream's logs to stderr as JSON lines (`json`), or leave logging as it is (`text`); give the access
    log its own handler (at `log_level`; off with `access_log=False`)."""
    _configure_access_log(log_format, log_level if access_log else "critical")
    if log_format != "json":
        return
    logger = logging.getLogger("haystream")
    if any(isinstance(handler.formatter, JsonFormatter) for handler in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter())
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
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s | %(levelname)-8s | %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    ACCESS_LOGGER.addHandler(handler)


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
            ACCESS_LOGGER.info(
                '%s - "%s %s HTTP/%s" %s %.1f ms%s',
                where,
                method,
                path,
                scope.get("http_version", "1.1"),
                status or "-",
                duration_ms,
                f" request_id={request_id}" if request_id else "",
                extra={
                    "client": where,
                    "method": method,
                    "path": path,
                    "status": status or None,
                    "duration_ms": duration_ms,
                },
            )
