"""The OpenAI Responses API as real clients use it: the openai SDK (streams, the stream helper, stored and
background responses, resume after a dropped connection, cancel), raw httpx, and two servers sharing one Redis."""

from __future__ import annotations

import concurrent.futures
import socket

import httpx
import openai
import orjson
import pytest

from support import sse, start_server, unique

# A second server in this process shares hayhooks' registry, and fake_async's cached async clients belong to the
# first server's loop: later servers use the sync wrapper, whose clients have no loop.
SYNC = {"mode": "stream", "scenario": "fake?tokens=1"}


def text(n: int, prefix: str = "t") -> str:
    return "".join(f"{prefix}{i} " for i in range(n))


def test_stream_event_sequence_and_usage(client):
    stream = client.responses.create(
        model="fake_async", input="hello", stream=True, extra_body={"scenario": "fake?tokens=5"}
    )
    events = list(stream)
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == text(5)
    final = events[-1].response
    assert final.status == "completed"
    assert final.output_text == text(5)
    assert final.usage is not None and final.usage.output_tokens > 0
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens


def test_raw_frames_name_their_event(server):
    body = {"model": "fake_async", "input": "hi", "stream": True, "scenario": "fake?tokens=2"}
    response = httpx.post(server.url + "/v1/responses", json=body, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    pairs = sse(response.text)
    assert pairs and all(name == data["type"] for name, data in pairs)


@pytest.mark.parametrize(
    "extra",
    [
        {"scenario": "fake?tokens=2", "mode": "mixed"},  # reasoning, text
        {"scenario": 'fake?tool=get_w&args={"city":"x"}', "mode": "client_tools"},  # a function call
        {"scenario": "fake?tokens=2&finish=length"},  # incomplete
        {"scenario": "fake?tokens=4&fail_after=2"},  # failed
    ],
)
def test_every_event_and_response_validates_against_the_sdk_types(server, extra):
    # The SDK builds its objects without validating them: a field it requires but the server leaves out goes
    # unnoticed there, and breaks strict clients (typed decoders in other languages, pydantic validation).
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    tools = [{"type": "function", "name": "get_w", "parameters": {"type": "object", "properties": {}}}]
    body = {"model": "fake_async", "input": "hi", "stream": True, "tools": tools, **extra}
    events = [data for _, data in sse(httpx.post(server.url + "/v1/responses", json=body, timeout=30).text)]
    assert events[-1]["type"] in ("response.completed", "response.incomplete", "response.failed")
    adapter = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event)
    response = httpx.post(server.url + "/v1/responses", json={**body, "stream": False}, timeout=30)
    if response.status_code == 200:
        Response.model_validate(response.json())


def test_stream_helper_final_response(client):
    with client.responses.stream(
        model="fake_sync", input="hello", extra_body={"mode": "stream", "scenario": "fake?tokens=4"}
    ) as stream:
        seen = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert seen == text(4)
    assert final.output_text == text(4)
    assert final.status == "completed"


def test_non_stream_returns_the_response_object(client):
    response = client.responses.create(
        model="fake_async", input="hello", instructions="be brief", extra_body={"scenario": "fake?tokens=3"}
    )
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == text(3)
    assert response.output[0].type == "message"
    assert response.instructions == "be brief"


def test_reasoning_becomes_a_reasoning_item(client):
    response = client.responses.create(model="fake_async", input="hello", extra_body={"mode": "mixed"})
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"]
    assert response.output[0].content[0].text == "thinking..."
    assert response.output_text == "plain chunk dict"  # Open WebUI events have no Responses counterpart


def test_client_tool_call_is_a_function_call_item(client):
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]
    stream = client.responses.create(
        model="fake_async",
        input="look it up",
        tools=tools,
        stream=True,
        extra_body={"mode": "client_tools", "scenario": 'fake?tool=lookup&args={"q":"x"}'},
    )
    events = list(stream)
    types = [event.type for event in events]
    assert "response.function_call_arguments.delta" in types
    done = next(event for event in events if event.type == "response.function_call_arguments.done")
    assert done.arguments == '{"q":"x"}'
    final = events[-1].response
    call = next(item for item in final.output if item.type == "function_call")
    assert (call.name, call.arguments, call.call_id) == ("lookup", '{"q":"x"}', "call_fake_1")


def test_agent_tool_calls_stay_internal(client):
    response = client.responses.create(
        model="fake_async", input="multiply", extra_body={"mode": "agent", "scenario": "fake?tool=multiply&args={}"}
    )
    assert all(item.type != "function_call" for item in response.output)


def test_previous_response_id_prepends_the_conversation(client, upstream):
    first = client.responses.create(model="fake_async", input="first question", extra_body={"scenario": "fake"})
    scenario = unique("fake?tokens=1")
    client.responses.create(
        model="fake_async",
        input="second question",
        previous_response_id=first.id,
        extra_body={"scenario": scenario},
    )
    sent = upstream.wait_for_requests(1, model=scenario)[0].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[0]["content"] == "first question"
    assert sent[1]["content"] == first.output_text
    assert sent[2]["content"] == "second question"


def test_retrieve_and_delete(client):
    created = client.responses.create(model="fake_async", input="hello", extra_body={"scenario": "fake?tokens=2"})
    assert client.responses.retrieve(created.id).output_text == text(2)
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_store_false_is_not_kept(client):
    created = client.responses.create(
        model="fake_async", input="hello", store=False, extra_body={"scenario": "fake?tokens=2"}
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_unknown_model_is_a_404_envelope(server):
    response = httpx.post(server.url + "/v1/responses", json={"model": "nope", "input": "x", "stream": True})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_bad_id_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_doesnotexist", stream=True)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="fake_async", input="x", previous_response_id="resp_doesnotexist")


@pytest.mark.parametrize("stream", [True, False])
def test_failure_after_an_invisible_first_item_keeps_its_status(client, stream):
    """A generator's role chunk (and an Open WebUI event) shows a Responses client nothing: a failure after it is
    still an HTTP error with its own status, as in chat; it was a 200 stream ending in `response.failed`, or a 500."""
    with pytest.raises(openai.RateLimitError) as caught:
        response = client.responses.create(
            model="fake_async", input="x", stream=stream, extra_body={"mode": "role_then_rate_limit"}
        )
        if stream:
            list(response)
    assert caught.value.status_code == 429
    assert "the upstream is rate limiting" in caught.value.message


def test_failure_before_the_first_byte_is_an_http_error(client):
    with pytest.raises(openai.InternalServerError) as caught:
        client.responses.create(model="fake_async", input="x", stream=True, extra_body={"mode": "fail_early"})
    assert "refused" in caught.value.message


def test_mid_stream_failure_is_response_failed(client):
    stream = client.responses.create(
        model="fake_async", input="x", stream=True, extra_body={"scenario": "fake?tokens=6&fail_after=2"}
    )
    seen = []
    with pytest.raises(openai.APIError) as caught:
        for event in stream:
            seen.append(event.type)
    assert "response.output_text.delta" in seen
    assert "upstream" in str(caught.value) or "pipeline" in str(caught.value)


def test_mid_stream_failure_event_on_the_wire(server):
    body = {"model": "fake_async", "input": "hi", "stream": True, "scenario": "fake?tokens=6&fail_after=2"}
    pairs = sse(httpx.post(server.url + "/v1/responses", json=body, timeout=30).text)
    name, data = pairs[-1]
    assert name == "response.failed"
    assert data["response"]["status"] == "failed"
    assert data["response"]["error"]["message"]


def test_background_resume_after_dropped_connection(client, server):
    full = text(12)
    stream = client.responses.create(
        model="fake_async",
        input="hello",
        stream=True,
        background=True,
        extra_body={"scenario": "fake?tokens=12&delay=0.05"},
    )
    response_id = None
    before = []
    last = -1
    for event in stream:
        last = event.sequence_number
        if event.type == "response.created":
            response_id = event.response.id
            assert event.response.background
        if event.type == "response.output_text.delta":
            before.append(event.delta)
            if len(before) == 3:
                break
    stream.close()  # the connection drops mid-answer
    assert response_id is not None
    resumed = client.responses.retrieve(response_id, stream=True, starting_after=last)
    after = []
    numbers = []
    for event in resumed:
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            after.append(event.delta)
    assert numbers[0] == last + 1
    assert "".join(before) + "".join(after) == full
    assert client.responses.retrieve(response_id).output_text == full


def test_resuming_after_an_event_not_yet_sent_gets_only_later_events(client, server, upstream):
    # Held after its first token: the run's log cannot reach event 8 before the release. A resume after it got every
    # event from the log's current end on (sequence numbers 2, 3, ...) instead of only those after 8.
    scenario = unique("fake?tokens=5&hold_after=1")
    created = client.responses.create(
        model="fake_async", input="hello", background=True, extra_body={"scenario": scenario}
    )
    record = upstream.wait_for_requests(1, model=scenario)[0]
    url = f"{server.url}/v1/responses/{created.id}?stream=true&starting_after=8"
    with httpx.stream("GET", url, timeout=30) as response:
        assert response.status_code == 200
        record.release()  # the replay is following the log
        pairs = sse(response.read().decode())
    numbers = [data["sequence_number"] for _, data in pairs]
    assert numbers and min(numbers) == 9, numbers
    assert pairs[-1][0] == "response.completed"


def held_scenario() -> str:
    """A long stream held after its first token, named uniquely: the shared fake may still see an earlier test's."""
    return unique("fake?tokens=2000&hold_after=1")


def test_background_returns_at_once_and_cancel_cuts_upstream(client, upstream):
    # Held: the upstream sends one token and then waits for its client to leave, so the cut is what ends it.
    scenario = held_scenario()
    created = client.responses.create(
        model="fake_async", input="hello", background=True, extra_body={"scenario": scenario}
    )
    assert created.status in ("queued", "in_progress")
    record = upstream.wait_for_requests(1, model=scenario)[0]
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    record.wait()
    assert record.client_hung_up and not record.completed
    assert client.responses.retrieve(created.id).status == "cancelled"


def test_streamed_request_whose_client_leaves_is_cancelled(server, upstream):
    scenario = held_scenario()
    body = {"model": "fake_async", "input": "hi", "stream": True, "scenario": scenario}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if "output_text.delta" in line:
                break
    record = upstream.wait_for_requests(1, model=scenario)[0].wait()
    assert record.client_hung_up and not record.completed


def test_another_keys_response_is_not_found(upstream):
    srv = start_server(upstream, api_keys="key-aaaaaaaa,key-bbbbbbbb")
    try:
        with (
            openai.OpenAI(base_url=srv.url + "/v1", api_key="key-aaaaaaaa", max_retries=0) as a,
            openai.OpenAI(base_url=srv.url + "/v1", api_key="key-bbbbbbbb", max_retries=0) as b,
        ):
            mine = a.responses.create(model="fake_sync", input="secret", extra_body=SYNC)
            assert a.responses.retrieve(mine.id).id == mine.id
            assert a.responses.input_items.list(mine.id).data[0].content[0].text == "secret"
            with pytest.raises(openai.NotFoundError):
                b.responses.retrieve(mine.id)
            with pytest.raises(openai.NotFoundError) as refused:
                b.responses.input_items.list(mine.id)
            assert refused.value.body["message"] == f"Response with id '{mine.id}' not found."
            with pytest.raises(openai.NotFoundError):
                b.responses.delete(mine.id)
            with pytest.raises(openai.NotFoundError):
                b.responses.create(model="fake_sync", input="x", previous_response_id=mine.id, extra_body=SYNC)
            anonymous = httpx.get(f"{srv.url}/v1/responses/{mine.id}/input_items", timeout=30)
            assert anonymous.status_code == 401
    finally:
        srv.stop()


def test_expired_response_is_not_found(upstream):
    srv = start_server(upstream, responses_ttl_seconds=0.001)
    try:
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0) as sdk:
            created = sdk.responses.create(model="fake_sync", input="x", extra_body=SYNC)
            with pytest.raises(openai.NotFoundError):
                sdk.responses.retrieve(created.id, stream=True, starting_after=0)
    finally:
        srv.stop()


@pytest.mark.parametrize("path", ["/responses", "/openwebui/v1/responses"])
def test_other_base_paths(server, path):
    body = {"model": "fake_async", "input": "hi", "scenario": "fake?tokens=2"}
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == 200
    assert response.json()["output"][0]["content"][0]["text"] == text(2)


# Redis: two servers share one real redis-server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(upstream, redis_url):
    first = start_server(upstream, redis_url=redis_url)
    second = start_server(upstream, redis_url=redis_url)
    yield first, second
    first.stop()
    second.stop()


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_redis_background_started_on_one_replica_resumes_on_the_other(replicas):
    one, two = replicas
    full = text(10)
    with sdk(one) as a, sdk(two) as b:
        stream = a.responses.create(
            model="fake_sync",
            input="hello",
            stream=True,
            background=True,
            extra_body={"mode": "stream", "scenario": "fake?tokens=10&delay=0.05"},
        )
        response_id, before, last = None, [], -1
        for event in stream:
            last = event.sequence_number
            if event.type == "response.created":
                response_id = event.response.id
            if event.type == "response.output_text.delta":
                before.append(event.delta)
                if len(before) == 2:
                    break
        stream.close()
        assert response_id is not None
        after = [
            event.delta
            for event in b.responses.retrieve(response_id, stream=True, starting_after=last)
            if event.type == "response.output_text.delta"
        ]
        assert "".join(before) + "".join(after) == full
        assert b.responses.retrieve(response_id).output_text == full
        follow_up = b.responses.create(
            model="fake_sync", input="more", previous_response_id=response_id, extra_body=SYNC
        )
        assert follow_up.status == "completed"


def test_redis_background_response_with_event_lines_resumes_on_the_other_replica_without_them(replicas):
    # Open WebUI's event lines reach the client that made the response, not the shared log: a resume may come from
    # any client, and a line has no sequence number of its own to be a Redis stream id.
    one, two = replicas
    # A scenario of its own: the sync wrapper's cached generator must not be one another server's loop has used.
    scenario = unique("fake?tokens=2")
    body = {
        "model": "fake_sync",
        "input": "hi",
        "stream": True,
        "background": True,
        "mode": "events",
        "scenario": scenario,
    }
    created = sse(httpx.post(one.url + "/openwebui/v1/responses", json=body, timeout=30).text)
    assert [data["event"]["type"] for name, data in created if not name] == ["status", "source", "status"]
    assert created[-1][0] == "response.completed"
    response_id = created[0][1]["response"]["id"]
    resumed = sse(httpx.get(f"{two.url}/v1/responses/{response_id}", params={"stream": "true"}, timeout=30).text)
    assert resumed == [(name, data) for name, data in created if name]


def start_held_background(sdk_client: openai.OpenAI, upstream):
    """A background response on a sync wrapper whose upstream holds after its first token; returns it and the fake's
    record of its upstream request (which it has reached)."""
    scenario = held_scenario()
    created = sdk_client.responses.create(
        model="fake_sync", input="hello", background=True, extra_body={"mode": "stream", "scenario": scenario}
    )
    return created, upstream.wait_for_requests(1, model=scenario)[0]


def test_redis_cancel_through_the_other_replica(replicas, upstream):
    one, two = replicas
    with sdk(one) as a, sdk(two) as b:
        created, record = start_held_background(a, upstream)
        assert b.responses.cancel(created.id).status == "cancelled"
        record.wait()
        assert record.client_hung_up and not record.completed
        with pytest.raises(openai.NotFoundError):
            b.responses.retrieve("resp_unknown")


def test_redis_running_background_response_is_in_progress_on_the_other_replica(replicas, upstream):
    one, two = replicas
    with sdk(one) as a, sdk(two) as b:
        created, record = start_held_background(a, upstream)
        assert b.responses.retrieve(created.id).status == "in_progress"
        record.release()
        assert [event.type for event in b.responses.retrieve(created.id, stream=True)][-1] == "response.completed"


def test_resume_streams_count_against_the_stream_caps(upstream):
    # A resume (GET ?stream=true) follows a background run for as long as it runs, and with Redis holds one of its
    # connections in a blocking read: 60 resumes of one key held 60 Redis connections, whatever the caps.
    srv = start_server(upstream, api_keys="key-aaaaaaaa", max_streams_per_key=2)
    try:
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="key-aaaaaaaa", max_retries=0) as sdk_client:
            created, record = start_held_background(sdk_client, upstream)  # the run holds one place of the key's 2
            url = f"{srv.url}/v1/responses/{created.id}?stream=true"
            headers = {"Authorization": "Bearer key-aaaaaaaa"}
            with httpx.Client(timeout=30) as http, http.stream("GET", url, headers=headers) as first:
                assert first.status_code == 200  # the second place
                over = http.get(url, headers=headers)
                assert over.status_code == 429 and over.headers["retry-after"] == "1", over.text
                assert over.json()["error"]["code"] == "too_many_requests"
                assert http.get(f"{srv.url}/v1/responses/{created.id}", headers=headers).status_code == 200
            record.release()
    finally:
        srv.stop()


def test_redis_responses_stay_their_keys_when_the_key_list_changes(upstream, redis_url):
    # The owner of a stored response was the key's place in HAYSTREAM_API_KEYS ("key-0"): with Redis kept across a
    # rotation that retires the first key (or shared by replicas whose lists differ), the key that then held that
    # place read, chained, listed and deleted the first key's responses.
    fresh = {"mode": "stream", "scenario": unique("fake?tokens=1")}  # a generator made on these servers' loops
    before = start_server(upstream, redis_url=redis_url, api_keys="key-retired-aaaa,key-kept-bbbb")
    try:
        with (
            openai.OpenAI(base_url=before.url + "/v1", api_key="key-retired-aaaa", max_retries=0) as retired,
            openai.OpenAI(base_url=before.url + "/v1", api_key="key-kept-bbbb", max_retries=0) as kept,
        ):
            secret = retired.responses.create(model="fake_sync", input="secret", extra_body=fresh)
            mine = kept.responses.create(model="fake_sync", input="mine", extra_body=fresh)
    finally:
        before.stop()
    after = start_server(upstream, redis_url=redis_url, api_keys="key-new-cccc,key-kept-bbbb")
    try:
        with (
            openai.OpenAI(base_url=after.url + "/v1", api_key="key-new-cccc", max_retries=0) as new,
            openai.OpenAI(base_url=after.url + "/v1", api_key="key-kept-bbbb", max_retries=0) as kept,
        ):
            with pytest.raises(openai.NotFoundError):
                new.responses.retrieve(secret.id)
            with pytest.raises(openai.NotFoundError):
                new.responses.input_items.list(secret.id)
            with pytest.raises(openai.NotFoundError):
                new.responses.create(model="fake_sync", input="x", previous_response_id=secret.id, extra_body=fresh)
            with pytest.raises(openai.NotFoundError):
                new.responses.delete(secret.id)
            # A key on both lists, at another place in each, still finds its own responses.
            assert kept.responses.retrieve(mine.id).id == mine.id
    finally:
        after.stop()


def test_redis_resume_outlives_the_clients_socket_timeout(upstream, redis_url):
    # redis-py >= 6 ends any read after socket_timeout (5 s by default), a blocking XREAD included: a resume that
    # waited longer than that for the next event died with redis' TimeoutError. Here the timeout is 1 s and the
    # keep-alive 2 s: the reader must see a ping (it waited past the socket timeout) and then the end.
    one = start_server(upstream, redis_url=redis_url + "?socket_timeout=1", keepalive_seconds=2)
    two = start_server(upstream, redis_url=redis_url + "?socket_timeout=1", keepalive_seconds=2)
    try:
        scenario = held_scenario()
        with sdk(one) as a:
            created = a.responses.create(
                model="fake_sync", input="hello", background=True, extra_body={"mode": "stream", "scenario": scenario}
            )
        record = upstream.wait_for_requests(1, model=scenario)[0]
        url = f"{two.url}/v1/responses/{created.id}?stream=true&starting_after=-1"
        pinged = False
        with httpx.stream("GET", url, timeout=30) as response:
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if line == ": ping" and not pinged:
                    pinged = True
                    record.release()
        assert pinged
        assert lines[-2] == "data: " + lines[-2][len("data: ") :] and '"response.completed"' in lines[-2]
    finally:
        one.stop()
        two.stop()


# The OpenAI Agents SDK ---------------------------------------------------------------------------------------------


async def test_openai_agents_sdk_runs_a_turn(server):
    agents = pytest.importorskip("agents", reason="openai-agents is not installed")
    agents.set_tracing_disabled(True)
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        model = agents.OpenAIResponsesModel(model="fake_async", openai_client=client)
        agent = agents.Agent(
            name="helper",
            instructions="Answer briefly.",
            model=model,
            model_settings=agents.ModelSettings(extra_body={"scenario": "fake?tokens=4"}),
        )
        result = await agents.Runner.run(agent, "hello")
        assert result.final_output == text(4)
        streamed = agents.Runner.run_streamed(agent, "hello again")
        deltas = [
            event.data.delta
            async for event in streamed.stream_events()
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"
        ]
        assert "".join(deltas) == text(4) == streamed.final_output


def test_length_cut_is_an_incomplete_response(client):
    response = client.responses.create(
        model="fake_async", input="hello", extra_body={"scenario": "fake?tokens=3&finish=length"}
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == text(3)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fake_async", "input": "x", "background": True, "store": False}, "store"),
        ({"model": "fake_async", "input": [{"type": "web_search_call"}]}, "input"),
        ({"model": "fake_async", "input": "x", "stream": "yes"}, "stream"),
        # Malformed items: a 400 naming the field, not a 500 from the conversion or the pipeline.
        ({"model": "fake_async", "input": [{"role": "user", "content": None}]}, "input.0.content"),
        ({"model": "fake_async", "input": [{"role": "user", "content": ["hi"]}]}, "input.0.content"),
        ({"model": "fake_async", "input": [{"role": 3, "content": "x"}]}, "input.0.role"),
        (
            {"model": "fake_async", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": 5}]}]},
            "input.0.content.0.image_url",
        ),
        (
            {"model": "fake_async", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input.0.call_id",
        ),
        ({"model": "fake_async", "input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
        (
            {"model": "fake_async", "input": [{"type": "function_call_output", "call_id": "c", "output": ["a"]}]},
            "input.0.output",
        ),
        # An image without a URL, or a function tool without a name, failed the wrapper's conversion (a 500).
        (
            {"model": "fake_async", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input.0.content.0.image_url",
        ),
        ({"model": "fake_async", "input": "x", "tools": [{"type": "function"}]}, "tools"),
        ({"model": "fake_async", "input": "x", "tools": ["search"]}, "tools"),
        # Named as sent, not as a member of the field's union ("input.str").
        ({"model": "fake_async", "input": [5]}, "input"),
        ({"model": "fake_async", "input": "x", "tool_choice": 5}, "tool_choice"),
        # Wrappers get the body as sent: the JSON type must already be right.
        ({"model": "fake_async", "input": "x", "temperature": "0.5"}, "temperature"),
        ({"model": "fake_async", "input": "x", "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        # A `tool` message has no call id (results are function_call_output items): the generator failed, a 500.
        ({"model": "fake_async", "input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
        (
            {"model": "fake_async", "input": [{"role": "user", "content": "x"}, {"role": "function", "content": "y"}]},
            "input.1.role",
        ),
        # Nothing to answer: wrappers were handed no messages at all (rag_chat failed with a 500).
        ({"model": "fake_async"}, "input"),
        ({"model": "fake_async", "input": ""}, "input"),
        ({"model": "fake_async", "input": [], "instructions": "be brief"}, "input"),
        ({"model": "fake_async", "input": [{"type": "reasoning", "summary": []}]}, "input"),
        # OpenAI's metadata limits: 16 pairs, keys up to 64 characters, values up to 512.
        ({"model": "fake_async", "input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"model": "fake_async", "input": "x", "metadata": {"k" * 65: "v"}}, "metadata"),
        ({"model": "fake_async", "input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
    ],
)
def test_bad_requests_are_400_envelopes(server, body, param):
    response = httpx.post(server.url + "/v1/responses", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert "Value error" not in error["message"]  # pydantic's wording stays out


def test_metadata_at_openais_limits_is_echoed(client):
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    response = client.responses.create(model="fake_async", input="x", metadata=metadata)
    assert response.metadata == metadata
    assert client.responses.retrieve(response.id).metadata == metadata


def test_function_call_output_round_trips_as_a_tool_message(client, upstream):
    scenario = unique("fake?tokens=1")
    client.responses.create(
        model="fake_async",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "look it up"}]},
            {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "found"},
        ],
        extra_body={"scenario": scenario},
    )
    sent = upstream.wait_for_requests(1, model=scenario)[0].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["id"] == "call_1"
    assert sent[2]["tool_call_id"] == "call_1"


def test_foreground_response_is_stored_while_in_progress(client, upstream):
    scenario = held_scenario()
    with client.responses.create(model="fake_async", input="hi", stream=True, extra_body={"scenario": scenario}) as s:
        events = iter(s)
        id = next(events).response.id
        next(event for event in events if event.type == "response.output_text.delta")
        assert client.responses.retrieve(id).status == "in_progress"
        client.responses.delete(id)
        assert [event.type for event in events][-1] == "response.cancelled"
    record = upstream.wait_for_requests(1, model=scenario)[0].wait()
    assert record.client_hung_up and not record.completed
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(id)


def test_deleting_a_running_background_response_stays_deleted(client, upstream):
    scenario = held_scenario()
    created = client.responses.create(
        model="fake_async", input="hello", background=True, extra_body={"scenario": scenario}
    )
    record = upstream.wait_for_requests(1, model=scenario)[0]
    client.responses.delete(created.id)
    record.wait()
    assert record.client_hung_up and not record.completed
    # The run's cancellation ended after the delete: it must not have stored the response again.
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_a_chat_wrapper_gets_tool_choice_and_format_in_the_chat_shape(client):
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    response = client.responses.create(
        model="fake_async",
        input="x",
        tools=[{"type": "function", "name": "lookup", "parameters": schema}],
        tool_choice={"type": "function", "name": "lookup"},
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
        reasoning={"effort": "low"},
        max_output_tokens=50,
        extra_body={"mode": "echo_body"},
    )
    seen = orjson.loads(response.output_text)
    assert seen["tools"][0]["function"]["name"] == "lookup"
    assert seen["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert seen["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    assert seen["max_tokens"] == 50
    # The response echoes what was asked, as OpenAI's does.
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"
    assert response.reasoning is not None and response.reasoning.effort == "low"


def test_a_chat_wrapper_gets_max_tokens_only_from_the_checked_max_output_tokens(server, client):
    # Not a Responses field: a client's own `max_tokens` reached the wrapper past HAYSTREAM_MAX_TOKENS, or as a string
    # (local_chat hands it to llama.cpp).
    body = {"model": "fake_async", "input": "x", "mode": "echo_body", "max_completion_tokens": 10**9}
    for extra, expected in (({"max_tokens": 10**9}, None), ({"max_tokens": "abc", "max_output_tokens": 5}, 5)):
        response = httpx.post(server.url + "/v1/responses", json={**body, **extra}, timeout=30)
        assert response.status_code == 200, response.text
        assert orjson.loads(response.json()["output"][0]["content"][0]["text"])["max_tokens"] == expected


def test_a_second_cancel_while_the_first_unwinds_leaves_the_response_cancelled(server, client, upstream):
    # The wrapper's clean-up streams a held scenario: the run is still unwinding the first cancel when the second
    # arrives. A second cancellation used to interrupt that unwinding, so neither the cancelled response nor its
    # terminal event was stored: both cancels and every later GET said in_progress.
    unwind = unique("fake?tokens=1&hold_after=0")
    created = client.responses.create(
        model="fake_async", input="hello", background=True, extra_body={"mode": "slow_unwind", "scenario": unwind}
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.responses.cancel, created.id)
        record = upstream.wait_for_requests(1, model=unwind)[0]  # the first cancel is unwinding the run
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as second:
            second.sendall(
                f"POST /v1/responses/{created.id}/cancel HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            # The server reads the second cancel no later than this request, which it has answered once it returns.
            assert client.responses.retrieve(created.id).status == "in_progress"
            record.release()
            assert first.result().status == "cancelled"
            answer = b"".join(iter(lambda: second.recv(65536), b""))
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["status"] == "cancelled"
    assert client.responses.retrieve(created.id).status == "cancelled"
    events = [event.type for event in client.responses.retrieve(created.id, stream=True)]
    assert events[-1] == "response.cancelled"


def test_the_memory_store_is_bounded_by_size_too(upstream):
    # A count alone let 1,000 stored conversations of up to a request body each (4 MiB), or background event logs
    # (~0.4 KB per token), fill the memory. The size bound (JSON bytes) drops the oldest; the newest always stays.
    server = start_server(upstream, responses_max_stored_bytes=64 * 1024)
    try:
        with sdk(server) as client:
            big = "x" * 40_000
            first = client.responses.create(model="fake_sync", input=big, extra_body=SYNC)
            assert client.responses.retrieve(first.id).status == "completed"
            second = client.responses.create(model="fake_sync", input=big, extra_body=SYNC)  # 80 KB together
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(first.id)
            assert client.responses.retrieve(second.id).status == "completed"
            # A background response's events count: 500 tokens of events are over the bound on their own.
            long = client.responses.create(
                model="fake_sync", input="hi", background=True, extra_body={**SYNC, "scenario": "fake?tokens=500"}
            )
            events = [event.type for event in client.responses.retrieve(long.id, stream=True)]
            assert events[-1] == "response.completed"  # the newest stays, however large
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(second.id)
            small = client.responses.create(model="fake_sync", input="hi", extra_body=SYNC)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(long.id)
            assert client.responses.retrieve(small.id).status == "completed"
    finally:
        server.stop()


def test_a_running_background_response_is_not_dropped_to_make_room(upstream):
    # The memory store keeps `responses_max_stored` records, dropping the oldest: a background response still
    # running was dropped too, and its GET and cancel answered 404 while the run went on.
    server = start_server(upstream, responses_max_stored=2)
    try:
        with sdk(server) as client:
            scenario = held_scenario()
            running = client.responses.create(
                model="fake_async", input="hi", background=True, extra_body={"scenario": scenario}
            )
            record = upstream.wait_for_requests(1, model=scenario)[0]
            finished = [client.responses.create(model="fake_sync", input="hi", extra_body=SYNC) for _ in range(3)]
            assert client.responses.retrieve(running.id).status == "in_progress"
            with pytest.raises(openai.NotFoundError):  # the bound still holds, on the finished ones
                client.responses.retrieve(finished[0].id)
            assert client.responses.retrieve(finished[-1].id).status == "completed"
            assert client.responses.cancel(running.id).status == "cancelled"
            assert record.wait().client_hung_up
    finally:
        server.stop()


def test_a_head_request_for_a_running_responses_events_answers_at_once(client, server, upstream):
    # No body goes out for a HEAD: following the run's events held the connection until the run ended.
    scenario = held_scenario()
    running = client.responses.create(
        model="fake_async", input="hi", background=True, extra_body={"scenario": scenario}
    )
    record = upstream.wait_for_requests(1, model=scenario)[0]
    try:
        # One connection: its next request is answered only once the HEAD's response has ended on the server.
        with httpx.Client(base_url=server.url, timeout=10, limits=httpx.Limits(max_connections=1)) as one:
            response = one.head(f"/v1/responses/{running.id}", params={"stream": "true"})
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert one.get(f"/v1/responses/{running.id}").json()["status"] == "in_progress"  # the run goes on
    finally:
        client.responses.cancel(running.id)
    assert record.wait().client_hung_up
