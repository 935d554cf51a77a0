"""`BackgroundOutput`: a serving process' stdout and stderr, written by a thread, over a real pipe."""

from __future__ import annotations

import os
import threading

from haystream.server.logs import BackgroundOutput

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


def test_everything_is_written_when_the_reader_keeps_up():
    read_fd, write_fd = os.pipe()
    with open(write_fd, "w") as real, open(read_fd, "rb") as reader:
        output = BackgroundOutput(real)
        received: list[bytes] = []
        reading = threading.Thread(target=lambda: received.append(reader.read()))
        reading.start()
        for number in range(5_000):
            output.write(f"line {number}\n")
        assert output.drain(30)
        real.close()
        reading.join(30)
    assert received[0].decode() == "".join(f"line {number}\n" for number in range(5_000))
    assert output.fileno() == write_fd and not output.isatty()
