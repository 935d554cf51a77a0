"""The Responses API while its Redis store is down and once it is back: a real redis-server stopped and started again
on the same port, real servers, the openai SDK and httpx."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from haystream.server.auth import key_id
from haystream.server.response_store import RedisStore, StoredResponse, StoreUnavailable
from support import RedisServer, redis_client, serving, unique


class LogHeard(logging.Handler):
    """Counts the records of the `haystream.server` logger that contain `text`; `wait_for` blocks on them."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.count = 0
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            with self._changed:
                self.count += 1
                self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 60) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= count, timeout)


@contextlib.contextmanager
def heard(text: str) -> Iterator[LogHeard]:
    """The `haystream.server` log records that contain `text`, from now to the end of the block."""
    handler = LogHeard(text)
    logger = logging.getLogger("haystream.server")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def reconnected() -> Iterator[LogHeard]:
    """Each cancel listener that subscribed again after Redis was unreachable."""
    with heard("reachable again; cancels are heard") as handler:
        yield handler


def ask(scenario: str = "fake?tokens=3", **fields: object) -> dict[str, object]:
    return {"model": "fake_async", "input": "hello", "scenario": scenario, **fields}


def assert_store_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "store_unavailable")
    assert "127.0.0.1" not in error["message"]  # Redis' own message (its address) stays in the log


def test_while_redis_is_down_responses_are_503_chat_works_and_everything_recovers(upstream, reconnected):
    redis = RedisServer().start()
    try:
        with (
            serving(upstream, redis_url=redis.url) as one,
            serving(upstream, redis_url=redis.url) as two,
            httpx.Client(base_url=one.url, timeout=30) as client,
        ):
            stored = client.post("/v1/responses", json=ask())
            assert stored.status_code == 200
            redis.stop()

            for fields in ({}, {"stream": True}, {"background": True}):
                assert_store_unavailable(client.post("/v1/responses", json=ask(**fields)))
            assert_store_unavailable(client.get(f"/v1/responses/{stored.json()['id']}"))
            assert_store_unavailable(client.delete(f"/v1/responses/{stored.json()['id']}"))
            unstored = client.post("/v1/responses", json=ask(store=False))  # needs no store
            assert (unstored.status_code, unstored.json()["status"]) == (200, "completed")
            chat = {"model": "fake_async", "messages": [{"role": "user", "content": "hi"}], "scenario": "fake?tokens=2"}
            assert client.post("/v1/chat/completions", json=chat).status_code == 200

            redis.start()
            # The pooled connections that Redis closed are replaced: the first request afterwards is answered.
            again = client.post("/v1/responses", json=ask())
            assert (again.status_code, again.json()["status"]) == (200, "completed")
            assert client.get(f"/v1/responses/{again.json()['id']}").status_code == 200
            # Both replicas listen for cancels again: one asked through the other replica stops the run.
            assert reconnected.wait_for(2)
            scenario = unique("fake?tokens=2000&hold_after=1")
            with (
                openai.OpenAI(base_url=one.url + "/v1", api_key="unused", max_retries=0) as a,
                openai.OpenAI(base_url=two.url + "/v1", api_key="unused", max_retries=0) as b,
            ):
                created = a.responses.create(
                    model="fake_async", input="hello", background=True, extra_body={"scenario": scenario}
                )
                record = upstream.wait_for_requests(1, model=scenario)[0]
                assert b.responses.cancel(created.id).status == "cancelled"
            record.wait()
            assert record.client_hung_up and not record.completed
    finally:
        redis.close()


def test_a_server_starts_while_redis_is_unreachable_and_uses_it_once_it_is_up(upstream, reconnected):
    redis = RedisServer()  # not started yet: nothing listens on its port
    try:
        with serving(upstream, redis_url=redis.url) as server, httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/ready").status_code == 200  # chat does not need the store
            assert_store_unavailable(client.post("/v1/responses", json=ask()))
            redis.start()
            assert reconnected.wait_for(1)
            created = client.post("/v1/responses", json=ask())
            assert (created.status_code, created.json()["status"]) == (200, "completed")
            retrieved = client.get(f"/v1/responses/{created.json()['id']}")
            assert retrieved.json()["output"] == created.json()["output"]
    finally:
        redis.close()


@pytest.mark.parametrize("use_redis", [False, True], ids=["memory", "redis"])
def test_a_foreground_response_is_stored_from_its_start_but_only_background_ones_keep_their_events(upstream, use_redis):
    """OpenAI replays (`GET ?stream=true`) background responses only. A foreground one's event log was kept for the
    whole TTL all the same (~880 KB for a 2,000-token answer, in memory or as one XADD per event in Redis); now its
    record is stored as soon as it starts (a GET during the run finds it in progress) and its events are not."""
    redis = RedisServer().start() if use_redis else None
    try:
        settings = {"redis_url": redis.url} if redis else {}
        with (
            serving(upstream, **settings) as server,
            openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as sdk,
        ):
            scenario = unique("fake?tokens=2000&hold_after=1")
            with sdk.responses.create(
                model="fake_async", input="hello", stream=True, extra_body={"scenario": scenario}
            ) as stream:
                events = iter(stream)
                response_id = next(event for event in events if event.type == "response.created").response.id
                next(event for event in events if event.type == "response.output_text.delta")
                assert sdk.responses.retrieve(response_id).status == "in_progress"
            done = sdk.responses.create(model="fake_async", input="hello", extra_body={"scenario": "fake?tokens=3"})
            assert sdk.responses.retrieve(done.id).output_text == done.output_text
            with pytest.raises(openai.BadRequestError, match="Only background responses can be streamed"):
                sdk.responses.retrieve(done.id, stream=True)
            background = sdk.responses.create(
                model="fake_async", input="hello", background=True, extra_body={"scenario": "fake?tokens=3"}
            )
            replayed = sdk.responses.retrieve(background.id, stream=True)  # follows it to its end
            assert [event.type for event in replayed][-1] == "response.completed"
            if redis is not None:
                with redis_client(redis.url) as direct:
                    assert not direct.exists(f"haystream:responses:{done.id}:events")
                    assert direct.exists(f"haystream:responses:{background.id}:events")
    finally:
        if redis is not None:
            redis.close()


def test_a_replay_from_redis_that_loses_redis_ends_with_an_error_event(upstream):
    """Another replica replays a running background response from Redis; Redis stops meanwhile. The replay ends with
    an `error` event that says so (it was an exception after the headers: a cut without a word)."""
    redis = RedisServer().start()
    try:
        with (
            serving(upstream, redis_url=redis.url) as one,
            serving(upstream, redis_url=redis.url) as two,
            httpx.Client(timeout=30) as client,
        ):
            scenario = unique("fake?tokens=2000&hold_after=1")
            created = client.post(one.url + "/v1/responses", json=ask(scenario, background=True)).json()
            upstream.wait_for_requests(1, model=scenario)
            with client.stream("GET", f"{two.url}/v1/responses/{created['id']}?stream=true") as replay:
                lines = replay.iter_lines()
                next(line for line in lines if line == "event: response.output_text.delta")
                redis.stop()
                rest = list(lines)  # to the end of the replay
            error = next(json.loads(line[len("data: ") :]) for line in rest if line.startswith('data: {"type":"error"'))
            assert (error["code"], error["message"]) == ("store_unavailable", StoreUnavailable().message)
            assert "event: error" in rest
    finally:
        redis.close()


async def test_a_store_call_that_is_cancelled_at_any_turn_raises_cancelled():
    """redis-py sends each command under `asyncio.wait_for`, which before Python 3.12 returns normally when the
    cancellation lands in the turn the send finishes (CPython gh-86296). A background run cancelled by another
    replica while it stored an event then went on waiting for its (held) upstream: the cancel was lost, the run
    ended at shutdown. Cancelled at each loop turn of each command in turn, every call must raise."""
    redis = RedisServer().start()
    store = RedisStore(redis.url, ttl_seconds=60, max_stored=1000, max_bytes=2**20)
    record = StoredResponse("key", {"id": "resp_1", "status": "in_progress"}, [])
    sequence = itertools.count()

    def event() -> list[dict[str, object]]:
        return [{"type": "response.output_text.delta", "delta": "x", "sequence_number": next(sequence)}]

    operations = {
        "save": lambda: store.save(record),
        "get": lambda: store.get("resp_1", "key"),
        "append": lambda: store.append("resp_1", "key", event()),
    }
    try:
        await store.save(record)  # connected: the turns counted below are those of one command
        for name, operation in operations.items():
            for turns in itertools.count():
                task = asyncio.ensure_future(operation())
                for _ in range(turns):
                    await asyncio.sleep(0)
                if task.done():  # the call finished before this turn: every turn before it was tried
                    assert turns > 1, name
                    break
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
    finally:
        await store.close()
        redis.close()


async def test_as_many_followers_as_the_server_admits_streams_each_get_a_connection():
    """Each stream that follows a response from Redis holds a connection in a blocking read, and the server admits
    `max_streams` of them: redis-py's default pool (100 connections) failed the 101st at once ("Too many
    connections", a 503 to the client)."""
    redis = RedisServer().start()
    followers = 150
    store = RedisStore(redis.url, ttl_seconds=60, max_stored=10, max_bytes=2**20, max_streams=followers)
    record = StoredResponse("key", {"id": "resp_1", "status": "in_progress"}, [])
    all_following = asyncio.Event()
    following = 0

    async def follow() -> list[int]:
        nonlocal following
        seen: list[int] = []
        async for batch in store.follow("resp_1", -1, idle=60):
            seen += [event["sequence_number"] for event in batch or ()]
            if seen == [0]:
                following += 1
                if following == followers:
                    all_following.set()
        return seen

    try:
        await store.save(record)
        await store.append("resp_1", "key", [{"type": "response.in_progress", "sequence_number": 0}])
        tasks = [asyncio.ensure_future(follow()) for _ in range(followers)]
        every_one = asyncio.ensure_future(all_following.wait())
        done, _ = await asyncio.wait([every_one, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert every_one in done, [task.exception() for task in done][:1]  # a follower that failed ends first
        await store.append("resp_1", "key", [{"type": "response.completed", "sequence_number": 1}])
        assert await asyncio.gather(*tasks) == [[0, 1]] * followers
    finally:
        await store.close()
        redis.close()


@pytest.mark.parametrize("use_redis", [False, True], ids=["memory", "redis"])
def test_a_resume_past_the_last_event_of_a_finished_response_ends_at_once(upstream, use_redis):
    """A client that already had every event (it resumes after the terminal one, or later) got pings until the
    record expired from Redis (an hour), where the memory store ended at once; a `starting_after` past 2**64 was an
    error event saying the store was unavailable."""
    redis = RedisServer().start() if use_redis else None
    try:
        settings = {"redis_url": redis.url} if redis else {}
        with (
            serving(upstream, **settings) as server,
            # Pings come every 15 s (the default): a follower that waits for nothing fails on this read timeout.
            httpx.Client(base_url=server.url, timeout=10) as client,
        ):
            created = client.post("/v1/responses", json=ask(background=True)).json()
            replay = client.get(f"/v1/responses/{created['id']}?stream=true")  # follows it to its end
            last = [line for line in replay.text.splitlines() if line.startswith("data: ")][-1]
            completed = json.loads(last[len("data: ") :])
            assert completed["type"] == "response.completed"
            for after in (completed["sequence_number"], completed["sequence_number"] + 5, 10**30):
                resumed = client.get(f"/v1/responses/{created['id']}?stream=true&starting_after={after}")
                assert resumed.status_code == 200
                assert not [line for line in resumed.text.splitlines() if line.strip()]  # no event, error or ping
    finally:
        if redis is not None:
            redis.close()


async def test_a_cancel_that_waits_for_another_replicas_run_takes_a_place_among_the_streams(upstream):
    """A cancel of a run on another replica waits for its end in a blocking Redis read, up to 10 s (a run that never
    ends: its replica died, its record says `in_progress` until the TTL). Uncounted, one key's concurrent cancels held
    every connection of the pool (`max_streams` + 32): another key's `GET` waited 9 s for one, or got 503. Without a
    place, the cancel is sent and answered at once."""
    redis = RedisServer().start()
    owner, other = "key-owner-aaaaaaaa", "key-other-bbbbbbbb"
    crashed = RedisStore(redis.url, 60, max_stored=10, max_bytes=2**20)  # the replica that ran it, and died
    zombie = StoredResponse(key_id(owner), {"id": "resp_zombie", "status": "in_progress", "background": True}, [])
    try:
        with (
            serving(upstream, redis_url=redis.url, api_keys=f"{owner},{other}", max_streams_per_key=1) as server,
            redis_client(redis.url) as direct,
            httpx.Client(base_url=server.url, timeout=30) as http,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            await crashed.save(zombie)
            cancels = direct.pubsub()
            cancels.subscribe(RedisStore.CANCEL_CHANNEL)
            assert cancels.get_message(timeout=10)["type"] == "subscribe"
            as_owner, as_other = ({"authorization": f"Bearer {key}"} for key in (owner, other))
            mine = http.post("/v1/responses", json=ask(), headers=as_other).json()["id"]

            first = pool.submit(http.post, "/v1/responses/resp_zombie/cancel", headers=as_owner)
            assert cancels.get_message(timeout=10)["data"] == b"resp_zombie"  # it holds its place and waits
            # At its key's cap, a cancel is sent all the same and answered at once, without a place to wait in.
            second = http.post("/v1/responses/resp_zombie/cancel", headers=as_owner)
            assert (second.status_code, second.json()["status"]) == (200, "in_progress"), second.text
            assert cancels.get_message(timeout=10)["data"] == b"resp_zombie"
            assert not first.done()  # the first still waits, in the key's one place
            assert http.get(f"/v1/responses/{mine}", headers=as_other).status_code == 200

            ended = [{"type": "response.cancelled", "sequence_number": 0}]
            await crashed.append("resp_zombie", zombie.key_id, ended)  # the first cancel's wait ends
            assert first.result(timeout=30).status_code == 200
            assert http.post("/v1/responses/resp_zombie/cancel", headers=as_owner).status_code == 200  # place back
    finally:
        await crashed.close()
        redis.close()


async def test_an_events_append_writes_no_lease(redis_url):
    """A background stream's appends are the store's hot path (one per flush of events). Each renewed its replica's
    lease too, one more write (replicated, in the AOF) per append for what a timer does once every ten seconds per
    replica; the running record's saves still renew it."""
    store = RedisStore(redis_url, 60, max_stored=10, max_bytes=10**9)  # not started: no renewal timer
    try:
        record = StoredResponse("key", {"id": "resp_hot", "status": "in_progress", "output": []})
        await store.save(record)
        with redis_client(redis_url) as redis:
            lease = f"haystream:responses:replica:{store.owner}"
            assert redis.exists(lease)  # a running record's save renews it
            redis.delete(lease)
            for number in range(1, 4):
                await store.append("resp_hot", "key", [{"type": "response.in_progress", "sequence_number": number}])
            assert not redis.exists(lease)
            assert len(redis.xrange("haystream:responses:resp_hot:events")) == 3
    finally:
        await store.close()
