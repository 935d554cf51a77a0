"""`/metrics`: Prometheus counters and histograms after real streams (ok, failed, cancelled), behind the key."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from haystream.server.app import create_app
from haystream.settings import ServerSettings
from support import start_server, unique

OPS_WRAPPERS = Path(__file__).parent / "ops_wrappers"
KEY = {"authorization": "Bearer metrics-key"}


@pytest.fixture
def server(upstream):
    running = start_server(upstream, pipelines_dir=str(OPS_WRAPPERS), api_keys="metrics-key")
    try:
        yield running
    finally:
        running.stop()


def samples(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers=KEY)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(snapshot: dict, name: str, **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(scenario: str, stream: bool = True) -> dict:
    return {"model": "scenario", "stream": stream, "messages": [{"role": "user", "content": scenario}]}


def test_metrics_need_the_key(server):
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/metrics").status_code == 401


def test_metrics_count_streams_failures_cancellations_and_rejections(server, upstream):
    with httpx.Client(base_url=server.url, headers=KEY, timeout=30) as client:
        before = samples(client)
        for _ in range(2):
            ok = client.post("/v1/chat/completions", json=chat("fake?tokens=5"))
            assert ok.status_code == 200 and ok.text.endswith("data: [DONE]\n\n")
        failed = client.post("/v1/chat/completions", json=chat("fake?tokens=5&fail_after=2"))
        assert '"error"' in failed.text
        held = unique("fake?tokens=100&hold_after=1")
        with client.stream("POST", "/v1/chat/completions", json=chat(held)) as stream:
            for line in stream.iter_lines():
                if '"content":"t' in line:
                    break  # leave mid-stream, after the first token
        assert upstream.wait_for_requests(1, model=held)[0].wait().client_hung_up
        missing = client.post("/v1/chat/completions", json={**chat("x"), "model": "nope"})
        assert missing.status_code == 404
        after = samples(client)
        while value(after, "haystream_client_cancellations_total", model="scenario") == value(
            before, "haystream_client_cancellations_total", model="scenario"
        ):  # the server records the cancelled request when its run has unwound (just after the upstream hang-up)
            after = samples(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/chat/completions"
    assert delta("haystream_requests_total", model="scenario", route=route, status="200") == 4
    assert delta("haystream_requests_total", model="", route=route, status="404") == 1
    assert delta("haystream_client_cancellations_total", model="scenario") == 1
    assert delta("haystream_upstream_errors_total", model="scenario") == 1
    assert delta("haystream_time_to_first_token_seconds_count", model="scenario") == 4
    assert delta("haystream_e2e_request_latency_seconds_count", model="scenario") == 4
    assert delta("haystream_inter_token_latency_seconds_count", model="scenario") >= 2 * 5
    assert delta("haystream_chunks_total", model="scenario") >= 2 * 5 + 2
    assert delta("haystream_completion_tokens_total", model="scenario") >= 2 * 5
    assert value(after, "haystream_active_streams") == 0
    assert value(after, "haystream_draining") == 0


def test_json_logs_carry_the_request_id(upstream, capfd):
    from haystream.server import logs

    logs.configure("json")
    try:
        running = start_server(upstream, pipelines_dir=str(OPS_WRAPPERS))
        try:
            with httpx.Client(base_url=running.url, timeout=30) as client:
                failed = client.post(
                    "/v1/chat/completions", json=chat("fake?tokens=5&fail_after=1"), headers={"x-request-id": "req-42"}
                )
                assert "req-42" in failed.text
        finally:
            running.stop()
    finally:
        import logging

        logger = logging.getLogger("haystream")
        for handler in list(logger.handlers):
            if isinstance(handler.formatter, logs.JsonFormatter):
                logger.removeHandler(handler)
        logger.propagate = True
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    records = [orjson.loads(line) for line in lines]
    assert any(record.get("request_id") == "req-42" and record["level"] == "error" for record in records)


def test_the_access_log_has_one_line_per_request_with_status_duration_and_request_id(upstream, capfd):
    running = start_server(
        upstream, pipelines_dir=str(OPS_WRAPPERS), api_keys="metrics-key", access_log=True, log_format="json"
    )
    try:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            ok = client.post("/v1/chat/completions", json=chat("fake?tokens=3"), headers={**KEY, "x-request-id": "a-1"})
            refused = client.get("/v1/models")
            assert (ok.status_code, refused.status_code) == (200, 401)
    finally:
        running.stop()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    access = [record for record in map(orjson.loads, lines) if record["logger"] == "haystream.access"]
    # One line each, written when the response has ended (the stream's may come after the refusal's); uvicorn's
    # own access log, which hayhooks routes through loguru, is off.
    assert sorted((r["method"], r["path"], r["status"]) for r in access) == [
        ("GET", "/v1/models", 401),
        ("POST", "/v1/chat/completions", 200),
    ], lines
    (streamed,) = (r for r in access if r["method"] == "POST")
    assert streamed["request_id"] == "a-1" and streamed["duration_ms"] > 0
    assert "uvicorn.access" not in " ".join(lines)


def test_uvicorns_access_log_has_no_handler_once_the_app_is_built():
    """`haystream serve` builds the app after uvicorn has configured logging, and hayhooks' build routes uvicorn's
    access log through loguru again: uvicorn then built every line's arguments (the client, the quoted path) for a
    logger that dropped them. With no handler to reach, it builds nothing (it checks once per connection)."""
    create_app(ServerSettings(pipelines_dir=str(OPS_WRAPPERS)))
    assert not logging.getLogger("uvicorn.access").hasHandlers()


def test_a_path_cannot_forge_access_log_lines_or_send_terminal_escapes(upstream, capfd):
    # The path is percent-decoded: `%0A` started a line of the client's own in the text log (no key needed), `%1B`
    # wrote a terminal escape sequence. uvicorn's access log, which this one replaces, quoted the path.
    running = start_server(upstream, pipelines_dir=str(OPS_WRAPPERS), api_keys="metrics-key", access_log=True)
    try:
        forged = httpx.get(running.url + "/x%0A2026-01-01 00:00:00 | INFO     | FORGED%1B[31m", timeout=30)
        assert forged.status_code == 401
    finally:
        running.stop()
    err = capfd.readouterr().err
    assert not [line for line in err.splitlines() if line.startswith("2026-01-01") or "\x1b[31m" in line], err
    assert '"GET /x\\n2026-01-01 00:00:00 | INFO     | FORGED\\x1b[31m HTTP/1.1" 401' in err
