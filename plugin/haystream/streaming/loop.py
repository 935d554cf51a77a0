"""haystream's shared event loop: where sync streams run their async twin, one loop per process.

`stream()` over a target whose streamed components all have `run_async` runs it on this loop, as `astream()` would
on the caller's loop, instead of tying up a thread per stream; the consuming thread is only woken when it waits for
a chunk. By default the loop runs in a daemon thread started on first use. A server that runs its own loop hands it
over with `use_event_loop()`: a component's async HTTP client belongs to the loop it was first used on, so one
process should drive its components from one loop. A forked child starts its own.
"""

from __future__ import annotations

import asyncio
import os
import threading

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_own_thread: threading.Thread | None = None


def shared_loop() -> asyncio.AbstractEventLoop:
    """The loop sync streams run on: the one given to `use_event_loop()`, or haystream's own daemon thread's."""
    global _loop, _own_thread
    with _lock:
        if _loop is not None and not _loop.is_closed() and _loop.is_running():
            return _loop
        if _own_thread is None or not _own_thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(target=_serve, args=(loop, ready), name="haystream-loop", daemon=True)
            thread.start()
            ready.wait()
            _own_thread = thread
            _own_loop[0] = loop
        _loop = _own_loop[0]
        assert _loop is not None
        return _loop


def use_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Run sync streams on `loop` (a running loop owned by the caller, e.g. a server's) from now on.

    When that loop stops, haystream goes back to its own loop thread.
    """
    global _loop
    with _lock:
        _loop = loop


_own_loop: list[asyncio.AbstractEventLoop | None] = [None]


def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    loop.run_forever()


def _forget_after_fork() -> None:
    # The child has no loop thread; the parent's loop objects must not be reused there.
    global _lock, _loop, _own_thread
    _lock = threading.Lock()
    _loop = _own_thread = None
    _own_loop[0] = None


os.register_at_fork(after_in_child=_forget_after_fork)
