"""The bench's child processes, and what Linux's /proc says about them: CPU, RSS, threads, listen backlogs, drops."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_START_TIMEOUT = 120.0
_STOP_TIMEOUT = 20.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUNNING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


_LIVE: set[Child] = set()


def stop_all() -> None:
    """Stop every child still running (the last resort when the bench is interrupted)."""
    for child in list(_LIVE):
        child.stop()


class Child:
    """A child process whose merged output is read line by line until it is ready, then drained into a log file.

    `ready` sees each line (ANSI colours removed) and returns the child's URL once it is ready. Children started
    with ``group=True`` get their own process group, so that stopping them also stops their worker processes.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_dir: Path,
        ready: Callable[[str], str | None],
        *,
        group: bool = False,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w", buffering=1)
        self._ready = ready
        self._event = threading.Event()
        self._group = group
        self.url: str | None = None
        self.process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=group,
        )
        _LIVE.add(self)
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            for line in self.process.stdout:
                self._log.write(line)
                if self.url is None:
                    self.url = self._ready(_ANSI.sub("", line))
                    if self.url is not None:
                        self._event.set()
        finally:
            self._event.set()  # the child ended (or closed its output): stop waiting either way

    def wait_ready(self) -> str:
        """Block until the child is ready; raise with the log's tail if it died or hung."""
        if not self._event.wait(_START_TIMEOUT) or self.url is None:
            raise RuntimeError(f"{self.name} did not start (exit code {self.process.poll()}):\n{self.tail()}")
        return self.url

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
        return ""

    def stop(self) -> None:
        """Close stdin (the fake's and the relay's stop signal) and SIGTERM the group; SIGKILL what is left."""
        process = self.process
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.stdin.close()  # type: ignore[union-attr]
            if self._group:
                self._signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_TIMEOUT)
        if self._group:
            self._signal(signal.SIGKILL)  # workers that outlived their supervisor
        self._reader.join(_STOP_TIMEOUT)
        self._log.close()
        _LIVE.discard(self)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)  # our own child's group: start_new_session made its pid the pgid


def url_line(line: str) -> str | None:
    """Ready when the child prints its base URL (the fake upstream, the relay)."""
    return line.strip() if line.startswith("http://") else None


class UvicornReady:
    """Ready once uvicorn listens and every worker has finished its startup (wrappers deployed)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.started = 0
        self.url: str | None = None

    def __call__(self, line: str) -> str | None:
        if "Application startup complete" in line:
            self.started += 1
        if (match := _RUNNING.search(line)) is not None:
            self.url = match.group(1)
        return self.url if self.url is not None and self.started >= self.workers else None


def free_port() -> int:
    """A free loopback port (bound and released; fine on a quiet loopback interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_open_file_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE (children spawned afterwards inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(max(soft, wanted), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ------------------------------------------------------------------------------------------------------------------
# /proc readings
# ------------------------------------------------------------------------------------------------------------------


def _stat(pid: int | str) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name, which may hold spaces), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


# Indexes into `_stat` (proc(5) field number - 3).
_PPID, _UTIME, _STIME, _THREADS, _RSS = 1, 11, 12, 17, 21


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (uvicorn's supervisor and its worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(entry.name)) is not None:
            children.setdefault(int(fields[_PPID]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def is_spawned_worker(pid: int) -> bool:
    """Whether `pid` is a worker that multiprocessing spawned (not its resource tracker, nor the supervisor)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass(frozen=True)
class Usage:
    """Summed over a set of processes: CPU seconds (user + system), resident bytes, threads."""

    cpu: float
    rss: int
    threads: int


def usage(pids: list[int]) -> Usage:
    cpu = rss = threads = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is None:
            continue
        cpu += int(fields[_UTIME]) + int(fields[_STIME])
        rss += int(fields[_RSS])
        threads += int(fields[_THREADS])
    return Usage(cpu / _CLK_TCK, rss * _PAGE, threads)


def listen_backlog(port: int) -> int | None:
    """The accept-queue size of the socket listening on 127.0.0.1:PORT (``ss`` shows it as Send-Q), if known."""
    try:
        out = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sizes = [int(line.split()[2]) for line in out.splitlines() if line.startswith("LISTEN")]
    return min(sizes) if sizes else None


def listen_drops() -> int | None:
    """Connections the kernel dropped at a full listen queue, machine-wide (TcpExt ListenDrops)."""
    try:
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names and names[0] == "TcpExt:" and "ListenDrops" in names:
            return int(values[names.index("ListenDrops")])
    return None


def machine_busy_seconds() -> float | None:
    """CPU time (all cores) the whole machine spent busy so far, from /proc/stat."""
    try:
        ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLK_TCK  # minus idle and iowait
