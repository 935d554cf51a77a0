"""Where stored responses and their event logs live: this process's memory, or Redis (shared by replicas).

A stored response is a record (the owner's key id, the `response` object, the conversation it ends) kept for a TTL.
Its events are a log that a client can replay from any sequence number and then follow live: in memory an
`EventLog` (woken by an `asyncio.Event`, nothing polls), in Redis a stream read with `XREAD BLOCK`.

While Redis is unreachable, every store operation raises `StoreUnavailable` (a 503 with `Retry-After`), the server
starts and chat completions work all the same, and the cancel listener reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import orjson

from haystream.openai import OpenAIError
from haystream.openai.responses import TERMINAL_EVENTS, output_of, snapshot

logger = logging.getLogger("haystream.server")

Batch = Sequence[Mapping[str, Any]] | None  # events, or None when `idle` seconds passed without one (time for a ping)


class StoreUnavailable(OpenAIError):
    """The response store cannot be reached (Redis is down or unreachable): 503, try again shortly."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "The response store is unavailable; try again shortly.",
            type="server_error",
            code="store_unavailable",
            headers={"retry-after": "1"},
        )


class ResponseGone(OpenAIError):
    """A response followed from the store was removed before its end: deleted, dropped to make room for its key's
    newer ones, or expired."""

    def __init__(self, id: str) -> None:
        super().__init__(
            404,
            f"Response with id '{id}' was removed (deleted, dropped for newer responses of its key, or expired) "
            "before its end.",
            param="response_id",
            code="response_not_found",
        )


class ResponseTakenOver(Exception):
    """Another replica took this replica's running response over (its lease had expired: see `RedisStore`) and
    stored it failed, or dropped it past its key's bounds: its run, alive after all, must stop and end failed
    (`failure`)."""

    def __init__(self, id: str) -> None:
        super().__init__(f"response {id} was taken over by another replica")
        self.failure = replica_lost()


def replica_lost() -> OpenAIError:
    """Why a response taken over from a replica that gave no sign of life failed."""
    return OpenAIError(
        503,
        f"The replica that ran this response stopped without ending it: it gave no sign of life for "
        f"{RedisStore.OWNER_LEASE_SECONDS:g}s (it crashed, was killed, or lost the response store). The output so far "
        "is kept.",
        type="server_error",
        code="replica_lost",
    )


@dataclass
class StoredResponse:
    """One stored response: whose it is, the `response` object, the conversation up to and including it, and its own
    input items as `GET /v1/responses/{id}/input_items` lists them (empty in a record stored by an older version)."""

    key_id: str
    response: dict[str, Any]
    messages: list[dict[str, Any]] = field(default_factory=list)
    input_items: list[dict[str, Any]] = field(default_factory=list)


class EventLog:
    """The events of one running response in this process: appended by the run, read by any number of followers."""

    def __init__(self) -> None:
        self.events: list[Mapping[str, Any]] = []
        self.ended = False
        self._changed = asyncio.Event()

    def append(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Add events; a terminal event (or `end()`) ends the log. Wakes every follower once."""
        self.events += events
        if events and events[-1]["type"] in TERMINAL_EVENTS:
            self.ended = True
        self._wake()

    def end(self) -> None:
        """No more events will come (the run stopped without a terminal event)."""
        self.ended = True
        self._wake()

    async def wait_for_first(self) -> None:
        """Return once there is an event or the log ended."""
        while not self.events and not self.ended:
            await self._changed.wait()

    async def follow(self, after: int, idle: float) -> AsyncGenerator[Batch, None]:
        """The events with `sequence_number > after`, in batches, then the live ones until the log ends."""
        position = 0
        while True:
            # Past the events up to `after`, also those that arrive later: a client resuming after an event this log
            # has yet to reach got every event from the current one on.
            while position < len(self.events) and self.events[position]["sequence_number"] <= after:
                position += 1
            if position < len(self.events):
                batch = self.events[position:]
                position += len(batch)
                yield batch
                continue
            if self.ended:
                return
            changed = self._changed
            try:
                async with asyncio.timeout(idle):
                    await changed.wait()
            except TimeoutError:
                yield None

    def _wake(self) -> None:
        # One Event per generation: set it (waking every follower) and hand out a fresh one.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class ResponseStore(Protocol):
    """What the Responses endpoint needs from a store."""

    async def save(
        self, record: StoredResponse, log: EventLog | None = None, events: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        """Create or replace a record (`log`: the run's local event log, which the memory store keeps); past its key
        id's bounds, drop that key's oldest finished records. `events` go into its log in the same step: stored
        together, or neither (a finished record whose log lacks its terminal event left a resume waiting for it).
        `ResponseTakenOver` if another replica stored it failed meanwhile (Redis only)."""

    async def get(self, id: str, key_id: str) -> StoredResponse | None:
        """The record if it exists, has not expired, and belongs to `key_id`."""

    async def delete(self, id: str, key_id: str) -> bool:
        """Forget a record and its events; False when there was none (for this key)."""

    async def append(self, id: str, key_id: str, events: Sequence[Mapping[str, Any]]) -> None:
        """Add events to the log of `key_id`'s response `id` (counted in the key's size; nothing once the record is
        gone); `ResponseTakenOver` if another replica stored it failed meanwhile (Redis only)."""

    def follow(self, id: str, after: int, idle: float) -> AsyncGenerator[Batch, None]:
        """Replay the events after `after`, then follow live until a terminal event (`ResponseGone` if the response
        is removed before it)."""

    async def request_cancel(self, id: str) -> None:
        """Ask whichever process runs `id` to cancel it."""

    async def start(self, on_cancel: Callable[[str], None]) -> None:
        """Begin serving (e.g. listen for cancel requests from other replicas)."""

    def reachable_again(self) -> asyncio.Event:
        """An event set when the store answers again after this replica found it unreachable (each outage its own
        event: call again after it is set). Never set for a store that is always reachable."""

    async def close(self) -> None:
        """Release connections."""


RUNNING_STATUSES = frozenset({"queued", "in_progress"})
"""A stored response's `status` while its run goes on."""


@dataclass
class _MemoryEntry:
    expires: float
    record: StoredResponse
    log: EventLog | None
    record_size: int  # JSON bytes of the record
    events_size: int = 0  # and of its log's first `counted` events
    counted: int = 0

    @property
    def size(self) -> int:
        """What the size bound counts."""
        return self.record_size + self.events_size

    def count_coming(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Count `events`, saved with the record, which the run appends to its log right after this save (a first or
        a terminal batch: without extension lines, so these are the log's next entries): counted here, as nothing
        may be stored after them."""
        if self.log is not None and events:
            self.counted += len(events)
            self.events_size += len(orjson.dumps(events))

    def count_new_events(self) -> int:
        """Count the events the log gained since they were last counted (each event once, not the whole log at
        each save: a long run's last save held the loop for the JSON of all its events); their size."""
        if self.log is None:
            return 0
        added = self.log.events[self.counted :]
        size = len(orjson.dumps(added)) if added else 0
        self.counted += len(added)
        self.events_size += size
        return size


@dataclass
class _KeyShare:
    """One key id's stored responses in memory: the finished ones in the order they were stored (the first goes
    first), the running ones (never dropped), and the size of them all."""

    finished: OrderedDict[str, None] = field(default_factory=OrderedDict)
    running: set[str] = field(default_factory=set)
    size: int = 0

    def __len__(self) -> int:
        return len(self.finished) + len(self.running)

    def oldest_finished(self, newest: str) -> str | None:
        """The finished response to drop first: never `newest`, the one just stored (the last, if it is finished)."""
        ids = iter(self.finished)
        oldest = next(ids, None)
        return next(ids, None) if oldest == newest else oldest


class MemoryStore:
    """Records in this process, bounded per key id by count and by size (its oldest finished one dropped first) and by
    TTL.

    The bounds hold per key id, not for the process: a key that stores more drops only its own records, never another
    key's (whose `previous_response_id` chains would break). In all, the store holds at most the number of key ids
    (the configured keys, or one anonymous id without keys) times the bounds.
    """

    def __init__(self, ttl_seconds: float, max_stored: int, max_bytes: int) -> None:
        self.ttl = ttl_seconds
        self.max_stored = max_stored
        self.max_bytes = max_bytes
        self._records: OrderedDict[str, _MemoryEntry] = OrderedDict()  # every key's, in the order they expire
        self._shares: dict[str, _KeyShare] = {}
        self._on_cancel: Callable[[str], None] = lambda id: None
        self._never = asyncio.Event()

    def reachable_again(self) -> asyncio.Event:
        return self._never

    async def save(
        self, record: StoredResponse, log: EventLog | None = None, events: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        id = record.response["id"]
        old = self._forget(id)
        if log is None and old is not None:
            log = old.log
        # Sized as JSON, as Redis would hold it: a conversation can be as large as a request body, and a background
        # response's events ~0.4 KB per token, so a count alone does not bound the memory (those that come after
        # this save are counted as they are appended).
        size = len(orjson.dumps([record.response, record.messages, record.input_items]))
        entry = _MemoryEntry(0, record, log, size)
        if old is not None and old.log is log:
            entry.events_size, entry.counted = old.events_size, old.counted
        entry.count_new_events()
        entry.count_coming(events)
        now = time.monotonic()
        self._drop_expired(now)
        entry.expires = now + self.ttl
        self._records[id] = entry
        share = self._shares.setdefault(record.key_id, _KeyShare())
        # A running background response is not dropped to make room: its GET and cancel would answer 404 while it
        # goes on running (and it would come back, stored again, when it ends). At most HAYSTREAM_MAX_STREAMS_PER_KEY
        # of them run at once.
        if record.response.get("status") in RUNNING_STATUSES:
            share.running.add(id)
        else:
            share.finished[id] = None
        share.size += entry.size
        while len(share) > self.max_stored or share.size > self.max_bytes:
            victim = share.oldest_finished(id)  # the newest stays, however large
            if victim is None:
                break  # only running responses are left, and the newest
            self._forget(victim)

    async def get(self, id: str, key_id: str) -> StoredResponse | None:
        entry = self._live(id)
        return entry.record if entry is not None and entry.record.key_id == key_id else None

    async def delete(self, id: str, key_id: str) -> bool:
        if await self.get(id, key_id) is None:
            return False
        self._forget(id)
        return True

    async def append(self, id: str, key_id: str, events: Sequence[Mapping[str, Any]]) -> None:
        # The run's EventLog, kept with the record, is the log: here the events it gained since it was last counted
        # are counted. Counted only at each save, a run's terminal events (appended after its last save, so that a GET
        # after the end finds the final response: the output text four times over) went uncounted, 11-25% of a
        # background response.
        entry = self._live(id)
        if entry is not None and entry.record.key_id == key_id:
            self._shares[key_id].size += entry.count_new_events()

    async def follow(self, id: str, after: int, idle: float) -> AsyncGenerator[Batch, None]:
        entry = self._live(id)
        if entry is None or entry.log is None:
            return
        async for batch in entry.log.follow(after, idle):
            yield batch

    async def request_cancel(self, id: str) -> None:
        self._on_cancel(id)

    async def start(self, on_cancel: Callable[[str], None]) -> None:
        self._on_cancel = on_cancel

    async def close(self) -> None:
        self._records.clear()
        self._shares.clear()

    def _drop_expired(self, now: float) -> None:
        # One TTL for all: the first record stored expires first, whoever's it is (an idle key's too).
        while self._records:
            id, oldest = next(iter(self._records.items()))
            if oldest.expires > now:
                return
            self._forget(id)

    def _live(self, id: str) -> _MemoryEntry | None:
        entry = self._records.get(id)
        if entry is not None and entry.expires <= time.monotonic():
            self._forget(id)
            return None
        return entry

    def _forget(self, id: str) -> _MemoryEntry | None:
        entry = self._records.pop(id, None)
        if entry is not None:
            key_id = entry.record.key_id
            share = self._shares[key_id]
            share.finished.pop(id, None)
            share.running.discard(id)
            share.size -= entry.size
            if not share:
                del self._shares[key_id]  # a key that holds nothing leaves nothing behind
        return entry


# Each key id's index in Redis: KEYS = its finished and its running responses (sorted sets, scored by when each record
# expires: the first finished one goes first) and a hash of sizes (the record's JSON bytes under its id, its events'
# under `id:events`, the key's sum under `total`); ARGV[1] = the prefix of record and event-log keys. Every command
# is O(1) or O(log n) in the key's own records: nothing scans the keys of Redis or the index.
_INDEX = """
local finished, running, sizes, prefix = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local function forget(id)
  local size = (tonumber(redis.call('HGET', sizes, id)) or 0)
  size = size + (tonumber(redis.call('HGET', sizes, id .. ':events')) or 0)
  redis.call('HDEL', sizes, id, id .. ':events')
  redis.call('HINCRBY', sizes, 'total', -size)
  redis.call('ZREM', finished, id)
  redis.call('ZREM', running, id)
  redis.call('DEL', prefix .. id, prefix .. id .. ':events', prefix .. id .. ':owner')
end
-- A replica that writes a running record gives a sign of life: its lease (see RedisStore) is renewed.
local function alive(owner, lease_ms)
  redis.call('SET', prefix .. 'replica:' .. owner, 1, 'PX', lease_ms)
end
-- ARGV[first], ARGV[first + 1], ...: a stream id and an event's JSON per event, added to id's log (counted in the
-- key's size) but for those it has: a script sent again after its reply was lost (redis-py retries a command on a
-- fresh connection) would fail on them, XADD taking only ids past the last.
local function add_events(id, first, ttl_ms)
  local log, size, top = prefix .. id .. ':events', 0, -1
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
  if last then top = tonumber(string.match(last[1], '%-(%d+)$')) end
  for i = first, #ARGV, 2 do
    if tonumber(string.match(ARGV[i], '%-(%d+)$')) > top then
      redis.call('XADD', log, ARGV[i], 'e', ARGV[i + 1])
      size = size + #ARGV[i + 1]
    end
  end
  redis.call('PEXPIRE', log, ttl_ms)
  redis.call('HINCRBY', sizes, id .. ':events', size)
  redis.call('HINCRBY', sizes, 'total', size)
end
"""

# ARGV: prefix, id, record JSON, TTL in seconds, 1 if running, the key's count bound, its size bound, the writing
# replica's id (a running record's owner), '' or (a takeover) the log's last stream id as the taker read it, the
# length of a replica's lease in ms, then a stream id and an event's JSON per event to add to its log. Atomic (one
# script), so replicas and concurrent writers of one key never overshoot its bounds, nor drop another key's records,
# and a record is never stored without the events saved with it (its terminal ones: a resume on any replica that
# finds it finished finds its end in the log).
_SAVE = (
    _INDEX
    + """
local id, payload, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4]) * 1000
local max_stored, max_bytes = tonumber(ARGV[6]), tonumber(ARGV[7])
-- Deleted while it ran: its run (on any replica, told too late or not at all) must not store it again (-1); taken
-- over (its owner gave no sign of life): its owner, alive after all, must not store it again either, and is told
-- (-3: it stops, and ends as stored).
local taken = prefix .. id .. ':taken'
if redis.call('EXISTS', prefix .. id .. ':deleted') == 1 then return -1 end
if redis.call('EXISTS', taken) == 1 then return -3 end
if ARGV[9] ~= '' then
  -- A takeover, only of a record still running, whose owner still gives no sign of life, and whose log has not
  -- grown since the taker read it (nobody else took it over or ended it meanwhile).
  local owner = redis.call('GET', prefix .. id .. ':owner')
  if not redis.call('ZSCORE', running, id) or not owner then return -2 end
  if redis.call('EXISTS', prefix .. 'replica:' .. owner) == 1 then return -2 end
  local last = redis.call('XREVRANGE', prefix .. id .. ':events', '+', '-', 'COUNT', 1)[1]
  if (last and last[1] or '0-0') ~= ARGV[9] then return -2 end
  redis.call('SET', taken, 1, 'PX', ttl)
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
-- Records that expired (Redis dropped them by their TTL) leave the index too: a few per save, each once.
for _, index in ipairs({finished, running}) do
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, 16)) do
    if gone ~= id then forget(gone) end
  end
end
-- The events first: a script that fails midway keeps what it did, and a log's end without its finished record is
-- read to its end, where a finished record without its log's end was followed until it expired.
if #ARGV >= 11 then add_events(id, 11, ttl) end
local before = tonumber(redis.call('HGET', sizes, id)) or 0
redis.call('SET', prefix .. id, payload, 'PX', ttl)
redis.call('HSET', sizes, id, #payload)
redis.call('HINCRBY', sizes, 'total', #payload - before)
if ARGV[5] == '1' then
  redis.call('ZADD', running, now + ttl, id)
  redis.call('ZREM', finished, id)
  redis.call('SET', prefix .. id .. ':owner', ARGV[8], 'PX', ttl)
  alive(ARGV[8], tonumber(ARGV[10]))
else
  redis.call('ZADD', finished, now + ttl, id)
  redis.call('ZREM', running, id)
  redis.call('DEL', prefix .. id .. ':owner')
end
-- A running record whose owner gives no sign of life (its lease expired: see RedisStore): it will not end, and counts
-- in its key's bounds like a finished one. Among the first few running records only: this stays O(1).
local function abandoned_one()
  for _, other in ipairs(redis.call('ZRANGE', running, 0, 15)) do
    local owner = redis.call('GET', prefix .. other .. ':owner')
    if other ~= id and owner and redis.call('EXISTS', prefix .. 'replica:' .. owner) == 0 then return other end
  end
end
-- Past the bounds, this key's oldest finished record goes (never the one just stored), else an abandoned running
-- one (never a running one whose replica lives).
local dropped = 0
while redis.call('ZCARD', finished) + redis.call('ZCARD', running) > max_stored
    or tonumber(redis.call('HGET', sizes, 'total')) > max_bytes do
  local oldest = redis.call('ZRANGE', finished, 0, 1)
  local victim = oldest[1]
  if victim == id then victim = oldest[2] end
  if not victim then
    victim = abandoned_one()
    if not victim then break end
    -- Its replica may be alive after all (cut off from Redis for that long): refused and told like a taken-over
    -- one's, it stops, and its next save cannot bring the record back over a log reduced to its last events.
    redis.call('SET', prefix .. victim .. ':taken', 1, 'PX', ttl)
  end
  forget(victim)
  dropped = dropped + 1
end
-- The index lives as long as its last record (another replica may have a longer TTL: never shortened).
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return dropped
"""
)

# ARGV: prefix, id, TTL in seconds, then a stream id and an event's JSON per event. A record that is gone (deleted,
# dropped, expired) gets no events: they would be a log without a record, uncounted, for a TTL (0). One taken over
# (or dropped as abandoned) gets none either, and its writer is told (-1). No lease renewal here: this is the hot
# path of a background stream, and the timer renews it.
_APPEND = (
    _INDEX
    + """
local id = ARGV[2]
if redis.call('EXISTS', prefix .. id .. ':taken') == 1 then return -1 end  -- its end is written, or it was dropped
if redis.call('HEXISTS', sizes, id) == 0 then return 0 end
add_events(id, 4, tonumber(ARGV[3]) * 1000)
return 1
"""
)

# ARGV: prefix, id, TTL in seconds, the cancel channel. A running record's run may be on another replica: it is told
# to stop (as by a cancel), and a marker, for a TTL, keeps its last saves (as it stops, or if it ended meanwhile) from
# storing the deleted response again. Only running records get one: at most as many as runs were started.
_DELETE = (
    _INDEX
    + """
local id = ARGV[2]
if redis.call('ZSCORE', running, id) then
  redis.call('SET', prefix .. id .. ':deleted', 1, 'EX', ARGV[3])
  redis.call('PUBLISH', ARGV[4], id)
end
forget(id)
"""
)


# ARGV: prefix, id, the reading replica's id. 1 if the record names an owner (it is running), not the reader, and
# that replica gives no sign of life: its lease key (`replica:<owner>`, renewed while it serves) expired.
_ABANDONED = """
local owner = redis.call('GET', ARGV[1] .. ARGV[2] .. ':owner')
if not owner or owner == ARGV[3] or redis.call('EXISTS', ARGV[1] .. 'replica:' .. owner) == 1 then return 0 end
return 1
"""


class RedisStore:
    """Records as JSON keys with a TTL, event logs as Redis streams (`XADD`, `XREAD BLOCK`), cancels by pub/sub.

    Bounded per key id like the memory store, by an index per key id that Lua scripts keep (atomic in Redis, so across
    replicas); the scripts name record keys they compute, so one Redis (or primary), not a Redis Cluster.

    Each replica holds a lease in Redis while it serves (renewed every third of `OWNER_LEASE_SECONDS`, and by each
    save of a running record, not by each append of events: the hot path), and its running records name it as their
    owner. A running record whose owner's lease expired (the replica crashed, was killed, or lost Redis that long) is
    taken over by the first replica that reads it (a `GET`, a resume, a follower's idle check; nothing scans for
    them): stored `failed` with its `response.failed`, once, atomically.
    """

    CANCEL_CHANNEL = "haystream:responses:cancel"
    #: Waits between attempts to (re)subscribe to the cancel channel while Redis is unreachable: doubling up to this.
    RECONNECT_MAX_SECONDS = 30.0

    #: Connections beyond one per stream: saves, appends and reads of the runs, and the cancel listener.
    SPARE_CONNECTIONS = 32
    #: How long a command waits for a free connection when every one is in use, before the store is unavailable.
    CONNECTION_WAIT_SECONDS = 10.0
    #: How long a replica's running responses outlive its last sign of life before a reader reports them failed.
    OWNER_LEASE_SECONDS = 30.0

    def __init__(
        self,
        url: str,
        ttl_seconds: float,
        max_stored: int,
        max_bytes: int,
        prefix: str = "haystream:responses:",
        *,
        max_streams: int = 1024,
        owner: str | None = None,
    ) -> None:
        try:
            from redis import asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialWithJitterBackoff
            from redis.exceptions import ConnectionError, RedisError
        except ImportError:
            raise RuntimeError("HAYSTREAM_REDIS_URL needs the redis package: pip install 'haystream[redis]'") from None
        # A pooled connection that Redis closed (a restart) fails on its next use: try twice more on a fresh one.
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2)
        # Every stream that follows a response holds a connection in a blocking read, so the pool has one per stream
        # the server admits (`max_streams`) and spares; redis-py's default pool (100) failed the 101st at once with
        # "Too many connections". Connections open on demand: the size costs nothing until used.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_streams + self.SPARE_CONNECTIONS,
            timeout=self.CONNECTION_WAIT_SECONDS,
            retry=retry,
            retry_on_error=[ConnectionError],
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self._errors: type[Exception] = RedisError
        # redis-py >= 6 ends any read after `socket_timeout` (5 s by default), a blocking XREAD included: block for
        # less than that, and wait out the rest of an idle period with another XREAD.
        options = self._redis.connection_pool.connection_kwargs
        socket_timeout = options.get("socket_timeout", options.get("orig_socket_timeout"))  # redis-py 8 has the latter
        self._block_limit = socket_timeout / 2 if socket_timeout else None
        self.ttl = max(1, int(ttl_seconds))
        self.max_stored = max_stored
        self.max_bytes = max_bytes
        self._prefix = prefix
        self._save = self._redis.register_script(_SAVE)
        self._append = self._redis.register_script(_APPEND)
        self._delete = self._redis.register_script(_DELETE)
        self._abandoned = self._redis.register_script(_ABANDONED)
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self.owner = owner or uuid.uuid4().hex  # this replica, as the owner of the records of its runs
        self._lease: asyncio.Task[None] | None = None
        self._back = asyncio.Event()  # see `reachable_again`: set by the lease's renewal after it failed

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            with _cancellation_kept():
                yield
        except self._errors as error:
            logger.warning("the response store (Redis) is unavailable: %s", error)
            raise StoreUnavailable from error

    async def save(
        self, record: StoredResponse, log: EventLog | None = None, events: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        with self._reachable():
            written = await self._write(record, events)
        if written == -3:
            raise ResponseTakenOver(record.response["id"])

    async def _write(self, record: StoredResponse, events: Sequence[Mapping[str, Any]], taking: str = "") -> int:
        """Run `_SAVE` (`taking`: for a takeover, the log's last stream id as read); what it returned."""
        payload = orjson.dumps(
            {
                "key_id": record.key_id,
                "response": record.response,
                "messages": record.messages,
                "input_items": record.input_items,
            }
        )
        running = record.response.get("status") in RUNNING_STATUSES
        id = record.response["id"]
        arguments: list[Any] = [self._prefix, id, payload, self.ttl, int(running), self.max_stored, self.max_bytes]
        arguments += [self.owner, taking, self._lease_ms, *_stream_entries(events)]
        return cast(int, await self._save(keys=self._index(record.key_id), args=arguments))

    async def get(self, id: str, key_id: str) -> StoredResponse | None:
        if ":" in id:
            # No response id has one (`previous_response_id` comes unchecked from the body): such an id names an event
            # log, an index or a marker, which read as a record failed with WRONGTYPE, a 503 logged as an outage.
            return None
        with self._reachable():
            record = await self._read(id)
            if record is None or record.key_id != key_id:
                return None
            if record.response.get("status") in RUNNING_STATUSES and await self._take_over_if_abandoned(id):
                record = await self._read(id)
        return record

    async def _read(self, id: str) -> StoredResponse | None:
        raw = await self._redis.get(self._key(id))
        if raw is None:
            return None
        data = orjson.loads(raw)
        # A record stored by a version before input items has none: it lists as empty.
        return StoredResponse(data["key_id"], data["response"], data["messages"], data.get("input_items", []))

    async def _take_over_if_abandoned(self, id: str) -> bool:
        """If `id` runs on a replica whose lease expired, store it failed (with its `response.failed`, for a
        background response) unless someone else ended it first; whether it was tried (read it again)."""
        if not await self._abandoned(args=[self._prefix, id, self.owner]):
            return False
        record = await self._read(id)
        if record is None or record.response.get("status") not in RUNNING_STATUSES:
            return True
        # The record was stored at the run's start: the output so far is in its log (read once, at the takeover).
        logged: Any = await self._redis.xrange(self._log(id))
        top = logged[-1][0].decode() if logged else "0-0"
        response = record.response
        if logged:
            response = {**response, "output": output_of(orjson.loads(fields[b"e"]) for _, fields in logged)}
        failure = replica_lost()
        response = abandoned(response, failure)
        events: list[dict[str, Any]] = []
        if response.get("background"):  # the only responses whose events are kept
            sequence_number = int(top.split("-")[1])  # stream id "0-(n+1)" is event n: this one is the next
            events.append({"type": "response.failed", "sequence_number": sequence_number, "response": response})
            events[0]["error"] = dict(failure.to_dict()["error"])
        failed = StoredResponse(record.key_id, response, record.messages, record.input_items)
        if await self._write(failed, events, taking=top) >= 0:
            logger.warning("response %s: its replica gave no sign of life; stored as failed", id)
            # Its replica may be alive after all (Redis was out of its reach): told, its run stops now, not at its
            # next write, which may be far off (a long first token) or never come.
            await self._redis.publish(self.CANCEL_CHANNEL, id)
        return True

    async def delete(self, id: str, key_id: str) -> bool:
        """Also stops a running record's run on whichever replica runs it (see `_DELETE`)."""
        if await self.get(id, key_id) is None:
            return False
        with self._reachable():
            await self._delete(keys=self._index(key_id), args=[self._prefix, id, self.ttl, self.CANCEL_CHANNEL])
        return True

    async def append(self, id: str, key_id: str, events: Sequence[Mapping[str, Any]]) -> None:
        entries = _stream_entries(events)
        with self._reachable():
            arguments = [self._prefix, id, self.ttl, *entries]
            added = await self._append(keys=self._index(key_id), args=arguments)
        if added == -1:
            raise ResponseTakenOver(id)

    async def follow(self, id: str, after: int, idle: float) -> AsyncGenerator[Batch, None]:
        log = self._log(id)
        cursor = f"0-{after + 1}" if after >= 0 else "0-0"
        loop = asyncio.get_running_loop()
        quiet_until = loop.time() + idle
        with self._reachable():
            if await self._ended_within(log, after):
                return
        while True:
            wait = quiet_until - loop.time()
            if self._block_limit is not None:
                wait = min(wait, self._block_limit)
            with self._reachable():
                found: Any = await self._redis.xread({log: cursor}, block=max(1, int(wait * 1000)), count=512)
                if not found and not await self._redis.exists(log, self._key(id)):
                    # Before its terminal event (after it, the follow ended): a replay ending here without a word
                    # would look complete to a client that does not check for the end.
                    raise ResponseGone(id)
                if not found and await self._ended_within(log, after):
                    return  # it ended with an event at or before `after`: nothing more will come
                if not found and await self._take_over_if_abandoned(id):
                    continue  # its end is in the log now (or another's, who ended it first)
            if not found:
                if loop.time() >= quiet_until:
                    yield None
                    quiet_until = loop.time() + idle
                continue
            entries = found[0][1]
            cursor = cast(str, entries[-1][0])
            batch = [orjson.loads(fields[b"e"]) for _, fields in entries]
            yield batch
            if batch[-1]["type"] in TERMINAL_EVENTS:
                return
            quiet_until = loop.time() + idle

    async def request_cancel(self, id: str) -> None:
        with self._reachable():
            await self._redis.publish(self.CANCEL_CHANNEL, id)

    async def start(self, on_cancel: Callable[[str], None]) -> None:
        """Listen for cancels in a task that subscribes, and subscribes again after Redis was unreachable. Returns
        once subscribed, or after the first failed attempt (logged): the server starts without Redis. Takes this
        replica's lease first and renews it until `close()`."""
        with contextlib.suppress(self._errors):
            await self._renew_lease()
        self._lease = asyncio.create_task(self._keep_lease())
        self._listener = asyncio.create_task(self._listen(on_cancel))
        first_attempt = asyncio.ensure_future(self._listening.wait())
        await asyncio.wait({first_attempt, self._listener}, return_when=asyncio.FIRST_COMPLETED)
        first_attempt.cancel()

    async def _listen(self, on_cancel: Callable[[str], None]) -> None:
        wait = 0.5
        while True:
            pubsub = self._redis.pubsub()
            try:
                with _cancellation_kept():  # else `close()` would wait on a listener that never ends
                    await pubsub.subscribe(self.CANCEL_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        on_cancel(message["data"].decode())
                    elif message.get("type") == "subscribe":
                        # Only Redis' confirmation means cancels are heard: right after an outage, SUBSCRIBE can
                        # go out on a pooled connection that Redis already closed, and sending it succeeds.
                        if wait > 0.5:
                            logger.warning("the response store (Redis) is reachable again; cancels are heard")
                        wait = 0.5
                        self._listening.set()
            except self._errors as error:
                logger.error(
                    "the response store (Redis) is unreachable (%s): Responses routes answer 503 and cancels from "
                    "other replicas go unheard; trying again in %gs",
                    error,
                    wait,
                )
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            self._listening.set()  # start() returns after the first attempt, failed or not
            await asyncio.sleep(wait)
            wait = min(wait * 2, self.RECONNECT_MAX_SECONDS)

    @property
    def _lease_ms(self) -> int:
        return int(self.OWNER_LEASE_SECONDS * 1000)

    async def _renew_lease(self) -> None:
        await self._redis.set(self._replica_key(self.owner), 1, px=self._lease_ms)

    def reachable_again(self) -> asyncio.Event:
        return self._back

    async def _keep_lease(self) -> None:
        """Renew this replica's lease every third of its length: a timer, one write per replica, not per run. Its
        first renewal after failing ones says that Redis is back (`reachable_again`): runs whose end waits for Redis
        store it then, not at their next attempt, up to `END_RETRY_MAX_SECONDS` later."""
        lost = False
        while True:
            try:
                await self._renew_lease()
                wait = self.OWNER_LEASE_SECONDS / 3
                if lost:
                    logger.warning("the response store (Redis) answers again: this replica's lease is renewed")
                    self._back.set()
                    self._back = asyncio.Event()
                lost = False
            except self._errors as error:
                if not lost:
                    logger.warning("this replica's lease in the response store (Redis) is not renewed: %s", error)
                lost = True
                wait = 1.0  # Redis is back soon: renew before a reader takes this replica's runs over
            except Exception:  # a fault nobody foresaw must not end the renewals: this replica's runs would be lost
                logger.exception("the renewal of this replica's lease in the response store failed")
                wait = 1.0
            await asyncio.sleep(wait)

    async def close(self) -> None:
        """Stop listening and release the lease (the server ended its runs before: any still running in the store
        had their end unstored, and readers now report them failed at once) and the connections."""
        for task in (self._listener, self._lease):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._lease is not None:
            with contextlib.suppress(self._errors):
                await self._redis.delete(self._replica_key(self.owner))
        await self._redis.aclose()

    def _key(self, id: str) -> str:
        return f"{self._prefix}{id}"

    def _index(self, key_id: str) -> list[str]:
        """The keys of `key_id`'s index (see `_INDEX`)."""
        return [f"{self._prefix}key:{key_id}:{name}" for name in ("finished", "running", "sizes")]

    async def _ended_within(self, log: str, after: int) -> bool:
        """Whether the log's last event is terminal and numbered `after` or less: a follower past it waited for events
        that never come (pings until the log expired) where the memory store ends at once."""
        last: Any = await self._redis.xrevrange(log, count=1)
        if not last:
            return False
        event = orjson.loads(last[0][1][b"e"])
        return bool(event["type"] in TERMINAL_EVENTS and event["sequence_number"] <= after)

    def _log(self, id: str) -> str:
        return f"{self._prefix}{id}:events"

    def _replica_key(self, owner: str) -> str:
        """The lease of replica `owner`: present while it serves."""
        return f"{self._prefix}replica:{owner}"


def abandoned(response: dict[str, Any], failure: OpenAIError) -> dict[str, Any]:
    """`response` (running) as failed with `failure`, its unfinished output items incomplete, as a run that fails
    leaves it."""
    failed = snapshot(response)
    failed["status"] = "failed"
    failed["error"] = {"code": "server_error", "message": failure.message}  # one of the Responses API's codes
    for item in failed.get("output") or []:
        if isinstance(item, dict) and item.get("status") == "in_progress":
            item["status"] = "incomplete"
    return failed


def _stream_entries(events: Sequence[Mapping[str, Any]]) -> list[Any]:
    """A stream id and the JSON of each event, for the scripts' XADD: stream id "0-(n+1)" for sequence number n, so
    that XREAD after "0-(N+1)" is exactly "starting_after=N"."""
    entries: list[Any] = []
    for event in events:
        entries += [f"0-{event['sequence_number'] + 1}", orjson.dumps(event)]
    return entries


@contextlib.contextmanager
def _cancellation_kept() -> Iterator[None]:
    """Raise `CancelledError` after awaits that returned although the task was cancelled while in them.

    redis-py sends every command under `asyncio.wait_for` (with its default `socket_timeout`). Before Python 3.12,
    `wait_for` returns the result instead of raising when the cancellation lands in the loop turn in which the send
    finishes (CPython gh-86296), and the cancel is lost: a background run cancelled while it stored an event went on
    waiting for its next item. The task still counts the request (`cancelling()`), which is how it is found here.
    """
    task = asyncio.current_task()
    requested = task.cancelling() if task is not None else 0
    yield
    if task is not None and task.cancelling() > requested:
        raise asyncio.CancelledError


def create_store(
    redis_url: str | None, ttl_seconds: float, max_stored: int, max_bytes: int, *, max_streams: int
) -> ResponseStore:
    """The Redis store when a URL is configured (with a connection for each of `max_streams` streams), else the
    memory store; either bounded per key id by `max_stored` records and `max_bytes` of them."""
    if redis_url:
        return RedisStore(redis_url, ttl_seconds, max_stored, max_bytes, max_streams=max_streams)
    return MemoryStore(ttl_seconds, max_stored, max_bytes)
