"""`BackgroundOutput`: a serving process' stdout and stderr, written by a thread, over a real pipe."""

from __future__ import annotations

import os
import threading

import pytest

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

    text = received[0].decode()
    *lines, notice = text.splitlines(keepends=True)
    # What was kept arrives whole and in order; the rest is counted in one line at the end.
    assert lines and set(lines) == {LINE}
    assert notice.startswith("haystream: ")
    assert notice.endswith(" writes to this stream were dropped while it was blocked\n")
    dropped = int(notice.split()[1])
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
