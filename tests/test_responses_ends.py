"""How Responses streams and stored responses end when something goes wrong at the end: the number of an `error`
event that ends a stream, a terminal event that Redis did not take at once, a run ended before its first step. Real
servers on loopback sharing a real redis-server, the openai SDK and httpx; synchronised on the fake upstream's held
streams and on the events read, never on time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from haystream.server import responses as responses_module
from haystream.server.response_store import RedisStore, StoredResponse
from support import OPS_WRAPPERS, ServerThread, redis_client, serving, sse, unique
from test_drain import serving_process
from test_drain_responses import held, until_first_text
from test_response_store import heard


def text(tokens: int) -> str:
    return "".join(f"t{i} " for i in range(tokens))


def sdk(server: ServerThread) -> openai.OpenAI:
    # Pings come every 15 s (the default): a stream that waits for an end that never comes fails on this timeout.
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=10)


@contextlib.contextmanager
def redis_refuses_xadd(url: str) -> Iterator[None]:
    """Redis refuses `XADD` (adding to an event log, also inside the store's scripts) and takes every other command:
    a store that fails for one write, and only for the test's block."""
    with redis_client(url) as redis:
        redis.execute_command("ACL", "SETUSER", "default", "-xadd")
        try:
            yield
        finally:
            redis.execute_command("ACL", "SETUSER", "default", "+xadd")


def on_loop(server: ServerThread, call) -> None:
    """Run `call()` on the server's loop, and return once it has run."""

    async def run() -> None:
        call()

    assert server.loop is not None
    asyncio.run_coroutine_threadsafe(run(), server.loop).result(10)


def endpoint(server: ServerThread):
    """The server's `ResponsesEndpoint`."""
    return server.app.app.app.responses


@pytest.fixture(scope="module")
def replicas(upstream, redis_url):
    with (
        serving(upstream, pipelines_dir=str(OPS_WRAPPERS), redis_url=redis_url) as running,
        serving(upstream, pipelines_dir=str(OPS_WRAPPERS), redis_url=redis_url) as following,
    ):
        yield running, following


def test_a_resume_with_the_number_of_an_error_event_loses_and_repeats_nothing(upstream, replicas):
    """An `error` event that ends a stream (the store unreachable, the replica shutting down) is no event of the log:
    it carries the number of the last event the client has. It had the next event's number, so a client resuming
    with the last number it saw (the SDK's `starting_after`, Open WebUI) skipped that event; and a resume cut before
    any new event said to resume from -1 (everything again)."""
    running, following = replicas
    scenario = held()
    with sdk(running) as a, sdk(following) as b:
        created = a.responses.create(model="scenario", input=scenario, background=True)
        record = upstream.wait_for_requests(1, model=scenario)[0]
        # A resume on the other replica from the start, cut after the first text (the run holds there).
        events = iter(b.responses.retrieve(created.id, stream=True))
        seen = until_first_text(events)
        last = seen[-1].sequence_number
        on_loop(following, endpoint(following).end_for_shutdown)  # cuts the streams that follow a run elsewhere
        rest = list(events)
        assert [event.type for event in rest] == ["error"]
        assert rest[0].sequence_number == last
        assert f"starting_after={last}" in rest[0].message
        # A resume from there, cut before the run sent anything more: its error repeats the number it resumed after.
        again = b.responses.retrieve(created.id, stream=True, starting_after=rest[0].sequence_number)
        on_loop(following, endpoint(following).end_for_shutdown)
        cut = list(again)
        assert [(event.type, event.sequence_number) for event in cut] == [("error", last)]
        assert f"starting_after={last}" in cut[0].message
        record.release()
        resumed = list(a.responses.retrieve(created.id, stream=True, starting_after=cut[0].sequence_number))
        assert resumed[0].sequence_number == last + 1  # nothing lost, nothing repeated
        assert resumed[-1].type == "response.completed"
        deltas = [event.delta for event in seen + resumed if event.type == "response.output_text.delta"]
        assert "".join(deltas) == text(5)


def test_a_background_responses_end_that_redis_did_not_take_is_stored_once_it_does(upstream, replicas, redis_url):
    """The run's last write (its final record and terminal events) fails: the record said `completed` (stored
    first), its log had no terminal event, and a resume on any replica sent pings until the record expired. Now the
    record and its last events are stored in one script, and the run stores them again until Redis takes them."""
    running, following = replicas
    scenario = held(tokens=1)  # after its one token and the release, the run's only write is its end
    with sdk(running) as a, sdk(following) as b:
        created = a.responses.create(model="scenario", input=scenario, background=True)
        record = upstream.wait_for_requests(1, model=scenario)[0]
        resumed = iter(b.responses.retrieve(created.id, stream=True))
        seen = until_first_text(resumed)  # the token's event is in Redis: every write before the end was taken
        with heard("the response store (Redis) is unavailable") as failures, redis_refuses_xadd(redis_url):
            record.release()
            assert failures.wait_for(1)  # the end's write failed
        rest = list(resumed)  # the resume on the other replica gets the end once stored, and stops
        assert [event.type for event in rest][-1] == "response.completed"
        assert rest[0].sequence_number == seen[-1].sequence_number + 1
        stored = b.responses.retrieve(created.id)
        assert (stored.status, stored.output_text) == ("completed", "t0 ")
        again = list(b.responses.retrieve(created.id, stream=True, starting_after=seen[-1].sequence_number))
        assert [(event.type, event.sequence_number) for event in again] == [
            (event.type, event.sequence_number) for event in rest
        ]


async def test_events_written_again_after_a_lost_reply_are_added_once(redis_url):
    """redis-py sends a command again, on a fresh connection, when the connection failed: also one that Redis had
    run, its reply lost. A script that added events then failed on them (XADD takes only ids past the stream's
    last): a 503, and a run whose end's write failed so would have written it again forever."""
    store = RedisStore(redis_url, ttl_seconds=60, max_stored=1000, max_bytes=2**20)
    running = StoredResponse("key", {"id": "resp_again", "status": "in_progress"})
    finished = StoredResponse("key", {"id": "resp_again", "status": "completed"})
    first = [{"type": "response.created", "sequence_number": 0}]
    end = [
        {"type": "response.output_text.done", "sequence_number": 1},
        {"type": "response.completed", "sequence_number": 2},
    ]
    try:
        for _ in range(2):
            await store.save(running, events=first)
        await store.append("resp_again", "key", end[:1])
        for _ in range(2):
            await store.append("resp_again", "key", end[:1])
            await store.save(finished, events=end)
        async with contextlib.aclosing(store.follow("resp_again", -1, 10)) as batches:
            logged = [event async for batch in batches if batch for event in batch]
        assert logged == first + end
        with redis_client(redis_url) as redis:
            counted = int(redis.hget("haystream:responses:key:key:sizes", "resp_again:events"))
        assert counted == sum(len(orjson.dumps(event)) for event in first + end)  # each event counted once
    finally:
        await store.close()


STOPS = {
    "shutdown": lambda endpoint, run: endpoint.end_for_shutdown(),
    "cancel": lambda endpoint, run: endpoint._cancel_local(run.id),  # what a cancel from any replica calls
}


@pytest.mark.parametrize("stop", STOPS)
@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_background_run_stopped_before_its_first_step_stores_its_end(upstream, request, store, stop):
    """A task cancelled before its first step never runs its code: a background response stopped (the shutdown, a
    cancel) right after it was created stayed `queued`, a running response outside its key's bounds, until its TTL,
    and its place among its key's streams stayed taken for good. Stopped here in the loop turn that creates it."""
    settings = {"redis_url": request.getfixturevalue("redis_url")} if store == "redis" else {}
    with serving(upstream, pipelines_dir=str(OPS_WRAPPERS), max_streams_per_key=1, **settings) as server:
        responses = endpoint(server)
        start_background = responses._start_background

        async def then_stop(run, admission) -> None:
            await start_background(run, admission)
            STOPS[stop](responses, run)  # no await between: the run's task has not taken its first step

        responses._start_background = then_stop
        with sdk(server) as client:
            created = client.responses.create(model="scenario", input=held(), background=True)
            assert created.status == "queued"
            if stop == "shutdown":
                with pytest.raises(openai.APIError) as failed:  # the SDK raises on `response.failed`
                    list(client.responses.retrieve(created.id, stream=True))
                assert failed.value.code == "server_shutting_down"
                stored = client.responses.retrieve(created.id)
                assert stored.status == "failed"
                assert stored.error is not None and "shut down" in stored.error.message
            else:
                events = list(client.responses.retrieve(created.id, stream=True))
                assert [event.type for event in events][-1] == "response.cancelled"
                assert client.responses.retrieve(created.id).status == "cancelled"
            responses._start_background = start_background
            # The key's one place among the streams is free again (it was taken for good: 429).
            again = client.responses.create(model="scenario", input=unique("fake?tokens=2"), background=True)
            assert [event.type for event in client.responses.retrieve(again.id, stream=True)][-1] == (
                "response.completed"
            )


@pytest.mark.parametrize("reader", ["follower", "get"])
def test_a_response_whose_replica_died_is_reported_failed_by_the_next_reader(upstream, redis_url, reader):
    """A replica killed mid-run leaves its background response running in Redis: `in_progress` to every `GET` and a
    resume that pings, until its TTL, outside its key's bounds. Once the replica's lease has expired (here: removed,
    as 30 s without renewal would), the next reader (a follower's idle check, a `GET`) stores it `failed`, with a
    `response.failed` right after its last event, and in its key's finished responses."""
    with (
        serving_process(upstream, HAYSTREAM_REDIS_URL=redis_url) as (process, base),
        serving(upstream, pipelines_dir=str(OPS_WRAPPERS), redis_url=redis_url, keepalive_seconds=1) as other,
        openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=10) as dying,
        sdk(other) as client,
        redis_client(redis_url) as redis,
    ):
        created = dying.responses.create(model="scenario", input=held(), background=True)
        # Followed here (or, for a `GET` alone to find it, on the replica that dies: its stream dies with it).
        follower = other.url if reader == "follower" else base
        with httpx.stream("GET", f"{follower}/v1/responses/{created.id}?stream=true", timeout=10) as followed:
            lines = followed.iter_lines()
            next(line for line in lines if line == "event: response.output_text.delta")
            last = orjson.loads(next(lines)[len("data: ") :])["sequence_number"]
            owner = redis.get(f"haystream:responses:{created.id}:owner")
            process.kill()
            process.wait()
            if owner is not None:
                redis.delete(f"haystream:responses:replica:{owner.decode()}")  # its lease ran out
            if reader == "follower":  # already following: it finds out at its next idle check (a second here)
                deadline = time.monotonic() + 30  # pings come every second: a follower that waits for ever fails
                rest = []
                for line in lines:
                    assert time.monotonic() < deadline, "the follower was not told the response failed"
                    rest.append(line)
                failed = orjson.loads(rest[-2][len("data: ") :])  # the last event, then its blank line
                assert (failed["type"], failed["sequence_number"]) == ("response.failed", last + 1)
                assert failed["error"]["code"] == "replica_lost"
        stored = client.responses.retrieve(created.id)
        assert stored.status == "failed"
        assert stored.error is not None and "stopped without ending it" in stored.error.message
        assert stored.output_text == "t0 "  # what it had written is kept
        with httpx.Client(timeout=10) as http:
            resumed = http.get(f"{other.url}/v1/responses/{created.id}?stream=true&starting_after={last}")
        assert [(name, event["sequence_number"]) for name, event in sse(resumed.text)] == [
            ("response.failed", last + 1)
        ]
        index = "haystream:responses:key:anonymous"
        assert redis.zscore(f"{index}:finished", created.id) is not None  # within its key's bounds again
        assert redis.zscore(f"{index}:running", created.id) is None


@contextlib.contextmanager
def owner_and_reader(upstream, owner_url: str, reader_url: str):
    """Two replicas on one Redis (the owner's URL may name another Redis user): the owning server, an SDK client of
    each, and a Redis client."""
    with (
        serving(upstream, pipelines_dir=str(OPS_WRAPPERS), redis_url=owner_url) as owning,
        serving(upstream, pipelines_dir=str(OPS_WRAPPERS), redis_url=reader_url) as reading,
        sdk(owning) as a,
        sdk(reading) as b,
        redis_client(reader_url) as redis,
    ):
        yield owning, a, b, redis


@pytest.mark.parametrize("owner_then", ["writes", "holds"])
def test_a_replica_alive_after_all_ends_its_taken_over_response_as_the_store_does(upstream, redis_url, owner_then):
    """A replica that gave no sign of life for a lease (its renewals lost: Redis out of its reach, the renewal task
    gone) while its run held still had its response taken over by a reader elsewhere: `failed` (`replica_lost`) in
    the store. Back, it was not told: its run went on for nobody (the store dropped its events without a word) and
    its own followers saw `response.completed`, an end no other replica would ever show. Now the taker tells it (a
    cancel), and a write the store refuses tells it too: either way its run stops and ends as stored."""
    with owner_and_reader(upstream, redis_url, redis_url) as (owning, a, b, redis):
        scenario = held()
        created = a.responses.create(model="scenario", input=scenario, background=True)
        record = upstream.wait_for_requests(1, model=scenario)[0]
        followed = iter(a.responses.retrieve(created.id, stream=True))  # on the owner: its local log
        seen = until_first_text(followed)
        store = endpoint(owning).store
        on_loop(owning, store._lease.cancel)  # no renewal from here on, as if Redis were out of its reach
        if owner_then == "writes":  # nor are cancels heard: its run finds out when it writes
            on_loop(owning, store._listener.cancel)
        redis.delete(f"haystream:responses:replica:{store.owner}")  # and the lease ran out
        with heard("another replica reported it failed") as told:
            assert b.responses.retrieve(created.id).status == "failed"  # taken over by this reader
            if owner_then == "writes":
                record.release()
            rest = []
            with pytest.raises(openai.APIError) as failed:  # the SDK raises on `response.failed`
                rest += followed
            assert told.wait_for(1)
        record.release()
        # Its run stopped at its first write after the takeover (that write's events are in its log here only).
        assert len([event for event in rest if event.type == "response.output_text.delta"]) <= 1
        assert failed.value.code == "replica_lost"  # this replica's stream ends as the store says
        stored = b.responses.retrieve(created.id)
        assert stored.status == "failed"
        assert stored.output_text == "t0 "  # what the owner wrote after the takeover was not added
        logged = [orjson.loads(fields[b"e"]) for _, fields in redis.xrange(f"haystream:responses:{created.id}:events")]
        assert [event["type"] for event in logged].count("response.failed") == 1
        assert logged[-1]["type"] == "response.failed"
        assert [event["sequence_number"] for event in logged] == list(range(len(logged)))
        assert seen[-1].sequence_number < logged[-1]["sequence_number"]


@contextlib.contextmanager
def an_owner_to_cut_off(upstream, redis_url: str):
    """A held one-token background response on an owner whose Redis user (its own) `cut(True)` turns off (its
    connections killed: Redis out of its reach) and `cut(False)` lets back in, followed by a reader's resume past its
    first text. Yields the owning server, the reader's client, a Redis client, the response, its upstream record and
    `cut`; after its one token and the release, the run's only write is its end."""
    with redis_client(redis_url) as redis:
        redis.execute_command("ACL", "SETUSER", "cutoff", "on", ">secret", "~*", "&*", "+@all")

    def cut(off: bool) -> None:
        redis.execute_command("ACL", "SETUSER", "cutoff", "off" if off else "on")
        if off:
            redis.execute_command("CLIENT", "KILL", "USER", "cutoff")

    try:
        owner_url = redis_url.replace("redis://", "redis://cutoff:secret@")
        with owner_and_reader(upstream, owner_url, redis_url) as (owning, a, b, redis):
            scenario = held(tokens=1)
            created = a.responses.create(model="scenario", input=scenario, background=True)
            record = upstream.wait_for_requests(1, model=scenario)[0]
            until_first_text(iter(b.responses.retrieve(created.id, stream=True)))
            yield owning, b, redis, created, record, cut
    finally:
        with redis_client(redis_url) as redis:
            redis.execute_command("ACL", "DELUSER", "cutoff")


def test_a_replica_cut_off_from_redis_past_its_lease_cannot_end_its_taken_over_response_twice(
    upstream, redis_url, monkeypatch
):
    """The owner is really cut off (its Redis user turned off, its connections killed) while its run ends: its end
    waits for Redis, its lease runs out, a reader elsewhere takes the response over, and then Redis lets the owner back
    in. Its end must not be stored over the takeover's (one terminal event, `failed`), and it must not log that it
    was: it logged "its end is stored" while Redis had refused it."""
    monkeypatch.setattr(RedisStore, "OWNER_LEASE_SECONDS", 1.5)  # both replicas are in this process
    database = redis_url.rsplit("/", 1)[1]
    with an_owner_to_cut_off(upstream, redis_url) as (owning, b, redis, created, record, cut):
        lease = f"haystream:responses:replica:{endpoint(owning).store.owner}"
        redis.config_set("notify-keyspace-events", "Ex")
        expired = redis.pubsub()
        try:
            expired.subscribe(f"__keyevent@{database}__:expired")
            assert expired.get_message(timeout=10)["type"] == "subscribe"
            with (
                heard("its end could not be stored") as waiting,
                heard("its end was not stored: another replica reported it failed") as refused,
                heard("its end is stored") as stored_claim,
            ):
                cut(True)
                record.release()
                assert waiting.wait_for(1)
                while (message := expired.get_message(timeout=10)) is None or message["data"] != lease.encode():
                    assert message is not None, "the owner's lease did not run out"
                assert b.responses.retrieve(created.id).status == "failed"  # taken over
                cut(False)  # the owner is let back in
                assert refused.wait_for(1, timeout=30)
                assert stored_claim.count == 0
        finally:
            expired.close()
            redis.config_set("notify-keyspace-events", "")
        stored = b.responses.retrieve(created.id)
        assert stored.status == "failed"
        assert stored.error is not None and "stopped without ending it" in stored.error.message
        logged = [orjson.loads(fields[b"e"]) for _, fields in redis.xrange(f"haystream:responses:{created.id}:events")]
        assert [event["type"] for event in logged].count("response.failed") == 1
        assert not {"response.completed", "response.cancelled"} & {event["type"] for event in logged}


def test_an_end_that_waits_for_redis_is_stored_once_redis_answers_again(upstream, redis_url, monkeypatch):
    """A background response's end that Redis did not take waited between attempts, doubling up to 30 s: after an
    outage, the record stayed `in_progress` (and resumes pinged) for up to 30 s more while Redis answered. Now the
    replica's lease renewal, which tries every second while Redis is out of reach, wakes it when Redis is back."""
    monkeypatch.setattr(responses_module, "END_RETRY_FIRST_SECONDS", 60.0)  # its next attempt: far off
    monkeypatch.setattr(RedisStore, "OWNER_LEASE_SECONDS", 1.5)  # renewals every 0.5 s: the outage is seen at once
    with an_owner_to_cut_off(upstream, redis_url) as (_, b, _redis, created, record, cut):
        with (
            heard("its end could not be stored") as waiting,
            heard("lease in the response store (Redis) is not renewed") as lost,
            heard("answers again: this replica's lease is renewed") as back,
        ):
            cut(True)
            record.release()
            assert waiting.wait_for(1) and lost.wait_for(1)
            cut(False)
            assert back.wait_for(1)  # its lease is renewed: no reader takes its response over
        resumed = list(b.responses.retrieve(created.id, stream=True))  # 10 s of SDK timeout, not 60
        assert resumed[-1].type == "response.completed"
        assert b.responses.retrieve(created.id).status == "completed"
