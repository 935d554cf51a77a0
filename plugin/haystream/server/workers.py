"""`haystream serve --workers N`: a supervisor whose workers drain on SIGTERM exactly like a single server.

uvicorn's own supervisor (`uvicorn.supervisors.Multiprocess`, used by `uvicorn.run(workers=N)`) forwards SIGTERM
to its workers, but each worker runs a plain `uvicorn.Server` that it builds itself (0.54: `Process.server`), so a
worker closes its socket at once and never drains; replacing that server means copying the four supervisor methods
that create workers by name, which have changed shape across uvicorn releases (0.30 passed a `target`, 0.54 does
not). This supervisor keeps to uvicorn's public API instead: it opens the listening sockets, each worker runs a
`DrainingServer` on its own, and the signals the supervisor gets are passed on to every worker once.

On Linux each worker gets a socket of its own, all bound to the address with SO_REUSEPORT, so that the kernel spreads
new connections evenly over the workers; elsewhere they share the one `Config.bind_socket()` opens
(`listening_sockets`). The supervisor holds every socket for the whole run:
a worker's replacement takes over its socket, and the connections waiting in its queue with it.

Like uvicorn's: a worker that dies is replaced, unless it failed at startup (then all stop, exit code 3), and a worker
whose event loop stops turning (a wrapper that blocks it, a deadlock) is killed and replaced: once serving, each
worker sends a heartbeat through a pipe about once a second from uvicorn's own tick, and one that has sent none for
`worker_timeout` seconds gets SIGKILL. (`/health` is answered by whichever worker the connection reaches, so a probe
alone cannot find the hung one; the connections the kernel gives a hung worker's socket wait for its replacement.)
SIGHUP (a closed terminal) drains like SIGTERM, and workers drain and exit by themselves when the supervisor has gone
(killed, say) instead of serving on unsupervised. Unlike uvicorn's: no reload on SIGHUP, no SIGTTIN/SIGTTOU (one
worker per pod is the advice).
A stop that comes while workers still start is passed to each once it can take it (its handler is installed: it
says so through a pipe), so it stops before serving and exits 0 instead of dying of the signal's default action.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from haystream.server.drain import DrainingServer, stop_signals
from haystream.server.logs import drain_output, write_output_in_background

logger = logging.getLogger("uvicorn.error")

STARTUP_FAILURE = 3  # uvicorn's exit code for a server that could not start

multiprocessing.allow_connection_pickling()  # the listening socket goes to each worker


def run_workers(
    config: uvicorn.Config,
    workers: int,
    *,
    grace_seconds: float,
    timeout_seconds: float,
    worker_timeout: float = 30.0,
) -> int:
    """Serve `config` (an import string app) with `workers` draining processes; return the exit code.

    A serving worker that sends no heartbeat for `worker_timeout` seconds (0: never) is killed and replaced.
    """
    supervisor = _Supervisor(config, workers, grace_seconds, timeout_seconds, worker_timeout)
    return supervisor.run()


def listening_sockets(config: uvicorn.Config, count: int) -> list[socket.socket]:
    """The listening socket of each of `count` workers.

    On Linux (a TCP address): one socket per worker, each bound to the address with SO_REUSEPORT, and the kernel
    spreads new connections evenly over them. On one shared socket the worker whose loop wakes first accepts every
    connection that waits: under the bench's 200 paced streams two workers did 73%/27% of the work, and the busier
    one set the tail latency. Elsewhere, and for a Unix socket or an inherited descriptor, the workers share one socket
    (the same object `count` times).

    Startup fails (exit code 3, as uvicorn's) when the address cannot be bound. `haystream serve` checked it with a
    plain bind before, which also refuses a port where another program listens with SO_REUSEPORT; these sockets
    listen from the start, so that a second server's check fails on them too.
    """
    if count < 2 or not _spreads_connections(config):
        return [config.bind_socket()] * count
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sockets: list[socket.socket] = []
    port = config.port
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((config.host, port))
            port = sock.getsockname()[1]  # port 0: the others join the port the first one got
            # Listening at once: a plain bind (another `haystream serve`'s check) is refused only on a listening
            # port, and two groups of SO_REUSEPORT sockets would share it silently. Connections that come before the
            # workers serve wait in the queues, as they would for a single server that is still starting.
            sock.listen(config.backlog)
            sock.set_inheritable(True)
    except OSError as error:
        for sock in sockets:
            sock.close()
        logger.error(error)
        sys.exit(STARTUP_FAILURE)
    shown = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    scheme = "https" if config.is_ssl else "http"
    logger.info("Uvicorn running on %s://%s:%d (Press CTRL+C to quit)", scheme, shown, port)
    return sockets


def _spreads_connections(config: uvicorn.Config) -> bool:
    # SO_REUSEPORT balances connections on Linux only (BSDs and macOS hand them all to one socket).
    return (
        sys.platform.startswith("linux")
        and hasattr(socket, "SO_REUSEPORT")
        and config.uds is None
        and config.fd is None
    )


def _work(
    config: uvicorn.Config,
    sock: socket.socket,
    grace_seconds: float,
    timeout_seconds: float,
    armed: Connection,
    heartbeat: Connection | None,
    beat_every_ticks: int,
    supervisor: Connection,
) -> None:
    """A worker process: one `DrainingServer` on its socket."""
    # Its own process group: a Ctrl-C in the terminal reaches the supervisor only, which passes it on once (a
    # worker that got it twice would take the second as "exit at once").
    os.setpgid(0, 0)
    server = _WorkerServer(
        config,
        grace_seconds=grace_seconds,
        timeout_seconds=timeout_seconds,
        heartbeat=heartbeat,
        beat_every_ticks=beat_every_ticks,
        supervisor=supervisor,
    )
    # Until uvicorn installs its own handlers (and after, when it puts this one back and re-raises what it caught),
    # a stop makes the server exit without serving, with code 0.
    stop = _StopBeforeServing(server)
    for sig in stop_signals():
        signal.signal(sig, stop)
    armed.close()  # the supervisor may signal this process from now on
    write_output_in_background()
    try:
        config.configure_logging()
        server.run(sockets=[sock])
    finally:
        drain_output()  # a multiprocessing child exits without running atexit
    if not server.started and not stop.requested:
        sys.exit(STARTUP_FAILURE)


class _WorkerServer(DrainingServer):
    """A worker's server: it sends the supervisor a heartbeat every `beat_every_ticks` of uvicorn's main-loop ticks
    (0.1 s each), so the beats stop when the event loop does; it closes the pipe when it stops serving (its
    shutdown may then take as long as the drain allows). It drains and exits when the supervisor has gone (killed,
    say): `supervisor` is a pipe whose other end only the supervisor holds, so it reads EOF then. Otherwise the
    workers would serve on, unsupervised, holding the port."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        grace_seconds: float,
        timeout_seconds: float,
        heartbeat: Connection | None,
        beat_every_ticks: int,
        supervisor: Connection,
    ) -> None:
        super().__init__(config, grace_seconds=grace_seconds, timeout_seconds=timeout_seconds)
        self._heartbeat = heartbeat
        self._beat_every = max(beat_every_ticks, 1)
        self._supervisor = supervisor

    async def serve(self, sockets: list[Any] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self._supervisor.fileno(), self._supervisor_gone)
        try:
            await super().serve(sockets)
        finally:
            loop.remove_reader(self._supervisor.fileno())
            self._supervisor.close()

    def _supervisor_gone(self) -> None:
        asyncio.get_running_loop().remove_reader(self._supervisor.fileno())  # EOF stays readable
        if not self.draining:
            logger.warning("The supervisor has gone; worker [%d] drains and exits.", os.getpid())
            self.handle_exit(signal.SIGTERM, None)

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        heartbeat = self._heartbeat
        if heartbeat is not None and (should_exit or counter % self._beat_every == 0):
            try:
                if should_exit:
                    self._heartbeat = None
                    heartbeat.close()  # the supervisor stops watching: no kill during the shutdown
                else:
                    heartbeat.send_bytes(b"")
            except OSError:  # the supervisor has gone: nobody to tell
                self._heartbeat = None
        return should_exit


class _StopBeforeServing:
    """A worker's signal handler outside uvicorn's: the server stops (or never starts serving)."""

    def __init__(self, server: uvicorn.Server) -> None:
        self.server = server
        self.requested = False

    def __call__(self, sig: int, frame: Any) -> None:
        self.requested = True
        self.server.should_exit = True


class _Supervisor:
    def __init__(
        self, config: uvicorn.Config, workers: int, grace_seconds: float, timeout_seconds: float, worker_timeout: float
    ) -> None:
        self.config = config
        self.workers = workers
        self.grace_seconds = grace_seconds
        self.timeout_seconds = timeout_seconds
        self.worker_timeout = worker_timeout
        # About five beats per timeout, at most one a second (uvicorn ticks every 0.1 s).
        self.beat_every_ticks = max(1, min(10, int(worker_timeout / 5 / 0.1)))
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked loop or threads
        self.stopping = False
        self.exit_code = 0
        # A worker's end of its pipe closes once its signal handler is installed; until then it is not signalled.
        self.unarmed: dict[Connection, BaseProcess] = {}
        # Heartbeat pipes of the workers, and when each serving worker last beat (absent until its first beat).
        self.heartbeats: dict[Connection, BaseProcess] = {}
        self.last_beat: dict[BaseProcess, float] = {}
        # The supervisor's end of each worker's lifeline: closed when the worker has ended (or the supervisor has).
        self.lifelines: dict[BaseProcess, Connection] = {}
        # The listening socket of each worker (one shared by all where connections cannot be spread).
        self.sockets: dict[BaseProcess, socket.socket] = {}

    def run(self) -> int:
        sockets = listening_sockets(self.config, self.workers)
        # Signals wake the wait below through this socket pair (the C handler writes each signal's number into
        # it), so the supervisor sleeps until a worker ends or a signal comes: no polling.
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        handled = stop_signals()
        previous_handlers = {sig: signal.signal(sig, _ignore) for sig in handled}
        processes: list[BaseProcess] = []
        try:
            logger.info("Started parent process [%d]", os.getpid())
            processes = [self._start(sock) for sock in sockets]
            while processes:
                ready = wait(
                    [wake_r, *self.unarmed, *self.heartbeats, *(process.sentinel for process in processes)],
                    timeout=self._until_next_deadline(),
                )
                for connection in [c for c in self.heartbeats if c in ready]:
                    self._beat(connection)
                self._kill_hung()
                for connection in [c for c in self.unarmed if c in ready]:  # EOF: armed (or dead)
                    armed = self.unarmed.pop(connection)
                    connection.close()
                    if self.stopping and armed in processes:
                        self._signal(armed)
                if wake_r in ready:
                    for number in wake_r.recv(64):
                        if number in handled:
                            logger.info(
                                "Received %s: %s the workers",
                                signal.Signals(number).name,
                                "stopping" if self.stopping else "draining",
                            )
                            self._stop(processes)
                for process in [p for p in processes if p.sentinel in ready]:
                    process.join()
                    processes.remove(process)
                    replacement = self._ended(process, processes)
                    if replacement is not None:
                        processes.append(replacement)
        finally:
            for process in processes:  # only if the supervisor itself failed
                process.kill()
                process.join()
            for connection in [*self.unarmed, *self.heartbeats, *self.lifelines.values()]:
                connection.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_wakeup)
            wake_r.close()
            wake_w.close()
            for sock in set(sockets):
                sock.close()
        logger.info("Stopping parent process [%d]", os.getpid())
        return self.exit_code

    def _start(self, sock: socket.socket) -> BaseProcess:
        unarmed, armed = self.context.Pipe(duplex=False)
        beats, beat = self.context.Pipe(duplex=False) if self.worker_timeout > 0 else (None, None)
        supervised, supervising = self.context.Pipe(duplex=False)  # never written: EOF when the supervisor is gone
        args = (
            self.config,
            sock,
            self.grace_seconds,
            self.timeout_seconds,
            armed,
            beat,
            self.beat_every_ticks,
            supervised,
        )
        process = self.context.Process(target=_work, args=args, name="haystream-worker")
        process.start()
        self.sockets[process] = sock
        armed.close()  # the worker holds the only writing ends now
        supervised.close()
        self.lifelines[process] = supervising
        self.unarmed[unarmed] = process
        if beats is not None and beat is not None:
            beat.close()
            self.heartbeats[beats] = process
        return process

    def _beat(self, connection: Connection) -> None:
        process = self.heartbeats[connection]
        try:
            while connection.poll():
                connection.recv_bytes()
        except (EOFError, OSError):  # the worker stopped serving (or died): no more beats are due
            del self.heartbeats[connection]
            self.last_beat.pop(process, None)
            connection.close()
            return
        self.last_beat[process] = time.monotonic()

    def _until_next_deadline(self) -> float | None:
        if self.stopping or not self.last_beat:
            return None
        return max(0.0, min(self.last_beat.values()) + self.worker_timeout - time.monotonic())

    def _kill_hung(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for process, beat in list(self.last_beat.items()):
            if now - beat >= self.worker_timeout and process.pid is not None and process.exitcode is None:
                logger.error(
                    "Worker [%s] sent no heartbeat for %gs (its event loop is blocked); killing it.",
                    process.pid,
                    self.worker_timeout,
                )
                del self.last_beat[process]  # its end (the sentinel) replaces it
                os.kill(process.pid, signal.SIGKILL)

    def _stop(self, processes: list[BaseProcess]) -> None:
        """SIGTERM to every worker: the first starts each one's drain, a second makes them exit at once. A worker
        still booting gets it once it installed its handler (before, the signal would kill it)."""
        self.stopping = True
        booting = set(self.unarmed.values())
        for process in processes:
            if process not in booting:
                self._signal(process)

    def _signal(self, process: BaseProcess) -> None:
        if process.pid is not None and process.exitcode is None:
            os.kill(process.pid, signal.SIGTERM)

    def _ended(self, process: BaseProcess, running: list[BaseProcess]) -> BaseProcess | None:
        """Account for a worker that ended; return its replacement (on the same socket) if it should be replaced."""
        sock = self.sockets.pop(process)
        _forget_metrics(process.pid)
        self.last_beat.pop(process, None)
        lifeline = self.lifelines.pop(process, None)
        if lifeline is not None:
            lifeline.close()
        for connection in [c for c, p in self.heartbeats.items() if p is process]:
            del self.heartbeats[connection]
            connection.close()
        code = process.exitcode
        if self.stopping:
            if code != 0:
                logger.warning("Worker [%s] exited with %s", process.pid, code)
                self.exit_code = self.exit_code or 1
            return None
        if code == STARTUP_FAILURE:
            logger.error("Worker [%s] failed to start; stopping.", process.pid)
            self.exit_code = STARTUP_FAILURE
            self._stop(running)
            return None
        logger.warning("Worker [%s] died (exit code %s); starting another.", process.pid, code)
        return self._start(sock)


def _ignore(sig: int, frame: Any) -> None:
    """The Python-level handler: the work happens when the wake-up socket reports the signal."""


def _forget_metrics(pid: int | None) -> None:
    """Drop a dead worker's live gauges (active streams) from the shared multiprocess metrics."""
    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
