"""Admission: how many chat requests may run at once, in all and per key. Over the cap is a 429, never a queue."""

from __future__ import annotations

from collections import Counter
from types import TracebackType

from haystream.openai import OpenAIError


class StreamLimits:
    """Counts running chat requests; `admit()` holds one place for the duration of a request."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total = total
        self.per_key = per_key
        self._running = 0
        self._by_key: Counter[str] = Counter()

    @property
    def running(self) -> int:
        """Chat requests running now."""
        return self._running

    def admit(self, key_id: str, *, per_key: bool = True) -> Admission:
        """A place for one request of `key_id`, held while its `with` block runs.

        :raises OpenAIError: on entering, 429 with `Retry-After` when the server or this key is at its cap.
        """
        return Admission(self, key_id, per_key)

    def _take(self, key_id: str, per_key: bool) -> None:
        if self._running >= self.total:
            raise _busy(f"The server is running {self.total} requests, its limit (HAYSTREAM_MAX_STREAMS).")
        if per_key and self._by_key[key_id] >= self.per_key:
            raise _busy(f"This API key is running {self.per_key} requests, its limit (HAYSTREAM_MAX_STREAMS_PER_KEY).")
        self._running += 1
        self._by_key[key_id] += 1

    def _give_back(self, key_id: str) -> None:
        self._running -= 1
        self._by_key[key_id] -= 1
        if not self._by_key[key_id]:
            del self._by_key[key_id]


class Admission:
    """One request's place. A class rather than a generator-based context manager: it is held for the whole stream,
    and this is a fraction of the memory (no generator frame, argument tuple and instance dict)."""

    __slots__ = ("_key_id", "_limits", "_per_key")

    def __init__(self, limits: StreamLimits, key_id: str, per_key: bool) -> None:
        self._limits = limits
        self._key_id = key_id
        self._per_key = per_key

    def __enter__(self) -> None:
        self._limits._take(self._key_id, self._per_key)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._limits._give_back(self._key_id)


def _busy(message: str) -> OpenAIError:
    return OpenAIError(
        429,
        message + " Retry shortly.",
        type="rate_limit_error",
        code="too_many_requests",
        headers={"retry-after": "1"},
    )
