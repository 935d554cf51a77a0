"""`BackgroundOutput` (a serving process' stdout and stderr, written by a thread, over a real pipe); the access log."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from typing import Any

import pytest

from haystream.server import logs
from haystream.server.logs import LINGER_SECONDS, BackgroundOutput

LINE = "x" * 99 + "\n"


def test_writes_return_while_nobody_reads_and_what_did_not_fit_is_counted():
    read_fd, write_fd = os.pipe()
    with open(write_fd, "w") as real, open(read_fd, "rb") as reader:
        output = BackgroundOutput(real, limit=100_000)
        writing = threading.Thread(target=lambda: [output.write(LINE) for _ in range(3_000)])
        writing.start()  # 300 kB: more than the pipe (64 KiB) and the limit hold together
        writing.join(30)
        assert not writing.is_alive(), "a write blocked on a pipe nobody reads"

        received: list[bytes] = []
        reading = threading.Thread(target=lambda: received.append(reader.read()))
        reading.start()
        assert output.drain(30)
        real.close()  # the reader's EOF
        reading.join(30)

    # What was kept arrives whole; the rest is counted in a line where it was dropped: after the lines written before
    # it (at the end, or in between when the writer thread got a batch out before the dropping began).
    received_lines = received[0].decode().splitlines(keepends=True)
    notices = [line for line in received_lines if line.startswith("haystream: ")]
    lines = [line for line in received_lines if not line.startswith("haystream: ")]
    assert lines and set(lines) == {LINE}
    assert notices and all(n.endswith(" writes to this stream were dropped while it was blocked\n") for n in notices)
    dropped = sum(int(notice.split()[1]) for notice in notices)
    assert dropped > 0 and len(lines) + dropped == 3_000


@pytest.mark.parametrize("linger", [LINGER_SECONDS, 3600])
def test_everything_is_written_when_the_reader_keeps_up(linger):
    # Lines go out in batches: the thread waits (`linger`) for more lines after the first, since one write (and one
    # wake of the reader) per line cost ~50 µs of a request's CPU under load. `drain` does not wait out the linger.
    lines = 5_000 if linger == LINGER_SECONDS else 100
    read_fd, write_fd = os.pipe()
    with open(write_fd, "w") as real, open(read_fd, "rb") as reader:
        output = BackgroundOutput(real, linger=linger)
        received: list[bytes] = []
        reading = threading.Thread(target=lambda: received.append(reader.read()))
        reading.start()
        for number in range(lines):
            output.write(f"line {number}\n")
        assert output.drain(30)
        if linger == 3600:  # all of them came while the thread lingered
            assert output.writes == 1
        real.close()
        reading.join(30)
    assert received[0].decode() == "".join(f"line {number}\n" for number in range(lines))
    assert output.fileno() == write_fd and not output.isatty()


def test_a_line_goes_out_after_the_linger_without_anyone_draining():
    read_fd, write_fd = os.pipe()
    with open(write_fd, "w") as real, open(read_fd, "rb") as reader:
        output = BackgroundOutput(real, linger=0.01)
        output.write("one line\n")
        received: list[bytes] = []
        reading = threading.Thread(target=lambda: received.append(os.read(reader.fileno(), 100)))
        reading.start()
        reading.join(30)
        assert received == [b"one line\n"]
        # A full pipe's worth ends the linger too.
        output = BackgroundOutput(real, linger=3600)
        output.write(LINE * 700)
        data = bytearray()

        def read_all() -> None:
            while len(data) < len(LINE) * 700:
                data.extend(os.read(reader.fileno(), 1 << 16))

        reading = threading.Thread(target=read_all, daemon=True)
        reading.start()
        reading.join(30)
        assert bytes(data) == LINE.encode() * 700


# ------------------------------------------------------------------------------------------------------------------
# The access log: lines written directly while the logger is as `configure` left it, records otherwise
# ------------------------------------------------------------------------------------------------------------------

ACCESS_MESSAGE = '127.0.0.1:5000 - "POST /v1/chat/completions HTTP/1.1" 200 1.5 ms request_id=0123abcd'
ACCESS_FIELDS = {
    "client": "127.0.0.1:5000",
    "method": "POST",
    "path": "/v1/chat/completions",
    "status": 200,
    "duration_ms": 1.5,
}


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_access_line_written_directly_is_the_line_its_handler_formats(log_format):
    logs.configure(log_format, "info")
    (handler,) = logs.ACCESS_LOGGER.handlers
    assert logs._access_output.direct() is handler
    token = logs.REQUEST_ID.set("0123abcd")
    try:
        # Within a second, at its last millisecond, the next second (the cached local time moves on), years apart.
        for created in (1764423663.25, 1764423663.9996, 1764423664.0, 1700000000.5, 1764423663.5):
            record = logging.LogRecord("haystream.access", logging.INFO, __file__, 1, ACCESS_MESSAGE, None, None)
            record.__dict__.update(ACCESS_FIELDS)
            record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
            assert logs._access_output.line(created, ACCESS_MESSAGE, ACCESS_FIELDS) == handler.format(record)
    finally:
        logs.REQUEST_ID.reset(token)


def _one_request() -> None:
    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "http_version": "1.1", "client": ("10.0.0.1", 7)}
    asyncio.run(logs.AccessLog(answer)(scope, receive, send))


def test_access_lines_go_to_stderr_directly(capsys):
    logs.configure("text", "info")
    _one_request()
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| INFO     \| 10\.0\.0\.1:7 - "GET /v1/models HTTP/1\.1" 201 \d+\.\d ms', line
    )


@pytest.mark.parametrize("configured", ["filter", "handler", "formatter"])
def test_an_access_logger_configured_otherwise_gets_every_line_as_a_record(configured, capsys):
    """An application that filters the access log, adds a handler to it or formats it its own way sees records, as
    it would from any logger: the direct path is only for the logger as `configure` left it."""
    logs.configure("text", "info")
    (own,) = logs.ACCESS_LOGGER.handlers
    records: list[logging.LogRecord] = []

    class Keep(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            records.append(record)
            return True

    class Recording(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep, extra = Keep(), Recording()
    formatter = logging.Formatter("custom %(message)s")
    if configured == "filter":
        logs.ACCESS_LOGGER.addFilter(keep)
    elif configured == "handler":
        logs.ACCESS_LOGGER.addHandler(extra)
    else:
        own.setFormatter(formatter)
        own.addFilter(keep)  # a handler filter: the same check as a formatter of its own
    try:
        assert logs._access_output.direct() is None
        _one_request()
    finally:
        logs.ACCESS_LOGGER.removeFilter(keep)
        logs.ACCESS_LOGGER.removeHandler(extra)
        own.removeFilter(keep)
    (record,) = records
    assert (record.method, record.path, record.status, record.client) == ("GET", "/v1/models", 201, "10.0.0.1:7")
    if configured == "formatter":
        assert capsys.readouterr().err.startswith("custom 10.0.0.1:7")
    logs.configure("text", "info")
    assert logs._access_output.direct() is logs.ACCESS_LOGGER.handlers[0]
