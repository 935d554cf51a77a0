"""The security table (docs/security.md links each row here): haystream probed as an attacker would.

Real servers on loopback (haystream's app with hayhooks inside, under uvicorn), real `httpx` and `openai` clients,
raw sockets where a client must misbehave, and the fake upstream recording when a run was cut.
"""

from __future__ import annotations

import base64
import contextlib
import re
import select
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from hayhooks.server.pipelines.registry import registry
from hayhooks.settings import settings as hayhooks_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from haystream.server import ServerSettings, create_app
from haystream.server.app import CHAT_PATHS, MODEL_PATHS, OPENWEBUI_PREFIX, RESPONSES_PATHS
from haystream.server.asgi import send_json
from haystream.server.gate import Gate, allowed_hosts
from haystream.testing import ServerThread
from support import start_server, unique

PROBE_WRAPPERS = Path(__file__).parent / "security_wrappers"
KEY = "k-one-secret"
DEPLOY_KEY = "deploy-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "hi"}]


def assert_envelope(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert error["message"] and "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code, error
    return error


def serve(upstream, tmp_path_factory, name: str = "probe", **settings):
    """A server deploying the probe wrapper as `name` (hayhooks' registry is per process, its run routes per app:
    each server gets its own name so that its `/{name}/run` route exists)."""
    pipelines = tmp_path_factory.mktemp("pipelines")
    shutil.copytree(PROBE_WRAPPERS / "probe", pipelines / name)
    return start_server(upstream, pipelines_dir=str(pipelines), **settings)


@pytest.fixture(scope="module")
def locked(upstream, tmp_path_factory):
    """Keys set, every optional hayhooks route switched on: the gate alone must keep them closed."""
    server = serve(
        upstream,
        tmp_path_factory,
        api_keys=f"{KEY}, k-two",
        deploy_keys=DEPLOY_KEY,
        enable_deploy=True,
        enable_docs=True,
        enable_draw=True,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def open_server(upstream, tmp_path_factory):
    """No keys, defaults otherwise (a developer's laptop)."""
    server = serve(upstream, tmp_path_factory, name="probe_open")
    yield server
    server.stop()


@pytest.fixture
def rooted(upstream, tmp_path_factory):
    """HAYHOOKS_ROOT_PATH=/api: hayhooks' router strips the prefix before routing."""
    previous = hayhooks_settings.root_path
    hayhooks_settings.root_path = "/api"
    try:
        server = serve(upstream, tmp_path_factory, name="probe_rooted", api_keys=KEY)
    finally:
        hayhooks_settings.root_path = previous
    yield server
    server.stop()


# --- default deny: the route inventory ------------------------------------------------------------------------


def app_routes(server) -> dict[str, set[str]]:
    """Every route of the running app, hayhooks' included: path template -> methods."""
    haystream_app = server.app.app.app  # access log → gate → haystream
    hayhooks_app = haystream_app.hayhooks_app
    routes: dict[str, set[str]] = {}
    for path, operations in hayhooks_app.openapi()["paths"].items():
        routes.setdefault(path, set()).update(method.upper() for method in operations)
    for route in hayhooks_app.router.routes:  # the routes FastAPI keeps out of the schema (docs, mounts)
        path = getattr(route, "path", None)
        if path:
            routes.setdefault(path, set()).update(getattr(route, "methods", None) or {"GET"})
    for path in CHAT_PATHS | {OPENWEBUI_PREFIX + p for p in CHAT_PATHS}:
        routes.setdefault(path, set()).add("POST")
    for path in MODEL_PATHS | {OPENWEBUI_PREFIX + p for p in MODEL_PATHS}:
        routes.setdefault(path, set()).add("GET")
    for path in RESPONSES_PATHS | {OPENWEBUI_PREFIX + p for p in RESPONSES_PATHS}:
        routes.setdefault(path, set()).add("POST")
    for path in ("/v1/responses/{response_id}", "/responses/{response_id}"):
        routes.setdefault(path, set()).update({"GET", "DELETE"})
        routes.setdefault(path + "/cancel", set()).add("POST")
    return routes


ALLOW_LIST = {"/health", "/ready"}


def test_route_inventory_every_route_refuses_a_request_without_a_key(locked):
    routes = app_routes(locked)
    # The inventory really holds hayhooks' routes, so a new one after an upgrade is probed too.
    for expected in ("/status", "/deploy_files", "/undeploy/{pipeline_name}", "/probe/run", "/docs", "/openapi.json"):
        assert expected in routes, sorted(routes)
    assert any(path.startswith("/draw") for path in routes) and any("responses" in path for path in routes)
    probed = 0
    for template, methods in routes.items():
        path = re.sub(r"\{[^}]+\}", "probe", template)
        for method in [*sorted(methods - {"HEAD", "OPTIONS"}), "DELETE"]:
            response = httpx.request(method, locked.url + path, json={})
            if template in ALLOW_LIST:
                continue
            assert_envelope(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"].startswith("Bearer")
            wrong = httpx.request(method, locked.url + path, json={}, headers={"Authorization": "Bearer k-three"})
            assert_envelope(wrong, 401, "invalid_api_key")
            probed += 1
    assert probed >= 20


def test_probes_answer_without_a_key(locked):
    assert httpx.get(locked.url + "/health").json() == {"status": "ok"}
    assert httpx.get(locked.url + "/ready").json() == {"status": "ready"}  # wrappers deployed
    assert_envelope(httpx.post(locked.url + "/health"), 405)


def test_what_worked_before_still_works_with_a_key(locked):
    assert "probe" in {m["id"] for m in httpx.get(locked.url + "/v1/models", headers=AUTH).json()["data"]}
    assert httpx.get(locked.url + "/status", headers=AUTH).status_code == 200
    ran = httpx.post(locked.url + "/probe/run", json={"text": "hi"}, headers=AUTH)
    assert ran.status_code == 200 and orjson.loads(ran.json()["result"])["text"] == "HI"
    basic = "Basic " + base64.b64encode(f"haystream:{KEY}".encode()).decode()  # what hayhooks' CLI sends via netrc
    assert httpx.get(locked.url + "/status", headers={"Authorization": basic}).status_code == 200
    sdk = openai.OpenAI(base_url=locked.url + "/v1", api_key="k-two", max_retries=0)
    answer = sdk.chat.completions.create(model="probe", messages=USER, extra_body={"scenario": "fake?tokens=2"})
    assert answer.choices[0].message.content


def test_a_refusal_to_a_client_awaiting_100_continue_closes_the_connection(locked):
    """A client that sends `Expect: 100-continue` holds its body back until told to send it. Refused before that
    (no key), it never sends it: the server must close the connection, or the next request on it is read as that
    body and never answered."""
    body = b'{"model": "probe", "messages": [{"role": "user", "content": "hi"}]}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", locked.port), timeout=10) as raw:
        raw.sendall(head)
        answer = b""
        while chunk := raw.recv(65536):  # to the end of the stream: the server closes it
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 401 Unauthorized"
    assert b"connection: close" in rest.lower()
    assert b"100 Continue" not in answer  # the body was never asked for


def test_websocket_without_a_key_is_refused(locked):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as refused:
        connect(locked.url.replace("http", "ws") + "/anything").close()
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize(
    "path",
    [
        "/api/deploy_files",  # the root path hayhooks' router strips
        "/deploy_files",
        "//deploy_files",
        "/api//deploy_files",
        "/deploy_files/",
        "/Deploy_Files",
        "/deploy%5Ffiles",  # percent-encoded
        "/api/undeploy/probe",
    ],
)
def test_deploy_stays_closed_under_any_spelling_of_its_path(rooted, path):
    payload = {"name": "evil", "files": {"pipeline_wrapper.py": "raise SystemExit('owned')"}, "overwrite": True}
    assert_envelope(httpx.post(rooted.url + path, json=payload), 401)
    with_key = httpx.post(rooted.url + path, json=payload, headers=AUTH)
    assert_envelope(with_key, 403, "deploy_disabled")
    assert with_key.json()["detail"]  # hayhooks' CLI prints this field
    assert registry.get("evil") is None
    assert not (Path(hayhooks_settings.pipelines_dir) / "evil").exists()


def test_a_root_path_set_by_the_server_cannot_open_a_route(tmp_path):
    # Under `uvicorn --root-path /api` (behind a proxy that adds a prefix) every path arrives as `/api/...` and the
    # router behind routes on it without the prefix: the gate decided on `/api/deploy_files`, which is no deploy path,
    # so a chat key deployed Python (deploy disabled!), `/docs` answered, and run wrappers got the caller's credentials.
    shutil.copytree(PROBE_WRAPPERS / "probe", tmp_path / "probe_uvroot")
    settings = ServerSettings(pipelines_dir=str(tmp_path), api_keys=KEY, gc_freeze=False, gc_threshold=0)
    server = ServerThread(create_app(settings), lifespan="on", root_path="/api").start()
    try:
        payload = {"name": "evil", "files": {"pipeline_wrapper.py": "raise SystemExit('owned')"}, "overwrite": True}
        for path in ("/deploy_files", "//Deploy_Files/"):
            assert_envelope(httpx.post(server.url + path, json=payload, headers=AUTH), 403, "deploy_disabled")
        assert_envelope(httpx.get(server.url + "/docs", headers=AUTH), 404, "not_found")
        assert registry.get("evil") is None and not (tmp_path / "evil").exists()
        headers = {**AUTH, "Cookie": "session=abc", "X-Custom": "kept"}
        ran = httpx.post(server.url + "/probe_uvroot/run", json={"text": "x"}, headers=headers)
        seen = orjson.loads(ran.json()["result"])["headers"]
        assert "x-custom" in seen and "authorization" not in seen and "cookie" not in seen
        assert httpx.get(server.url + "/health").status_code == 200  # the probes too: kubelet sends no key
    finally:
        server.stop()


def test_the_root_path_really_routes(rooted):
    """The variants above are refused by the gate, not merely unrouted: with a key, /api/status reaches hayhooks."""
    assert httpx.get(rooted.url + "/api/status", headers=AUTH).status_code == 200
    assert_envelope(httpx.get(rooted.url + "/api/status"), 401)


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_haystreams_routes_answer_under_the_root_path(rooted, prefix):
    """hayhooks' router strips the root path before routing, so `/api/v1/chat/completions` reached hayhooks' own chat
    route: past the max_tokens cap and the stream limits, with the caller's credentials handed to the wrapper."""
    headers = {**AUTH, "Cookie": "session=abc", "X-Custom": "kept"}
    too_many = {"model": "probe_rooted", "messages": USER, "max_tokens": 10**9}
    for chat_path in ("/v1/chat/completions", "/chat/completions", "/openwebui/v1/chat/completions"):
        chat = httpx.post(
            rooted.url + prefix + chat_path,
            json={"model": "probe_rooted", "messages": USER, "mode": "headers"},
            headers=headers,
        )
        seen = orjson.loads(chat.json()["choices"][0]["message"]["content"])
        assert "x-custom" in seen and "authorization" not in seen and "cookie" not in seen, (chat_path, seen)
        assert_envelope(httpx.post(rooted.url + prefix + chat_path, json=too_many, headers=AUTH), 400)
    models = httpx.get(rooted.url + prefix + "/v1/models", headers=AUTH).json()["data"]
    assert {model["owned_by"] for model in models} == {"haystream"}
    assert httpx.get(rooted.url + prefix + "/metrics", headers=AUTH).status_code == 200
    assert_envelope(httpx.post(rooted.url + prefix + "/v1/chat/completions", json=too_many), 401)


def test_slash_variants_of_the_openai_routes_are_behind_the_gate_and_never_redirect(locked, open_server):
    """`/v1/chat/completions/` reached hayhooks' router, whose 307 named whatever `Host` the client sent (any, with
    keys set): now it is served as the route, behind the gate like every spelling of it."""
    body = {"model": "probe", "messages": USER, "mode": "headers"}
    evil = {"Host": "evil.example"}
    for path in ("/v1/chat/completions/", "//v1/chat/completions", "/v1//chat/completions", "/v1/models/"):
        assert_envelope(httpx.post(locked.url + path, json=body, headers=evil), 401)
        answered = httpx.post(locked.url + path, json=body, headers={**AUTH, **evil})
        if path.endswith("models/"):
            answered = httpx.get(locked.url + path, headers={**AUTH, **evil})
        assert answered.status_code == 200 and "location" not in answered.headers, (path, answered.text)
        assert_envelope(httpx.post(open_server.url + path, json=body, headers=evil), 400, "host_not_allowed")


def test_hayhooks_slash_redirects_are_relative_and_never_name_the_host_sent(locked, rooted):
    """hayhooks' router answers its routes with a trailing slash (`/status/`, `/{name}/run/`) with a 307 whose
    `Location` it builds from the `Host` the client sent and the scheme uvicorn saw: `http://evil.example/status`,
    and behind a TLS proxy an `http://` URL to which a client re-sends its POST body in the clear. A relative
    reference keeps whatever scheme, host and port the client used."""
    evil = {**AUTH, "Host": "evil.example"}
    for path, location in (("/status/", "/status"), ("/status/?x=1", "/status?x=1"), ("/probe/run/", "/probe/run")):
        answered = httpx.post(locked.url + path, json={"text": "x"}, headers=evil)
        if path.startswith("/status"):
            answered = httpx.get(locked.url + path, headers=evil)
        assert answered.status_code == 307 and answered.headers["location"] == location, (path, answered.headers)
    for host in ("EVIL.example:8080", "a@b"):  # any case and port; a Host that is no host name: the server's address
        answered = httpx.get(locked.url + "/status/", headers={**AUTH, "Host": host})
        assert answered.headers["location"] == "/status", (host, answered.headers)
    assert_envelope(httpx.get(locked.url + "/status/"), 401)  # still behind the gate
    followed = httpx.post(locked.url + "/probe/run/", json={"text": "x"}, headers=AUTH, follow_redirects=True)
    assert followed.status_code == 200 and orjson.loads(followed.json()["result"])["text"] == "X"
    under_root = httpx.get(rooted.url + "/api/status/", headers={**AUTH, "Host": "evil.example"})
    assert under_root.status_code == 307 and under_root.headers["location"] == "/api/status"


def test_docs_and_draw_are_off_by_default(open_server):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/draw/probe", "//docs", "/DOCS/"):
        assert_envelope(httpx.get(open_server.url + path), 404, "not_found")


def test_docs_can_be_enabled(locked):
    assert httpx.get(locked.url + "/openapi.json", headers=AUTH).json()["paths"]


# --- deploy keys and path traversal ---------------------------------------------------------------------------


def test_a_chat_key_cannot_deploy_when_deploy_keys_are_set(locked):
    payload = {"name": "evil", "files": {"pipeline_wrapper.py": "x"}}
    assert_envelope(httpx.post(locked.url + "/deploy_files", json=payload, headers=AUTH), 403, "deploy_forbidden")
    traversal = {"name": "evil", "files": {"../../escape.py": "x"}}
    admin = {"Authorization": f"Bearer {DEPLOY_KEY}"}
    assert assert_envelope(httpx.post(locked.url + "/deploy_files", json=traversal, headers=admin), 400)["param"]
    assert registry.get("evil") is None
    # The name hayhooks undeploys is the path's: a valid name in the body does not vouch for it.
    for name in ("%2E%2E", "a.b"):
        undeploy = httpx.post(locked.url + f"/undeploy/{name}", json={"name": "probe"}, headers=admin)
        assert assert_envelope(undeploy, 400)["param"] == "name", undeploy.text
    assert registry.get("probe") is not None
    # a deploy key is an admin key: it may chat too
    assert httpx.get(locked.url + "/v1/models", headers=admin).status_code == 200


# --- configuration that cannot fail open ----------------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", " ", ",", " , ,"])
def test_blank_keys_refuse_to_start(blank, monkeypatch):
    monkeypatch.setenv("HAYSTREAM_API_KEYS", blank)
    with pytest.raises(ValidationError, match="holds no key"):
        ServerSettings()
    with pytest.raises(ValidationError, match="HAYSTREAM_DEPLOY_KEYS"):
        ServerSettings(api_keys="fine", deploy_keys=blank)


def test_haystream_serve_refuses_blank_keys_with_a_clear_message(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HAYSTREAM_API_KEYS": " , "}
    result = subprocess.run(
        [sys.executable, "-m", "haystream", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "HAYSTREAM_API_KEYS is set but holds no key" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_a_public_bind_without_keys_warns(caplog):
    from haystream.server.app import warn_if_exposed

    with caplog.at_level("WARNING", logger="haystream.server"):
        warn_if_exposed(ServerSettings(host="0.0.0.0"))
    assert "WITHOUT API keys" in caplog.text
    # ...and says that the Host check refuses clients that use a name, and which variable lets them in.
    assert "other than localhost, *.localhost get 400 host_not_allowed" in caplog.text
    assert "HAYSTREAM_ALLOWED_HOSTS" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="haystream.server"):
        warn_if_exposed(ServerSettings(host="mybox.lan"))
    assert "other than localhost, *.localhost, mybox.lan get 400" in caplog.text  # the bound name passes
    caplog.clear()
    with caplog.at_level("WARNING", logger="haystream.server"):
        warn_if_exposed(ServerSettings(host="0.0.0.0", allow_unauthenticated=True))
    assert "WITHOUT API keys" not in caplog.text  # keyless is meant: only the Host note remains
    assert "host_not_allowed" in caplog.text and "HAYSTREAM_ALLOWED_HOSTS" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="haystream.server"):
        warn_if_exposed(ServerSettings(host="0.0.0.0", allow_unauthenticated=True, allowed_hosts="haystream"))
        warn_if_exposed(ServerSettings(host="0.0.0.0", api_keys="k"))
        warn_if_exposed(ServerSettings(host="127.0.0.1"))
    assert caplog.text == ""


# --- malformed credentials --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        b"Basic " + base64.b64encode("nutzer:schl\u00fcssel".encode()),
        b"Basic \xff\xfe\xfd",
        b"Basic !!!not-base64",
        b"Bearer",
        b"Bearer \xe9\xe9",
        b"Token " + KEY.encode(),
        b"Bearer " + b"x" * 8000,
    ],
)
def test_malformed_credentials_are_a_401_not_a_500(locked, authorization):
    response = httpx.get(locked.url + "/v1/models", headers=[(b"authorization", authorization)])
    assert_envelope(response, 401, "invalid_api_key")


# --- CORS and foreign origins ------------------------------------------------------------------------------------


def test_a_foreign_web_page_cannot_drive_a_local_server(open_server):
    evil = {"Origin": "https://evil.example"}
    preflight = httpx.options(
        open_server.url + "/probe_open/run", headers={**evil, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers
    # A "simple" cross-origin POST (no preflight) is refused before it runs anything.
    ran = httpx.post(open_server.url + "/probe_open/run", content=b'{"text": "x"}', headers=evil)
    assert_envelope(ran, 403, "origin_not_allowed")
    chat = httpx.post(open_server.url + "/v1/chat/completions", json={"model": "probe", "messages": USER}, headers=evil)
    assert_envelope(chat, 403, "origin_not_allowed")
    # same origin (hayhooks' own pages) and clients that send no Origin are fine
    same = {"Origin": open_server.url}
    assert httpx.post(open_server.url + "/probe_open/run", json={"text": "x"}, headers=same).status_code == 200


@pytest.mark.parametrize("origin", ["http://[evil", "http://[::1", "https://[v1.x]:80", "http://a]b[c"])
def test_a_malformed_origin_is_refused_with_a_403_not_a_500(locked, open_server, origin):
    """An `Origin` that is not a URL (an unclosed IPv6 bracket) made the same-origin check raise: a plain-text 500
    and a traceback in the log, for anyone, before any key was asked for."""
    for server, auth in ((locked, AUTH), (locked, {}), (open_server, {})):
        answered = httpx.get(server.url + "/v1/models", headers={"Origin": origin, **auth})
        assert_envelope(answered, 403, "origin_not_allowed")
    handshake = (
        b"GET /anything HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Origin: %s\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ) % origin.encode()
    with socket.create_connection(("127.0.0.1", open_server.port), timeout=30) as sock:
        sock.sendall(handshake)
        assert sock.recv(65536).startswith(b"HTTP/1.1 403")


def test_cors_origins_allow_a_listed_origin(upstream, tmp_path_factory):
    # An extension's or a desktop app's own origin is listed as the browser sends it (the settings check knows only
    # http(s) origins' form, and refused these at first).
    extension = "chrome-extension://abcdefghijklmnopabcdefghijklmnop"
    origins = f"https://chat.example,{extension}"
    server = serve(upstream, tmp_path_factory, name="probe_cors", api_keys=KEY, cors_origins=origins)
    try:
        preflight = httpx.options(
            server.url + "/v1/chat/completions",
            headers={
                "Origin": "https://chat.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200  # no key needed for the preflight itself
        assert preflight.headers["access-control-allow-origin"] == "https://chat.example"
        listed = httpx.get(server.url + "/v1/models", headers={**AUTH, "Origin": "https://chat.example"})
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == "https://chat.example"
        assert_envelope(httpx.get(server.url + "/v1/models", headers={"Origin": "https://chat.example"}), 401)
        foreign = httpx.get(server.url + "/v1/models", headers={**AUTH, "Origin": "https://evil.example"})
        assert_envelope(foreign, 403, "origin_not_allowed")
        from_extension = httpx.get(server.url + "/v1/models", headers={**AUTH, "Origin": extension})
        assert from_extension.status_code == 200 and from_extension.headers["access-control-allow-origin"] == extension
    finally:
        server.stop()


def test_a_refused_preflight_gets_the_error_envelope(upstream, tmp_path_factory):
    """With origins listed, Starlette's CORS middleware answers preflights itself, and refused one from another
    origin (or asking for a method or private-network access it does not allow) with a plain-text 400 "Disallowed
    CORS origin": the same page's request without a preflight got 403 `origin_not_allowed`."""
    server = serve(
        upstream, tmp_path_factory, name="probe_preflight", api_keys=KEY, cors_origins="https://chat.example"
    )
    try:

        def preflight(origin: str, method: str = "POST", **extra: str) -> httpx.Response:
            headers = {"Origin": origin, "Access-Control-Request-Method": method, **extra}
            return httpx.options(server.url + "/v1/chat/completions", headers=headers)

        for origin in ("https://evil.example", "http://[evil", "null"):
            error = assert_envelope(preflight(origin), 403, "origin_not_allowed")
            assert "HAYSTREAM_CORS_ORIGINS" in error["message"]
        refused = preflight("https://chat.example", "PROPFIND")
        assert "method" in assert_envelope(refused, 400, "cors_not_allowed")["message"]
        private = preflight("https://chat.example", **{"Access-Control-Request-Private-Network": "true"})
        assert "private-network" in assert_envelope(private, 400, "cors_not_allowed")["message"]
        assert preflight("https://chat.example").status_code == 200
    finally:
        server.stop()


def test_a_listed_origin_may_send_what_the_openai_sdk_sends(upstream, tmp_path_factory):
    """The OpenAI SDK's requests carry `x-stainless-*` headers: a browser asks for them in the preflight, which was
    refused (400 "Disallowed CORS headers") while they were not all listed, so no SDK could call from a page."""
    sent: list[httpx.Request] = []
    origin = "https://chat.example"
    server = serve(upstream, tmp_path_factory, name="probe_cors_sdk", api_keys=KEY, cors_origins=origin)
    try:
        with (
            httpx.Client(event_hooks={"request": [sent.append]}) as http,
            openai.OpenAI(
                base_url=server.url + "/v1",
                api_key=KEY,
                http_client=http,
                default_headers={"Origin": origin},
                max_retries=0,
            ) as sdk,
        ):
            assert any(model.id == "probe_cors_sdk" for model in sdk.models.list())
        # What a browser would name in the preflight: every header of that request it does not set itself.
        names = sorted(
            set(sent[0].headers)
            - {"host", "connection", "content-length", "accept", "accept-encoding", "user-agent", "origin"}
        )
        assert any(name.startswith("x-stainless-") for name in names)
        preflight = httpx.options(
            server.url + "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": ", ".join(names),
            },
        )
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == origin
        allowed = {name.strip().lower() for name in preflight.headers["access-control-allow-headers"].split(",")}
        assert set(names) <= allowed
        assert "access-control-allow-credentials" not in preflight.headers
        # The SDK's backoff reads Retry-After (429, 503); a browser hides any header that is not exposed.
        answer = httpx.get(server.url + "/v1/models", headers={"Origin": origin, **AUTH})
        exposed = {name.strip().lower() for name in answer.headers["access-control-expose-headers"].split(",")}
        assert {"retry-after", "x-request-id"} <= exposed
    finally:
        server.stop()


# --- DNS rebinding ---------------------------------------------------------------------------------------------


def test_a_dns_rebinding_page_cannot_read_a_local_server(open_server, upstream):
    """A page on evil.example whose name the attacker re-points at 127.0.0.1 is same-origin to itself: its Origin
    passes any origin check, but the browser names evil.example in `Host`."""
    port = open_server.port
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    assert_envelope(httpx.get(open_server.url + "/v1/models", headers=rebound), 400, "host_not_allowed")
    ran = httpx.post(open_server.url + "/probe_open/run", json={"text": "x"}, headers=rebound)
    assert_envelope(ran, 400, "host_not_allowed")
    scenario = unique()
    chat = {"model": "probe_open", "messages": USER, "scenario": scenario}
    refused = httpx.post(open_server.url + "/v1/chat/completions", json=chat, headers={"Host": "evil.example"})
    assert_envelope(refused, 400, "host_not_allowed")
    assert not [r for r in upstream.records if r.model == scenario]  # nothing ran
    handshake = (
        b"GET /anything HTTP/1.1\r\nHost: evil.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(handshake)
        assert sock.recv(65536).startswith(b"HTTP/1.1 403")
    # What this machine's own clients send passes: loopback names and addresses, with and without the port.
    for host in (f"localhost:{port}", "localhost", "LOCALHOST.", f"127.0.0.1:{port}", f"[::1]:{port}", "a.localhost"):
        assert httpx.get(open_server.url + "/v1/models", headers={"Host": host}).status_code == 200, host
    # Probes answer whatever the Host (kubelet sends the pod's IP, a load balancer perhaps a name).
    for host in ("10.1.2.3:1416", "evil.example"):
        assert httpx.get(open_server.url + "/health", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_default_to_local_names_without_keys_and_to_any_with_keys():
    assert allowed_hosts(ServerSettings(host="127.0.0.1")) == {"localhost", ".localhost"}
    assert allowed_hosts(ServerSettings(host="0.0.0.0", allow_unauthenticated=True)) == {"localhost", ".localhost"}
    assert allowed_hosts(ServerSettings(host="mybox.lan")) == {"localhost", ".localhost", "mybox.lan"}
    assert allowed_hosts(ServerSettings(api_keys="k")) is None  # a rebinding page cannot present a key
    assert allowed_hosts(ServerSettings(deploy_keys="d")) is None
    assert allowed_hosts(ServerSettings(allowed_hosts=" * ")) is None
    assert allowed_hosts(ServerSettings(api_keys="k", allowed_hosts="A.example, b")) == {"a.example", "b"}


def test_deployments_reach_the_server_by_service_name(locked, tight):
    # Keys set and no list (Compose, Kubernetes): Open WebUI's `http://haystream:1416` passes, the key protects.
    assert httpx.get(locked.url + "/v1/models", headers={**AUTH, "Host": "haystream:1416"}).status_code == 200
    # A list (HAYSTREAM_ALLOWED_HOSTS="haystream, .svc.cluster.local") holds with keys too; addresses always pass.
    for host in ("haystream:1416", "haystream", "haystream.ns.svc.cluster.local:1416", f"127.0.0.1:{tight.port}"):
        assert httpx.get(tight.url + "/v1/models", headers={**AUTH, "Host": host}).status_code == 200, host
    for host in ("evil.example", "localhost:1416", "svc.cluster.local.evil.example", "evilsvc.cluster.local"):
        refused = httpx.get(tight.url + "/v1/models", headers={**AUTH, "Host": host})
        assert_envelope(refused, 400, "host_not_allowed")
        assert refused.json()["detail"] == refused.json()["error"]["message"]  # hayhooks' CLI reads `detail`
    assert httpx.get(tight.url + "/ready", headers={"Host": "10.244.0.7:1416"}).status_code == 200


# --- limits on every request --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight(upstream, tmp_path_factory):
    server = serve(
        upstream,
        tmp_path_factory,
        name="probe_tight",
        api_keys=f"{KEY}, k-two",
        max_body_bytes=64 * 1024,
        body_timeout_seconds=1,
        max_streams=3,
        max_streams_per_key=2,
        send_timeout_seconds=1,
        max_tokens=1000,
        allowed_hosts="haystream, .svc.cluster.local",
    )
    yield server
    server.stop()


@pytest.mark.parametrize("path", ["/probe_tight/run", "/v1/files", "/v1/chat/completions", "/status", "/v1/responses"])
def test_body_limit_applies_to_every_route(tight, path):
    big = b"{" + b" " * (70 * 1024) + b"}"
    assert_envelope(httpx.post(tight.url + path, content=big, headers=AUTH), 413, "body_too_large")

    def chunked():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(70):
            yield b" " * 1024

    assert_envelope(httpx.post(tight.url + path, content=chunked(), headers=AUTH), 413, "body_too_large")


def test_a_body_that_never_arrives_times_out(tight):
    request = (
        f"POST /probe_tight/run HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"text"'
    ).encode()
    with socket.create_connection(("127.0.0.1", tight.port), timeout=30) as sock:
        sock.sendall(request)  # ... and the remaining 93 bytes never come
        reply = _read_response(sock)
    assert reply.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in reply


def test_a_run_route_receives_a_large_streamed_body_whole(open_server):
    text = "a" * (3 * 1024 * 1024)
    body = orjson.dumps({"text": text})

    def chunked():  # no Content-Length: the gate hands the body on as it arrives
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    headers = {"Content-Type": "application/json"}
    ran = httpx.post(open_server.url + "/probe_open/run", content=chunked(), headers=headers, timeout=60)
    assert ran.status_code == 200, ran.text[:300]
    assert orjson.loads(ran.json()["result"])["text"] == text.upper()


class BodyProbe:
    """An app behind the gate that reads its body piece by piece (or, on `/unread`, not at all) and says what came."""

    def __init__(self) -> None:
        self.first_piece = threading.Event()
        self.messages: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["path"] == "/unread":
            await send_json(send, 200, {"read": 0})
            return
        size = 0
        while True:
            message = await receive()
            self.messages.append(message["type"])
            if message["type"] == "http.disconnect":
                return  # the client left, as far as this app knows: nothing to answer
            size += len(message.get("body", b""))
            if size:
                self.first_piece.set()
            if not message.get("more_body", False):
                break
        await send_json(send, 200, {"read": size})


@pytest.fixture(params=[60.0])
def body_probe(request):
    """A `BodyProbe` behind a gate with a 2,048-byte limit and a body timeout of `request.param` seconds."""
    probe = BodyProbe()
    settings = ServerSettings(max_body_bytes=2048, body_timeout_seconds=request.param)
    with ServerThread(Gate(probe, settings)) as server:
        yield probe, server


def test_a_fault_behind_the_gate_is_answered_with_the_envelope_not_uvicorns_text(caplog):
    """A fault nobody foresaw anywhere behind the gate (its own checks, hayhooks' middleware) reached uvicorn, which
    answers a plain-text 500: the Origin check's did, before any key was asked for. The gate answers it instead, with
    the envelope and without the fault's text, which goes to the log with its traceback."""

    async def faulty(scope, receive, send) -> None:
        raise RuntimeError("fault at /srv/secret/path")

    with ServerThread(Gate(faulty, ServerSettings())) as server:
        answered = httpx.get(server.url + "/v1/models")
    error = assert_envelope(answered, 500, "internal_error")
    assert "fault" not in answered.text and "/srv" not in answered.text, error
    assert any("fault at /srv/secret/path" in (r.exc_text or "") for r in caplog.records if r.exc_info)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _post_chunked(server, path: str, first: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    sock.sendall(head + _chunk(first))
    return sock


def test_a_body_reaches_the_app_as_it_arrives(body_probe):
    probe, server = body_probe
    with _post_chunked(server, "/read", b"a" * 1000) as sock:
        assert probe.first_piece.wait(30), "the gate held the body back until it was complete"
        sock.sendall(_chunk(b"b" * 1000) + b"0\r\n\r\n")
        reply = _read_response(sock)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"read":2000}')


def test_the_size_limit_holds_on_a_body_already_partly_forwarded(body_probe):
    probe, server = body_probe
    with _post_chunked(server, "/read", b"a" * 1000) as sock:
        assert probe.first_piece.wait(30)
        sock.sendall(_chunk(b"b" * 1500))  # 2,500 bytes: over the 2,048 limit
        reply = _read_response(sock)
    assert reply.startswith(b"HTTP/1.1 413") and b'"code":"body_too_large"' in reply
    assert probe.messages[-1] == "http.disconnect"  # the app's request was cut, it did not get a partial body


@pytest.mark.parametrize("body_probe", [1.0], indirect=True)
def test_the_time_limit_holds_on_a_body_already_partly_forwarded(body_probe):
    probe, server = body_probe
    with _post_chunked(server, "/read", b"a" * 1000) as sock:
        assert probe.first_piece.wait(30)
        reply = _read_response(sock)  # ... and the rest never comes
    assert reply.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in reply
    assert probe.messages[-1] == "http.disconnect"


def test_limits_hold_on_a_body_the_app_does_not_read(body_probe):
    _, server = body_probe
    with _post_chunked(server, "/unread", b"a" * 1000) as sock:
        sock.sendall(_chunk(b"b" * 1500) + b"0\r\n\r\n")
        reply = _read_response(sock)
    assert reply.startswith(b"HTTP/1.1 413") and b'"code":"body_too_large"' in reply
    with _post_chunked(server, "/unread", b"a" * 1000) as sock:
        sock.sendall(b"0\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")


def test_max_tokens_is_bounded_by_the_operator(tight):
    chat = {"model": "probe_tight", "messages": USER}
    too_many = httpx.post(tight.url + "/v1/chat/completions", json={**chat, "max_tokens": 5000}, headers=AUTH)
    assert assert_envelope(too_many, 400, "max_tokens_too_large")["param"] == "max_tokens"
    completion = {**chat, "max_completion_tokens": 1001}
    error = assert_envelope(httpx.post(tight.url + "/v1/chat/completions", json=completion, headers=AUTH), 400)
    assert error["param"] == "max_completion_tokens" and error["message"].startswith("max_completion_tokens is 1001")
    for bad in ({"max_tokens": -1}, {"max_tokens": "many"}, {"n": 2}, {"temperature": "hot"}, {"top_p": 3}):
        assert_envelope(httpx.post(tight.url + "/v1/chat/completions", json={**chat, **bad}, headers=AUTH), 400)


def _open_stream(server, key: str, scenario: str) -> tuple[httpx.Client, httpx.Response]:
    client = httpx.Client(timeout=60)
    body = {"model": "probe_tight", "messages": USER, "stream": True, "scenario": scenario}
    response = client.send(
        client.build_request(
            "POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ),
        stream=True,
    )
    return client, response


def test_concurrent_streams_are_capped_globally_and_per_key(tight, upstream):
    scenario = unique("fake?tokens=3&hold_after=1")
    held = []
    try:
        for key in (KEY, KEY):  # two streams for one key: its cap
            client, response = _open_stream(tight, key, scenario)
            assert response.status_code == 200
            held.append((client, response))
        per_key = httpx.post(
            tight.url + "/v1/chat/completions", json={"model": "probe_tight", "messages": USER}, headers=AUTH
        )
        assert_envelope(per_key, 429, "too_many_requests")
        assert per_key.headers["retry-after"] == "1"
        client, response = _open_stream(tight, "k-two", scenario)  # another key still gets in
        assert response.status_code == 200
        held.append((client, response))
        over = httpx.post(
            tight.url + "/v1/chat/completions",
            json={"model": "probe_tight", "messages": USER},
            headers={"Authorization": "Bearer k-two"},
        )
        assert_envelope(over, 429, "too_many_requests")  # the server's cap of 3
        assert "HAYSTREAM_MAX_STREAMS" in over.json()["error"]["message"]
    finally:
        for client, response in held:
            response.close()
            client.close()
    for record in upstream.wait_for_requests(3, model=scenario):
        assert record.wait(timeout=30).client_hung_up  # leaving cut each held run at the upstream
    # places are given back: a new request is admitted again
    sdk = openai.OpenAI(base_url=tight.url + "/v1", api_key=KEY, max_retries=2)
    answer = sdk.chat.completions.create(model="probe_tight", messages=USER, extra_body={"scenario": "fake?tokens=2"})
    assert answer.choices[0].message.content


def test_a_client_that_stops_reading_is_dropped_and_its_upstream_cut(tight, upstream):
    total = 400_000
    scenario = unique(f"fake?tokens={total}")
    body = orjson.dumps({"model": "probe_tight", "messages": USER, "stream": True, "scenario": scenario})
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect(("127.0.0.1", tight.port))
        sock.sendall(request)
        # ...and never read: the server's writes block, and after send_timeout_seconds it gives up.
        record = upstream.wait_for_requests(1, model=scenario)[0].wait(timeout=120)
    finally:
        sock.close()
    assert record.client_hung_up and not record.completed
    assert record.tokens_sent < total


def test_other_requests_stay_responsive_during_a_hostile_task_prompt(open_server):
    hostile = "### Task:\n" + "###Output: <chat_history>USER: {" * 100_000  # ~3.3 MB, under the body limit
    body = {"model": "probe", "messages": [{"role": "user", "content": hostile}], "scenario": "fake?tokens=1"}
    result: dict[str, httpx.Response] = {}
    hostile_done = threading.Event()

    def send_hostile() -> None:
        result["hostile"] = httpx.post(open_server.url + "/v1/chat/completions", json=body, timeout=120)
        hostile_done.set()

    thread = threading.Thread(target=send_hostile)
    thread.start()
    # A backtracking detector held the event loop for hours on this prompt; now both answer.
    assert httpx.get(open_server.url + "/v1/models", timeout=60).status_code == 200
    assert hostile_done.wait(120)
    thread.join()
    assert result["hostile"].status_code == 200


# --- no leaks ------------------------------------------------------------------------------------------------------


def test_errors_reach_clients_redacted_with_a_request_id(locked, caplog):
    response = httpx.post(
        locked.url + "/v1/chat/completions",
        json={"model": "probe", "messages": USER, "mode": "leak"},
        headers={**AUTH, "X-Request-ID": "req-123"},
    )
    message = assert_envelope(response, 500, "pipeline_error")["message"]
    for secret in ("hunter2", "sk-abcdef1234567890", "tok-0123456789", KEY, "api_key=sk", "user:"):
        assert secret not in message
    assert "llm.internal/v1/chat" in message and "(request id req-123)" in message
    assert response.headers["x-request-id"] == "req-123"


@pytest.mark.parametrize("tracebacks", [False, True], ids=["plain", "HAYHOOKS_SHOW_TRACEBACKS"])
def test_a_run_routes_failure_reaches_the_client_redacted(locked, monkeypatch, tracebacks):
    # hayhooks answers a run_api that raised with 500 {"detail": "Pipeline execution failed: <the error>"}: the
    # error's text as it was (an upstream URL's password, an api_key, a bearer token, the server's own key), and with
    # HAYHOOKS_SHOW_TRACEBACKS the traceback after it.
    monkeypatch.setattr(hayhooks_settings, "show_tracebacks", tracebacks)
    response = httpx.post(locked.url + "/probe/run", json={"text": "leak"}, headers=AUTH)
    error = assert_envelope(response, 500, "pipeline_error")
    for secret in ("hunter2", "sk-abcdef1234567890", "tok-0123456789", KEY, "api_key=sk", "user:", "Traceback"):
        assert secret not in response.text
    assert error["message"].startswith("Pipeline execution failed: upstream https://llm.internal/v1/chat refused")
    assert response.json()["detail"] == error["message"]  # hayhooks' CLI shows that field
    assert response.headers["x-request-id"]


def test_hayhooks_refusals_reach_the_client_in_the_openai_envelope_with_their_detail(locked):
    # FastAPI answers hayhooks' refusals with {"detail": ...} only, which OpenAI clients do not parse.
    invalid = httpx.post(locked.url + "/probe/run", json={"txt": "hi", "extra": 1}, headers=AUTH)
    error = assert_envelope(invalid, 422)
    assert error["type"] == "invalid_request_error" and error["param"] == "text"
    assert error["message"].startswith("text: Field required")
    assert invalid.json()["detail"][0]["loc"] == ["body", "text"]  # hayhooks' own answer, kept for its clients

    missing = httpx.get(locked.url + "/status/nowhere", headers=AUTH)
    error = assert_envelope(missing, 404)
    assert error["type"] == "not_found_error" and error["message"] == "Pipeline 'nowhere' not found"
    assert missing.json()["detail"] == "Pipeline 'nowhere' not found"

    refused = httpx.post(locked.url + "/probe/run", json={"text": "refuse:30"}, headers=AUTH)
    assert (
        assert_envelope(refused, 400)["message"] == refused.json()["detail"].strip() == "no no no no no no no no no no"
    )

    # The wrapper's own answers pass untouched, a refusal too long to be read for its message too.
    assert httpx.post(locked.url + "/probe/run", json={"text": "hi"}, headers=AUTH).json()["result"].startswith("{")
    long = httpx.post(locked.url + "/probe/run", json={"text": "refuse:90000"}, headers=AUTH)
    assert long.status_code == 400 and set(long.json()) == {"detail"} and len(long.json()["detail"]) == 90000


def test_wrappers_do_not_receive_credentials(locked):
    headers = {**AUTH, "Cookie": "session=abc", "X-Custom": "kept"}
    chat = httpx.post(
        locked.url + "/v1/chat/completions",
        json={"model": "probe", "messages": USER, "mode": "headers"},
        headers=headers,
    )
    seen = orjson.loads(chat.json()["choices"][0]["message"]["content"])
    assert "x-custom" in seen and "authorization" not in seen and "cookie" not in seen
    ran = httpx.post(locked.url + "/probe/run", json={"text": "x"}, headers=headers)
    seen = orjson.loads(ran.json()["result"])["headers"]
    assert "x-custom" in seen and "authorization" not in seen and "cookie" not in seen


def test_the_local_model_queue_times_out(monkeypatch):
    import asyncio

    from haystream.local import LocalModelBusy, local_model_turn
    from haystream.openai import status_for_failure

    monkeypatch.setenv("HAYSTREAM_LOCAL_QUEUE_TIMEOUT", "0.05")

    async def scenario() -> None:
        holding = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            async with local_model_turn():
                holding.set()
                await release.wait()

        task = asyncio.create_task(holder())
        await holding.wait()
        with pytest.raises(LocalModelBusy) as busy:
            async with local_model_turn():
                pass
        assert status_for_failure(busy.value) == 503
        release.set()
        await task
        async with local_model_turn():  # the turn is free again
            pass

    asyncio.run(scenario())


# --- schema fuzzing --------------------------------------------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", 3, None]), "content": _json}
)
_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", "file", "other"])},
    optional={
        "text": _json,
        "image_url": _json
        | st.fixed_dictionaries(
            {
                "url": st.sampled_from(
                    ["data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,@@@", "http://x/y.png", "data:,", ""]
                )
            }
        ),
    },
)
_valid_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", "developer"]),
        "content": st.text(max_size=30) | st.lists(_part, max_size=3),
    },
    optional={"tool_calls": _json, "tool_call_id": _json, "name": _json},
)
_chat_body = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["probe", "nope", "", 7]),
        "messages": st.lists(_valid_message, min_size=1, max_size=3) | st.lists(_message, max_size=3) | _json,
    },
    optional={
        "stream": _json,
        "stream_options": _json,
        "max_tokens": _json,
        "n": _json,
        "temperature": _json,
        "tools": _json,
        "user": _json,
        "scenario": st.just("fake?tokens=1"),
    },
)


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_chat_body | _json)
def test_fuzzed_chat_bodies_never_cause_a_5xx(locked, body):
    response = httpx.post(locked.url + "/v1/chat/completions", content=orjson.dumps(body), headers=AUTH, timeout=30)
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        assert_envelope(response, response.status_code)


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# --- request heads ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cli_server(workers: int, **env: str) -> Iterator[int]:
    """A real `haystream serve` (its own protocol, unlike the in-process test servers) on the probe wrappers, with a
    key and `env`; yields its port once it serves."""
    import os

    from test_cli_serve import free_port, start_serve, stop

    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("HAYSTREAM_", "HAYHOOKS_"))}
    environment = {**inherited, "HAYSTREAM_API_KEYS": KEY, "HAYSTACK_TELEMETRY_ENABLED": "False", **env}
    args = ["--port", str(port), "--workers", str(workers), "--pipelines-dir", str(PROBE_WRAPPERS)]
    process = start_serve(args, environment)
    try:
        assert process.log.wait_for("Application startup complete", count=workers)
        # One process binds after its app started (it says so); with workers, the parent bound before starting them.
        assert workers > 1 or process.log.wait_for("Uvicorn running on")
        yield port
    finally:
        stop(process)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_endless_request_head_is_refused_without_a_key(tmp_path, workers):
    """httptools copies a header or URL arriving in pieces whole each time, without a limit: a 256 MB header held
    `haystream serve`'s loop for seconds at a time (the probes waited 20 s). Now: 431 past 64 KiB, then closed."""
    with cli_server(workers) as port:
        for start in (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ", b"GET /"):  # a header, the URL
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(start)
                answer = b""
                try:
                    for _ in range(64):  # 4 MiB at most; the server answers and closes after 64 KiB
                        sock.sendall(b"a" * 65536)
                except OSError:
                    pass  # closed by the server while we were still sending
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
            assert b'"error"' in answer and b"Traceback" not in answer
        # Heads of ordinary size still pass: a 32 KiB header, and a small head with a large body in one write.
        padded = httpx.get(f"http://127.0.0.1:{port}/health", headers={"X-Pad": "p" * 32 * 1024})
        assert padded.status_code == 200
        body = httpx.post(f"http://127.0.0.1:{port}/v1/files", content=b"x" * 200_000, headers=AUTH)
        assert body.status_code != 431


def test_an_http_1_0_client_gets_a_stream_without_the_chunked_coding_it_does_not_know():
    """uvicorn's httptools protocol sent a stream (no length known) with `Transfer-Encoding: chunked` to HTTP/1.0
    clients too, which read the chunk sizes as part of the stream (RFC 9112 §6.1): it now ends with the connection."""
    body = b'{"model": "probe", "stream": true, "mode": "headers", "messages": [{"role": "user", "content": "hi"}]}'
    head = b"POST /v1/chat/completions HTTP/%s\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n"
    with cli_server(1) as port:
        answers = {}
        for version in (b"1.0", b"1.1"):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(head % (version, KEY.encode(), len(body)) + b"Connection: close\r\n\r\n" + body)
                answers[version] = b"".join(iter(lambda: sock.recv(65536), b""))  # until the server closes
    headers, _, stream = answers[b"1.0"].partition(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 200") and b"text/event-stream" in headers
    assert b"transfer-encoding" not in headers.lower()
    assert stream.startswith(b"data: {") and stream.endswith(b"data: [DONE]\n\n"), stream[-100:]
    assert b"transfer-encoding: chunked" in answers[b"1.1"].lower()  # HTTP/1.1 clients still get chunks


def test_a_request_the_parser_refuses_gets_the_error_envelope():
    """uvicorn answered a request httptools cannot parse with plain text ("Invalid HTTP request received.")."""
    smuggled = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n"
    )
    with cli_server(1) as port:
        for request in (smuggled, b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(request)
                answer = b"".join(iter(lambda: sock.recv(65536), b""))
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head, answer
            assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_the_head_bounds_cost_no_memory_per_connection():
    """The bounded protocol's state lives in slots: as instance attributes, four more than uvicorn's own turned each
    connection's key-sharing `__dict__` (288 bytes) into a 1,584-byte dict of its own."""
    import asyncio
    import sys

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from haystream.server.protocol import BoundedHeadProtocol

    config = uvicorn.Config(app=send_json)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        made = [
            cls(config=config, server_state=ServerState(), app_state={}, _loop=loop)
            for cls in (HttpToolsProtocol, BoundedHeadProtocol)
        ]
    finally:
        loop.close()
    stock, bounded = made
    assert bounded.__dict__.keys() == stock.__dict__.keys()
    assert sys.getsizeof(bounded.__dict__) == sys.getsizeof(stock.__dict__)


def test_a_body_still_arriving_after_its_refusal_is_cut():
    """A request refused before its body was read whole (no key: 401; past the size or time limit: 413, 408) has its
    answer, but its body may go on arriving: uvicorn drops it, and each byte stopped its keep-alive timer. A client
    sending a byte a second of an endless chunked body held the connection for good, past the head and body
    timeouts, without a key. Now the rest of the body has `HAYSTREAM_BODY_TIMEOUT_SECONDS` from the answer."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n%s\r\n"
    with cli_server(1, HAYSTREAM_BODY_TIMEOUT_SECONDS="1", HAYSTREAM_MAX_BODY_BYTES="1024") as port:
        for auth, status in ((b"", b"401"), (b"Authorization: Bearer %s\r\n" % KEY.encode(), b"413")):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(head % auth + b"800\r\n" + b"x" * 2048 + b"\r\n")
                answer = b""
                for _ in range(100):  # a chunk every 0.1 s for up to 10 s: ten body timeouts
                    if select.select([sock], [], [], 0.1)[0]:
                        received = sock.recv(65536)
                        if not received:
                            break  # closed
                        answer += received
                    with contextlib.suppress(OSError):  # the close may reset a send in flight
                        sock.sendall(b"1\r\nx\r\n")
                else:
                    pytest.fail(f"the connection was still open after 10 s: {answer[:100]!r}")
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        # A body that ends in time leaves the connection serving the next request.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(2):
                assert_envelope(client.post("/v1/chat/completions", content=b"x" * 32), 401)
            assert client.get("/health").status_code == 200


def test_a_malformed_websocket_upgrade_gets_the_error_envelope_at_once():
    """uvicorn hands a request with `Upgrade: websocket` to its WebSocket protocol before any app (or key) sees it: a
    POST was never answered and its connection held for good, past the head timeout, without a key; a bad key or
    version got a plain-text 400 from the WebSocket library. Now each gets the envelope, and the connection is
    closed; a well-formed handshake still reaches the gate (403 without a key)."""
    upgrade = (
        b"%s /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: %s\r\n\r\n"
    )
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    with cli_server(1, HAYSTREAM_HEAD_TIMEOUT_SECONDS="60") as port:

        def answer(request: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(request)
                return b"".join(iter(lambda: sock.recv(65536), b""))  # to the close

        for method, sent_key, version, status in (
            (b"POST", key, b"13", b"400"),
            (b"GET", b"abc", b"13", b"400"),
            (b"GET", key, b"8", b"426"),
        ):
            answered = answer(upgrade % (method, sent_key, version))
            assert answered.startswith(b"HTTP/1.1 " + status), answered[:200]
            assert b"application/json" in answered and b'"error"' in answered, answered
        assert b"sec-websocket-version: 13" in answer(upgrade % (b"GET", key, b"8")).lower()
        assert answer(upgrade % (b"GET", key, b"13")).startswith(b"HTTP/1.1 403")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_request_head_that_never_completes_is_cut_without_a_key(workers):
    """uvicorn times out idle keep-alive connections only, and any byte stops that timer: a connection that sent
    nothing, or its head a byte at a time, stayed open for good (slowloris). Now the head has
    `HAYSTREAM_HEAD_TIMEOUT_SECONDS` from the connection (or from its first byte on a reused one): 408, or a plain
    close when nothing was sent."""
    with cli_server(workers, HAYSTREAM_HEAD_TIMEOUT_SECONDS="1") as port:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
            assert silent.recv(65536) == b""  # closed, nothing said
        with socket.create_connection(("127.0.0.1", port), timeout=30) as trickle:
            trickle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            answer = b""
            # A byte every 0.3 s: each byte used to keep the connection open. Not 0.25 s: a byte sent in step with the
            # 1 s deadline reaches a socket the server just closed, and the reset it draws discards the 408.
            for _ in range(100):
                if select.select([trickle], [], [], 0.3)[0]:
                    answer = b"".join(iter(lambda: trickle.recv(65536), b""))
                    break
                trickle.sendall(b"s")
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b'"error"' in answer
        # A request whose head is on time is not cut by the head's deadline, however long its body then takes (the
        # body has HAYSTREAM_BODY_TIMEOUT_SECONDS), and its connection serves the next request.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow_body:
            body = b'{"model": "nope", "messages": []}'
            slow_body.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (KEY.encode(), len(body))
            )
            for byte in body:  # over 3 s, three head timeouts
                assert not select.select([slow_body], [], [], 0.1)[0]  # nothing said (a 408 would be)
                slow_body.sendall(bytes([byte]))
            reader = slow_body.makefile("rb")
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 4") and not status.startswith(b"HTTP/1.1 408"), status
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/health").status_code == 200
            assert client.get("/health").status_code == 200  # the same connection, reused
