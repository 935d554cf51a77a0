"""`GET /v1/responses/{id}/input_items` as the openai SDK uses it (`client.responses.input_items.list`, its
auto-pagination), raw httpx for what the SDK does not send, and a real redis-server for the shared store."""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest
from openai.types.responses import ResponseItem
from pydantic import TypeAdapter

from support import RedisServer, start_server, unique

FAKE = {"scenario": "fake?tokens=1"}
SYNC = {"mode": "stream", "scenario": "fake?tokens=1"}  # later servers use the sync wrapper (see test_responses.py)
ITEM = TypeAdapter(ResponseItem)
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/x8AAwMCAO+ip1sAAAAASUVORK5CYII="  # a 1x1 PNG


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def conversation(n: int) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(n)]


def test_a_string_input_is_one_user_message_with_an_input_text_part(client, server):
    created = client.responses.create(model="fake_async", input="hello there", extra_body=FAKE)
    page = client.responses.input_items.list(created.id)
    assert len(page.data) == 1 and page.has_more is False
    item = page.data[0]
    assert item.type == "message" and item.role == "user" and item.status == "completed"
    assert item.id.startswith("msg_")
    assert [(part.type, part.text) for part in item.content] == [("input_text", "hello there")]
    raw = httpx.get(f"{server.url}/v1/responses/{created.id}/input_items", timeout=30).json()
    assert raw["object"] == "list"
    assert raw["first_id"] == raw["last_id"] == item.id
    ITEM.validate_python(raw["data"][0])  # strict: every field the SDK requires is there


def test_items_keep_their_kind_and_list_newest_first_by_default(client, server):
    sent = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "input_text", "text": "look it up"}]},
        {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "found"},
        {"role": "assistant", "content": "it says found"},
        {"id": "msg_mine", "type": "message", "role": "user", "content": "thanks"},
    ]
    created = client.responses.create(model="fake_async", input=sent, extra_body=FAKE)
    newest_first = client.responses.input_items.list(created.id).data
    assert [item.type for item in newest_first] == [
        "message",
        "message",
        "function_call_output",
        "function_call",
        "message",
        "message",
    ]
    assert newest_first[0].id == "msg_mine"  # a client's own item id is kept
    assert newest_first[1].role == "assistant" and newest_first[1].content[0].type == "output_text"
    assert newest_first[2].output == "found" and newest_first[2].call_id == "call_1"
    assert newest_first[3].name == "lookup" and newest_first[3].call_id == "call_1"
    assert newest_first[-1].role == "developer" and newest_first[-1].content[0].text == "be brief"
    assert len({item.id for item in newest_first}) == 6
    oldest_first = client.responses.input_items.list(created.id, order="asc").data
    assert [item.id for item in oldest_first] == [item.id for item in reversed(newest_first)]
    raw = httpx.get(f"{server.url}/v1/responses/{created.id}/input_items", timeout=30).json()
    for item in raw["data"]:
        ITEM.validate_python(item)
        assert item["status"] == "completed"


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_auto_pagination_walks_every_item_once(client, order):
    created = client.responses.create(model="fake_async", input=conversation(25), extra_body=FAKE)
    first = client.responses.input_items.list(created.id, limit=10, order=order)
    assert len(first.data) == 10 and first.has_more is True
    pages = list(first.iter_pages())
    assert [len(page.data) for page in pages] == [10, 10, 5]
    assert pages[-1].has_more is False
    texts = [item.content[0].text for item in first]  # the SDK follows `after` by itself
    expected = [f"turn {i}" for i in range(25)]
    assert texts == (expected if order == "asc" else expected[::-1])


def test_a_repeated_item_id_does_not_trap_auto_pagination(client):
    # The SDK asks for the page after the last item's id: were two items listed under one id, it would be sent back
    # to the first one and page forever.
    repeated = [{"id": "msg_same", "type": "message", "role": "user", "content": f"turn {i}"} for i in range(3)]
    created = client.responses.create(model="fake_async", input=repeated, extra_body=FAKE)
    listed = []
    for item in client.responses.input_items.list(created.id, limit=1, order="asc"):
        listed.append(item)
        assert len(listed) <= 3
    assert [item.content[0].text for item in listed] == ["turn 0", "turn 1", "turn 2"]
    assert listed[0].id == "msg_same" and len({item.id for item in listed}) == 3


def test_before_pages_backwards(client, server):
    created = client.responses.create(model="fake_async", input=conversation(6), extra_body=FAKE)
    ids = [item.id for item in client.responses.input_items.list(created.id, order="asc")]
    url = f"{server.url}/v1/responses/{created.id}/input_items"
    page = httpx.get(url, params={"order": "asc", "before": ids[4], "limit": 2}, timeout=30).json()
    assert [item["id"] for item in page["data"]] == ids[2:4]
    assert page["has_more"] is True
    between = httpx.get(url, params={"order": "asc", "after": ids[0], "before": ids[3]}, timeout=30).json()
    assert [item["id"] for item in between["data"]] == ids[1:3]


def test_a_chained_response_lists_only_its_own_input(client):
    first = client.responses.create(model="fake_async", input="first question", extra_body=FAKE)
    second = client.responses.create(
        model="fake_async", input="second question", previous_response_id=first.id, extra_body=FAKE
    )
    texts = [item.content[0].text for item in client.responses.input_items.list(second.id)]
    assert texts == ["second question"]


def test_instructions_are_not_an_input_item(client):
    created = client.responses.create(model="fake_async", input="hi", instructions="be brief", extra_body=FAKE)
    assert [item.role for item in client.responses.input_items.list(created.id)] == ["user"]


def test_image_urls_only_when_included(client):
    url = "data:image/png;base64," + PIXEL
    image = {
        "role": "user",
        "content": [{"type": "input_text", "text": "what is it"}, {"type": "input_image", "image_url": url}],
    }
    created = client.responses.create(model="fake_async", input=[image], extra_body=FAKE)
    plain = client.responses.input_items.list(created.id).data[0].content[1]
    assert plain.type == "input_image" and plain.image_url is None and plain.detail == "auto"
    included = client.responses.input_items.list(created.id, include=["message.input_image.image_url"])
    assert included.data[0].content[1].image_url == url


@pytest.mark.parametrize(
    "params, param",
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"limit": "²"}, "limit"),
        ({"limit": "9" * 5000}, "limit"),  # past the digits `int()` converts at all
        ({"order": "up"}, "order"),
        ({"after": "msg_unknown"}, "after"),
        ({"before": "msg_unknown"}, "before"),
    ],
)
def test_bad_parameters_are_400s_naming_the_parameter(client, server, params, param):
    created = client.responses.create(model="fake_async", input="hi", extra_body=FAKE)
    response = httpx.get(f"{server.url}/v1/responses/{created.id}/input_items", params=params, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_the_sdk_raises_bad_request_for_a_bad_limit(client):
    created = client.responses.create(model="fake_async", input="hi", extra_body=FAKE)
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(created.id, limit=500)


def test_unknown_deleted_and_unstored_responses_are_404(client, server):
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_doesnotexist")
    created = client.responses.create(model="fake_async", input="hi", extra_body=FAKE)
    assert len(client.responses.input_items.list(created.id).data) == 1
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(created.id)
    unstored = client.responses.create(model="fake_async", input="hi", store=False, extra_body=FAKE)
    response = httpx.get(f"{server.url}/v1/responses/{unstored.id}/input_items", timeout=30)
    assert response.status_code == 404
    assert response.json()["error"]["message"] == f"Response with id '{unstored.id}' not found."


def test_a_running_background_response_lists_its_input_and_its_items_keep_their_ids(client, upstream):
    scenario = unique("fake?tokens=2000&hold_after=1")  # held after its first token until cancelled
    created = client.responses.create(
        model="fake_async", input=conversation(2), background=True, extra_body={"scenario": scenario}
    )
    record = upstream.wait_for_requests(1, model=scenario)[0]
    running = [item.id for item in client.responses.input_items.list(created.id)]
    assert len(running) == 2
    assert client.responses.cancel(created.id).status == "cancelled"
    record.wait()
    # The saves at the run's start and end store the same items: the ids a client paged by still hold.
    assert [item.id for item in client.responses.input_items.list(created.id)] == running


def test_stored_input_counts_toward_the_memory_bound(upstream):
    # Two records of a 30 KB input: ~60 KB as conversations alone, ~120 KB with their input items, over 100 KB.
    server = start_server(upstream, responses_max_stored_bytes=100 * 1024)
    try:
        with sdk(server) as client:
            first = client.responses.create(model="fake_sync", input="x" * 30_000, extra_body=SYNC)
            assert client.responses.input_items.list(first.id).data[0].content[0].text == "x" * 30_000
            second = client.responses.create(model="fake_sync", input="y" * 30_000, extra_body=SYNC)
            with pytest.raises(openai.NotFoundError):
                client.responses.input_items.list(first.id)
            assert client.responses.input_items.list(second.id).data[0].content[0].text == "y" * 30_000
    finally:
        server.stop()


# Redis -----------------------------------------------------------------------------------------------------------


def test_redis_input_items_are_shared_and_older_records_list_empty(upstream):
    import redis as redis_py

    redis = RedisServer().start()
    one = start_server(upstream, redis_url=redis.url)
    two = start_server(upstream, redis_url=redis.url)
    try:
        with sdk(one) as first, sdk(two) as second:
            created = first.responses.create(model="fake_sync", input=conversation(3), extra_body=SYNC)
            listed = [item.content[0].text for item in second.responses.input_items.list(created.id, order="asc")]
            assert listed == ["turn 0", "turn 1", "turn 2"]
            # A record stored by a version without input items: listed as empty, not a failure.
            direct = redis_py.Redis.from_url(redis.url)
            key = f"haystream:responses:{created.id}"
            record = orjson.loads(direct.get(key))
            del record["input_items"]
            direct.set(key, orjson.dumps(record))
            direct.close()
            page = second.responses.input_items.list(created.id)
            assert page.data == [] and page.has_more is False
            assert second.responses.retrieve(created.id).status == "completed"
            second.responses.delete(created.id)
            with pytest.raises(openai.NotFoundError):
                first.responses.input_items.list(created.id)
    finally:
        one.stop()
        two.stop()
        redis.close()


@pytest.mark.parametrize("prefix", ["/v1", "", "/openwebui/v1"])
def test_every_base_path_lists_and_other_methods_are_405(client, server, prefix):
    created = client.responses.create(model="fake_async", input="hi", extra_body=FAKE)
    url = f"{server.url}{prefix}/responses/{created.id}/input_items"
    assert httpx.get(url, timeout=30).json()["data"][0]["content"][0]["text"] == "hi"
    refused = httpx.post(url, json={}, timeout=30)
    assert refused.status_code == 405 and "GET" in refused.headers["allow"]


def test_chat_style_text_parts_are_listed_as_the_responses_api_types_them(client, server):
    # `{"type": "text"}` parts (chat completions' kind) were listed as sent, which the SDK's types refuse; an
    # assistant's parts are an output message's (`output_text`), whatever type they came with.
    given = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "input_text", "text": "there"}]},
        {"role": "assistant", "content": [{"type": "input_text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "and now?"},
    ]
    created = client.responses.create(model="fake_async", input=given, extra_body=FAKE)
    raw = httpx.get(f"{server.url}/v1/responses/{created.id}/input_items?order=asc", timeout=30).json()["data"]
    assert [[(part["type"], part["text"]) for part in item["content"]] for item in raw] == [
        [("input_text", "hi"), ("input_text", "there")],
        [("output_text", "a"), ("output_text", "b")],
        [("input_text", "and now?")],
    ]
    for item in raw:
        ITEM.validate_python(item)
