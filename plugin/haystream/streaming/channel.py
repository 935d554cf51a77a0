"""Bounded hand-off of chunks from a producer to one consumer.

Two twins with the same contract:

- `ThreadChannel`: the producer runs in a worker thread; the consumer reads from a thread (`get`) or from an event
  loop (`aget`, woken with `loop.call_soon_threadsafe` only when it is actually waiting).
- `AsyncChannel`: producer and consumer are tasks on one event loop.
- `LoopToThreadChannel`: the producer is a task on an event loop (haystream's shared loop), the consumer a thread.

Both are bounded: a producer that gets ahead of its consumer by `capacity` items waits, so a slow reader throttles
generation instead of growing memory. When the consumer leaves (`close`), the producer's next `put` raises
`StreamCancelled`. Nothing polls: waiting is done on conditions and futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class StreamCancelled(asyncio.CancelledError):
    """Raised inside a producer when the consumer of its stream has gone away.

    A cancellation, not an error: like every `asyncio.CancelledError` it is a `BaseException`, so `except Exception`
    blocks in pipelines and components do not swallow it, and async components that clean up when cancelled do so
    when it reaches them. Haystack's `OpenAIChatGenerator` closes its upstream stream only on a cancellation: a run
    on the loop whose next callback finds the consumer gone (a Pipeline runs each component in a task of its own,
    which haystream does not cancel directly) must stop the same way, or the upstream goes on until a garbage
    collection.
    """


class _End:
    """Marker returned by `get` once the producer has finished and every item has been taken."""

    __slots__ = ()


END: Any = _End()


class _ChannelState(Generic[T]):
    """State and consumer-side logic shared by both channel twins."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        # A list, not a deque: a deque allocates a 64-slot block (760 bytes) up front, and a stream has a channel
        # for its whole life while it holds a few items at most times; pop(0) of a short list is as cheap.
        self._items: list[T] = []
        self._closed = False
        self._done = False
        self._error: BaseException | None = None
        self.result: Any = None
        #: Set by the producer when it starts (a run cancelled before it started never finishes the channel).
        self.producing = False

    @property
    def closed(self) -> bool:
        """True once the consumer has gone away."""
        return self._closed

    @property
    def done(self) -> bool:
        """True once the producer has finished, with or without an error."""
        return self._done

    def _finish(self, result: Any, error: BaseException | None) -> None:
        self._done = True
        self.result = result
        self._error = error

    def _take(self) -> T:
        # Items produced before a failure are delivered first, then the failure is raised (once). Once the
        # consumer has closed the channel, a read still waiting in another thread just ends.
        if self._closed:
            return END
        if self._items:
            return self._items.pop(0)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return END


class ThreadChannel(_ChannelState[T]):
    """Hand-off from producer thread(s) to a sync consumer or to a consumer on `loop`."""

    def __init__(self, capacity: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(capacity)
        self._loop = loop
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._not_empty = threading.Condition(self._lock)
        self._waiter: asyncio.Future[None] | None = None
        #: The thread currently producing into this channel (set by the producer), for `producer.abandon`.
        self.producer_ident: int | None = None

    # producer side (any thread)
    def put(self, item: T) -> None:
        """Hand one item over; waits while the consumer is `capacity` items behind."""
        with self._lock:
            while len(self._items) >= self._capacity and not self._closed:
                self._not_full.wait()
            if self._closed:
                raise StreamCancelled()
            self._items.append(item)
            self._wake_consumer()

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """Mark the end of production, with the run's result or the error that ended it."""
        with self._lock:
            self._finish(result, error)
            self._wake_consumer()

    def _wake_consumer(self) -> None:
        if self._loop is None:
            self._not_empty.notify()
        elif self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody left to wake
                self._loop.call_soon_threadsafe(_resolve, waiter)

    # consumer side
    def get(self) -> T:
        """Next item, blocking the calling thread; `END` after the last one; raises the producer's error."""
        with self._lock:
            while not self._items and not self._done and not self._closed:
                self._not_empty.wait()
            item = self._take()
            self._not_full.notify()
            return item

    async def aget(self) -> T:
        """Next item without blocking the event loop; `END` after the last one; raises the producer's error."""
        while True:
            with self._lock:
                if self._items or self._done or self._closed:
                    item = self._take()
                    self._not_full.notify()
                    return item
                assert self._loop is not None, "aget needs a channel created with a loop"
                waiter = self._waiter = self._loop.create_future()
            await waiter

    def close(self) -> None:
        """The consumer leaves: drop buffered items and make the producer's next `put` raise `StreamCancelled`."""
        with self._lock:
            self._closed = True
            self._items.clear()
            self._not_full.notify_all()
            self._not_empty.notify_all()


class AsyncChannel(_ChannelState[T]):
    """Hand-off between a producer task and a consumer task on the same event loop.

    A producer that finds many chunks waiting in its socket would put them all (up to `capacity`) before the
    consumer task gets a turn, which under load holds a stream's first chunk back for as long as the loop is busy.
    So the producer lets a waiting consumer run at once for a stream's first `eager_items` items, and later when it
    has got `handoff_threshold` items ahead of a consumer it already woke. Each costs one extra turn of the producer
    task, never one per chunk: a paced stream (one chunk per read) never reaches the threshold.
    """

    def __init__(self, capacity: int, *, eager_items: int = 4, handoff_threshold: int = 8) -> None:
        super().__init__(capacity)
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None
        self._eager = eager_items
        self._threshold = max(handoff_threshold, 1)
        self._consumer_woken = False  # woken by a put, and has not taken anything since

    async def put(self, item: T) -> None:
        """Hand one item over; waits while the consumer is `capacity` items behind."""
        while len(self._items) >= self._capacity and not self._closed:
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter
        if self._closed:
            raise StreamCancelled()
        self._items.append(item)
        if self._getter is not None:
            self._getter = _wake(self._getter)
            self._consumer_woken = True
            if self._eager > 0:
                self._eager -= 1
                await asyncio.sleep(0)  # the consumer's wake-up was queued first: it runs before we go on
        elif self._consumer_woken and len(self._items) >= self._threshold:
            await asyncio.sleep(0)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """Mark the end of production, with the run's result or the error that ended it."""
        self._finish(result, error)
        self._getter = _wake(self._getter)

    async def get(self) -> T:
        """Next item; `END` after the last one; raises the producer's error."""
        while not self._items and not self._done and not self._closed:
            self._getter = asyncio.get_running_loop().create_future()
            await self._getter
        self._consumer_woken = False
        item = self._take()
        self._putter = _wake(self._putter)
        return item

    def close(self) -> None:
        """The consumer leaves: drop buffered items and make the producer's next `put` raise `StreamCancelled`."""
        self._closed = True
        self._items.clear()
        self._putter = _wake(self._putter)
        self._getter = _wake(self._getter)


class LoopToThreadChannel(_ChannelState[T]):
    """Hand-off from a producer task on `loop` to a consumer thread.

    Wake-ups only happen when someone waits: the consumer thread is woken (one lock release) when it waits for an
    item, so chunks that arrive while it is busy are picked up without one; the producer, when the buffer was full,
    is woken once the consumer has drained it to half, not once per item.
    """

    def __init__(self, capacity: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(capacity)
        self._loop = loop
        self._lock = threading.Lock()
        # A plain lock used as a binary semaphore: cheaper than a Condition, which allocates a lock per wait.
        self._wakeup = threading.Lock()
        self._wakeup.acquire()
        self._consumer_waiting = False
        self._putter: asyncio.Future[None] | None = None
        self._low_water = capacity // 2
        self._ended = threading.Event()

    # producer side (the loop)
    async def put(self, item: T) -> None:
        """Hand one item over; waits while the consumer is `capacity` items behind."""
        while True:
            with self._lock:
                if self._closed:
                    raise StreamCancelled()
                if len(self._items) < self._capacity:
                    self._items.append(item)
                    self._wake_consumer()
                    return
                putter = self._putter = self._loop.create_future()
            await putter

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """Mark the end of production, with the run's result or the error that ended it."""
        with self._lock:
            self._finish(result, error)
            self._wake_consumer()
        self._ended.set()

    def _wake_consumer(self) -> None:
        if self._consumer_waiting:
            self._consumer_waiting = False
            self._wakeup.release()

    # consumer side (any one thread)
    def get(self) -> T:
        """Next item, blocking the calling thread; `END` after the last one; raises the producer's error."""
        while True:
            with self._lock:
                if self._items or self._done or self._closed:
                    item = self._take()
                    if self._putter is not None and len(self._items) <= self._low_water:
                        self._wake_producer()
                    return item
                self._consumer_waiting = True
            self._wakeup.acquire()

    def close(self) -> None:
        """The consumer leaves: drop buffered items and make the producer's next `put` raise `StreamCancelled`."""
        with self._lock:
            self._closed = True
            self._items.clear()
            self._wake_producer()
            self._wake_consumer()  # a read still waiting in another thread ends

    def wait_ended(self, timeout: float) -> bool:
        """Wait until the producer has finished (after a `close`, until the cancelled run has unwound)."""
        return self._ended.wait(timeout)

    def _wake_producer(self) -> None:
        if self._putter is not None:
            putter, self._putter = self._putter, None
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody left to wake
                self._loop.call_soon_threadsafe(_resolve, putter)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _wake(future: asyncio.Future[None] | None) -> asyncio.Future[None] | None:
    """Resolve a waiter if there is one; returns None, for `self._getter = _wake(self._getter)`."""
    if future is not None:
        _resolve(future)
    return None
