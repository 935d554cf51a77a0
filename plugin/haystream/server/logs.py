"""Structured logs: with `HAYSTREAM_LOG_FORMAT=json`, haystream's log lines are one JSON object each, carrying the
request id (the one in `X-Request-ID` and in error envelopes) of the chat request they belong to."""

from __future__ import annotations

import contextvars
import logging
import time

import orjson

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("haystream_request_id", default=None)


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
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(log_format: str) -> None:
    """Send haystream's logs to stderr as JSON lines (`json`), or leave logging as it is (`text`)."""
    if log_format != "json":
        return
    logger = logging.getLogger("haystream")
    if any(isinstance(handler.formatter, JsonFormatter) for handler in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
