"""The `haystream` command line: serve, chat, models, deploy, undeploy, new."""

from __future__ import annotations

import math
import os
import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    name="haystream",
    help="Serve Haystack pipelines as streaming OpenAI-compatible endpoints.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console(highlight=False)
# Errors stay one line each, whatever the terminal width: easy to read in logs and to grep.
err = Console(stderr=True, highlight=False, soft_wrap=True)

DEFAULT_URL = "http://127.0.0.1:1416"
UrlOption = Annotated[str, typer.Option("--url", envvar="HAYSTREAM_URL", help="Server URL.")]
KeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="HAYSTREAM_API_KEY", help="API key, if the server needs one.")
]
TEMPLATES = Path(__file__).parent / "templates"


def _version(value: bool) -> None:
    if value:
        from haystream import __version__

        out.print(f"haystream {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Serve Haystack pipelines as streaming OpenAI-compatible endpoints."""


@app.command()
def serve(
    pipelines_dir: Annotated[
        Path | None, typer.Option("--pipelines-dir", "-d", help="Wrappers folder (env HAYSTREAM_PIPELINES_DIR).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface (env HAYSTREAM_HOST, default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (env HAYSTREAM_PORT, default 1416).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes, 1024 at most (env HAYSTREAM_WORKERS, default 1).")
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help="critical, error, warning, info, debug or trace (env HAYSTREAM_LOG_LEVEL, default info)."),
    ] = None,
) -> None:
    """Run the server: hayhooks' app with haystream's OpenAI routes in front."""
    import uvicorn
    from pydantic import ValidationError

    from haystream.settings import LocalModelSettings, ServerSettings, StreamingSettings, describe

    overrides: dict[str, Any] = {
        "pipelines_dir": str(pipelines_dir) if pipelines_dir else None,
        "host": host,
        "port": port,
        "workers": workers,
        "log_level": log_level,
    }
    flags = {key: f"--{key.replace('_', '-')}" for key, value in overrides.items() if value is not None}
    try:
        settings = ServerSettings(**{key: value for key, value in overrides.items() if value is not None})
        # The other layers read theirs lazily, at the first request that needs them: check them now, not then.
        StreamingSettings()
        local_model = LocalModelSettings().local_model
    except ValidationError as error:
        _refuse(describe(error, flags))
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir and not Path(metrics_dir).is_dir():  # prometheus_client would fail in every worker's start-up
        _refuse(
            f"PROMETHEUS_MULTIPROC_DIR={metrics_dir!r}: not a directory; create it, or unset it (with --workers above "
            "1 a temporary one is made)"
        )
    if local_model and not Path(local_model).expanduser().is_file():
        _refuse(
            f"HAYSTREAM_LOCAL_MODEL={local_model!r}: not a file; give a GGUF file's path, or unset it (bundled model)"
        )
    _check_can_serve(settings.pipelines_dir, settings.host, settings.port)
    from haystream.server.logs import write_output_in_background

    # Before uvicorn and hayhooks configure their loggers: they take whatever sys.stderr is then.
    write_output_in_background()
    # Worker processes build their own app from the environment, which already holds every other setting: only the
    # command-line flags are handed down that way.
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"HAYSTREAM_{key.upper()}"] = str(value)
    os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
    options: dict[str, Any] = {
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        # haystream's access log replaces uvicorn's (whose logger the app disables): off here, uvicorn does not even
        # build the line's arguments (a URL quoting per request).
        "access_log": False,
        # A backstop only: the drain ends running streams itself at drain_timeout after the signal. uvicorn counts
        # from when it stops listening, at the end of the grace: 5 s after the drain's own end, not grace + 5 s.
        "timeout_graceful_shutdown": math.ceil(max(settings.drain_timeout - settings.drain_grace_seconds, 0)) + 5,
        "http": _http_protocol(settings.head_timeout_seconds, settings.body_timeout_seconds),
    }
    config = uvicorn.Config("haystream.server.app:create_app", **options)
    if settings.workers > 1:
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # workers share their metrics through files here
            import tempfile

            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="haystream-metrics-")
        from haystream.server.workers import run_workers

        code = run_workers(
            config,
            settings.workers,
            grace_seconds=settings.drain_grace_seconds,
            timeout_seconds=settings.drain_timeout,
            worker_timeout=settings.worker_timeout,
        )
        if code:
            raise typer.Exit(code)
        return
    from haystream.server.drain import DrainingServer

    server = DrainingServer(config, grace_seconds=settings.drain_grace_seconds, timeout_seconds=settings.drain_timeout)
    server.run()
    if not server.started:
        raise typer.Exit(3)  # uvicorn's own code for a failed startup


@app.command()
def chat(
    model: Annotated[str | None, typer.Argument(help="Model (wrapper) name; the only one if omitted.")] = None,
    prompt: Annotated[str | None, typer.Argument(help="One prompt; without it, an interactive session.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Stream an answer to the terminal as it arrives (reasoning dimmed, tool activity as status lines)."""
    with _client(url, api_key) as client:
        model = model or _only_model(client)
        if prompt is not None:
            _stream_answer(client, model, [{"role": "user", "content": prompt}])
            return
        err.print(f"[dim]Chatting with {model} at {url}. Ctrl-C stops an answer; empty line or Ctrl-D quits.[/dim]")
        history: list[dict[str, str]] = []
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if not line:
                break
            history.append({"role": "user", "content": line})
            answer = _stream_answer(client, model, history, conversation=True)
            if answer is None:
                history.pop()  # the turn failed: the next prompt goes on from before it
            else:
                history.append({"role": "assistant", "content": answer})


@app.command()
def models(url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
    """List the models (chat wrappers) a server offers."""
    with _client(url, api_key) as client:
        table = Table("id", "name", box=None)
        for entry in _model_list(client):
            table.add_row(entry["id"], str(entry.get("name") or entry["id"]))
        out.print(table)


@app.command()
def deploy(
    directory: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Folder with pipeline_wrapper.py.")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Pipeline name (default: the folder's).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a pipeline of the same name.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Deploy a wrapper folder (like `hayhooks pipeline deploy-files`; needs HAYSTREAM_ENABLE_DEPLOY on the server)."""
    from haystream._compat import read_pipeline_files

    files = read_pipeline_files(directory)
    if not files:
        _fail(f"No pipeline files found in {directory}.")
    name = name or directory.resolve().name
    payload = {"name": name, "files": files, "overwrite": overwrite, "save_files": True}
    with _client(url, api_key) as client:
        _confirmed(_check(client.post("/deploy_files", json=payload), what=f"deploy {name}"), name, "deployment")
    out.print(f"Deployed [bold]{name}[/bold].")


@app.command()
def undeploy(name: str, url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
    """Remove a deployed pipeline."""
    with _client(url, api_key) as client:
        _confirmed(_check(client.post(f"/undeploy/{name}"), what=f"undeploy {name}"), name, "removal")
    out.print(f"Undeployed [bold]{name}[/bold].")


@app.command()
def new(
    name: Annotated[str, typer.Argument(help="Wrapper name: letters, digits, '_' and '-'.")],
    directory: Annotated[Path, typer.Option("--dir", help="Where wrappers live.")] = Path("pipeline_wrappers"),
) -> None:
    """Scaffold DIR/NAME/pipeline_wrapper.py (an async wrapper using haystream.astream) and a test for it."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", name):
        _fail(f"Invalid name {name!r}: use letters, digits, '_' and '-'.")
    target = directory / name
    if target.exists():
        _fail(f"{target} already exists; choose another name or remove it.")
    try:
        target.mkdir(parents=True)
    except OSError as error:  # --dir is a file, or a folder this user may not write to
        _fail(f"Cannot create {target}: {error.strerror or error}.")
    # The test's file name is the wrapper's: pytest imports test files by base name, so two scaffolds' tests named
    # alike could not be collected in one run ("import file mismatch").
    test_file = f"test_{name.replace('-', '_')}.py"
    for template, file_name in (
        ("pipeline_wrapper.py", "pipeline_wrapper.py"),
        ("test_pipeline_wrapper.py", test_file),
    ):
        text = string.Template((TEMPLATES / f"{template}.tmpl").read_text()).substitute(name=name, test_file=test_file)
        (target / file_name).write_text(text)
    out.print(
        f"Created {target}/pipeline_wrapper.py and its test, {test_file}. Serve it with: haystream serve -d {directory}"
    )


def main() -> None:
    """Entry point of the `haystream` script."""
    try:
        code = app(standalone_mode=False)
    except _command_line_errors() as error:
        message = error.format_message()  # type: ignore[attr-defined]
        if type(error).__name__ == "NoArgsIsHelpError":  # the help (printed already when rich renders it)
            if message:
                out.print(message, markup=False)
        else:
            # A wrong flag, value or command: one line like every other refusal, not typer's framed box.
            ctx = getattr(error, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            err.print(f"[red]error:[/red] {escape(message)}{hint}")
        raise SystemExit(getattr(error, "exit_code", 2)) from None
    except typer.Abort:
        err.print("[red]error:[/red] aborted")
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def _command_line_errors() -> tuple[type[Exception], ...]:
    # typer >= 0.22 carries its own copy of click (its errors derive from `typer.TyperException`); older ones use
    # click's.
    kinds: list[type[Exception]] = []
    own = getattr(typer, "TyperException", None)
    if own is not None:
        kinds.append(own)
    try:
        import click
    except ImportError:
        pass
    else:
        kinds.append(click.ClickException)
    return tuple(kinds)


# --- client helpers -------------------------------------------------------------------------------------------


class _client:
    """An httpx client with friendly one-line errors for the usual failures."""

    def __init__(self, url: str, api_key: str | None) -> None:
        import httpx

        self.url = url.rstrip("/")
        if not re.match(r"https?://[^/?#]", self.url, re.IGNORECASE):
            # httpx would call it a lost connection (UnsupportedProtocol).
            example = f"http://{self.url}" if "://" not in self.url else DEFAULT_URL
            _fail(f"--url (HAYSTREAM_URL) {url!r} is not an http:// or https:// URL: write e.g. --url {example}.")
        try:
            parsed = httpx.URL(self.url)
            port = parsed.port
        except httpx.InvalidURL as error:
            _fail(f"--url (HAYSTREAM_URL) {url!r} is not a valid URL ({error}): write e.g. --url {DEFAULT_URL}.")
        if port is not None and not 0 < port < 65536:
            _fail(f"--url (HAYSTREAM_URL) {url!r}: the port should be 1-65535.")
        root = re.sub(r"(/openwebui)?/v1$", "", self.url)
        if root != self.url:  # an OpenAI base URL: the routes below would be /v1/v1/...
            _fail(f"--url (HAYSTREAM_URL) {url!r}: give the server's root, without /v1: --url {root}.")
        if api_key and not (api_key.isascii() and api_key.isprintable()):
            # httpx would raise UnicodeEncodeError (or refuse a line break) from deep in the request.
            _fail("--api-key (HAYSTREAM_API_KEY) holds a character an HTTP header cannot carry (non-ASCII or control).")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=parsed, headers=headers, timeout=httpx.Timeout(10, read=300))

    def __enter__(self) -> Any:
        return self.http

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        import httpx

        self.http.close()
        if isinstance(exc, httpx.ConnectError):
            _fail(f"Cannot reach haystream at {self.url}: is `haystream serve` running?")
        if isinstance(exc, httpx.TimeoutException):
            _fail(f"haystream at {self.url} did not answer in time.")
        if isinstance(exc, httpx.TransportError):
            _fail(f"The connection to haystream at {self.url} was lost ({type(exc).__name__}): did the server stop?")


def _http_protocol(head_timeout: float, body_timeout: float) -> Any:
    """uvicorn's httptools protocol with bounds on request heads and unread bodies (see haystream.server.protocol); a
    partial of a module-level class, so that it reaches spawned workers."""
    from functools import partial

    from haystream.server.protocol import BoundedHeadProtocol

    return partial(BoundedHeadProtocol, head_timeout=head_timeout, body_timeout=body_timeout)


def _check_can_serve(pipelines_dir: str, host: str, port: int) -> None:
    """Fail before loading any wrapper when the server could not start or would serve nothing."""
    import socket

    folder = Path(pipelines_dir)
    if folder.exists() and not folder.is_dir():
        _fail(f"The wrappers folder {pipelines_dir!r} is a file, not a folder: pass the folder that holds them.")
    if not folder.is_dir():
        _fail(
            f"No wrappers folder {pipelines_dir!r} here. Run in a project that has one, pass --pipelines-dir, "
            "or create a wrapper with `haystream new NAME`."
        )
    try:
        wrappers = [path for path in folder.iterdir() if path.is_dir() and not path.name.startswith((".", "_"))]
    except OSError as error:
        _fail(f"Cannot read the wrappers folder {pipelines_dir!r} ({error.strerror or error}).")
    if not wrappers:
        err.print(f"[yellow]warning:[/yellow] {pipelines_dir!r} holds no wrapper yet: no models will be served.")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror as error:
            _fail(
                f"Cannot listen on --host {host!r}: the name does not resolve ({error.strerror}); use an address of "
                "this machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)."
            )
        except OSError as error:
            _fail(f"Cannot listen on {host}:{port} ({error.strerror}): {_bind_hint(error.errno, port)}.")


def _bind_hint(code: int | None, port: int) -> str:
    """What to do about a bind that failed with `code` (an errno)."""
    import errno

    if code == errno.EADDRINUSE:
        return "another server is listening there: stop it, or choose another --port"
    if code == errno.EACCES and port < 1024:
        return "ports below 1024 need privileges: choose a --port above 1023"
    if code == errno.EACCES:
        return "this user may not listen there (a security policy?): choose another --port"
    if code == errno.EADDRNOTAVAIL:
        return "the address is not one of this machine's: check --host (0.0.0.0: every interface)"
    return "check --host and --port"


def _refuse(problems: str) -> NoReturn:
    """Refuse to start the server: a setting or flag is wrong (exit code 2, like a usage error)."""
    err.print(f"[red]error:[/red] refusing to start: {problems}")
    raise typer.Exit(2)


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def _check(response: Any, *, what: str) -> Any:
    if response.status_code < 400:
        return response
    message = _error_message(response)
    if response.status_code == 401:
        _fail(f"The server refused the API key (401): pass --api-key or set HAYSTREAM_API_KEY. ({message})")
    _fail(f"Could not {what}: {message} (HTTP {response.status_code})")


def _error_message(response: Any) -> str:
    """The message of an OpenAI-style (or hayhooks/FastAPI) error body; else the body itself."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        message = str(error["message"])
    elif isinstance(body, dict) and (error or body.get("detail")):
        message = str(error or body["detail"])
    else:  # not an error body we know (an HTML page from a proxy?): its start, on one line
        message = " ".join(str(response.text).split())[:200] or "(empty body)"
    return message


def _confirmed(response: Any, name: str, what: str) -> None:
    """Fail unless `response` is hayhooks' record of the deployment or removal of `name` (`success` and `name`):
    any other server answering 200 (a proxy's page, another API) would otherwise read as done."""
    try:
        record = response.json()
        if record["success"] is True and record["name"] == name:
            return
    except (ValueError, KeyError, TypeError):
        pass
    _fail(f"{response.url} did not answer like haystream (no {what} of {name!r}): check --url.")


def _model_list(client: Any) -> list[dict[str, Any]]:
    response = _check(client.get("/v1/models"), what="list models")
    try:
        return [entry for entry in response.json()["data"] if isinstance(entry.get("id"), str)]
    except (ValueError, KeyError, TypeError, AttributeError):
        _fail(f"{response.url} did not answer like haystream (no model list): check --url.")


def _only_model(client: Any) -> str:
    names = [entry["id"] for entry in _model_list(client)]
    if len(names) == 1:
        return names[0]
    _fail(f"Name a model: {', '.join(names) or '(none deployed)'}.")


class _AnswerFailed(Exception):
    """One answer failed (an error event, a stream cut short, an HTTP error): a conversation goes on, a one-prompt
    chat exits 1."""


def _stream_answer(
    client: Any, model: str, messages: list[dict[str, str]], *, conversation: bool = False
) -> str | None:
    """Print one streamed answer and return its text; Ctrl-C stops it (the server cancels the run) and, in a
    conversation, keeps what was said so far. A failed answer is None in a conversation (its error printed)."""
    answer: list[str] = []
    try:
        _print_answer(client, model, messages, answer)
    except KeyboardInterrupt:
        err.print("\n[dim](answer stopped)[/dim]")
        if not conversation:
            raise typer.Exit(130) from None
    except _AnswerFailed as failure:
        if not conversation:
            _fail(str(failure))
        err.print(f"[red]error:[/red] {failure}")
        return None
    return "".join(answer)


def _print_answer(client: Any, model: str, messages: list[dict[str, str]], answer: list[str]) -> None:
    body = {"model": model, "messages": messages, "stream": True}
    at_line_start = True
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-Haystream-Events": "true"}) as response:
        if response.status_code >= 400:
            response.read()
            if response.status_code == 404:
                names = ", ".join(entry["id"] for entry in _model_list(client))
                _fail(f"Unknown model {model!r}; available: {names or '(none deployed)'}.")
            if response.status_code == 401:
                _check(response, what="chat")
            raise _AnswerFailed(f"Could not chat: {_error_message(response)} (HTTP {response.status_code})")
        content_type = response.headers.get("content-type", "(no type)").partition(";")[0].strip()
        if content_type != "text/event-stream":
            _fail(f"{response.url} answered {content_type}, not an event stream: is --url a haystream server?")
        try:
            for kind, text in _sse_items(_lines_or_cut(response)):
                if kind == "done":
                    break
                if kind == "status":
                    if not at_line_start:
                        out.print()
                    out.print(f"[dim]• {text}[/dim]")
                    at_line_start = True
                    continue
                if kind == "error":
                    raise _AnswerFailed(text)
                if kind == "length":
                    if not at_line_start:
                        out.print()
                    err.print("[dim](cut off: the answer reached its token limit)[/dim]")
                    at_line_start = True
                    continue
                out.print(text, end="", style="dim" if kind == "reasoning" else None, soft_wrap=True, markup=False)
                at_line_start = text.endswith("\n")
                if kind == "content":
                    answer.append(text)
            else:  # the server closed the stream without its end marker: what was printed is not the whole answer
                raise _AnswerFailed(
                    "The answer was cut: the stream ended without [DONE] (did the server stop, or a proxy time out?)."
                )
        except _AnswerFailed:
            if not at_line_start:
                out.print()
            raise
    if not at_line_start:
        out.print()


def _lines_or_cut(response: Any) -> Iterator[str]:
    """The response's lines; a connection that breaks mid-answer (a reset, a body cut short, a read timeout) fails
    this answer, not the session."""
    import httpx

    try:
        yield from response.iter_lines()
    except httpx.TransportError as error:
        raise _AnswerFailed(
            f"The answer was cut: the connection to haystream was lost ({type(error).__name__}): did the server stop?"
        ) from None


def _sse_items(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(kind, text) pairs from a chat-completions SSE stream: content, reasoning, status, error, length (a cut), and
    done at `[DONE]`."""
    import orjson

    for line in lines:
        if line == "data: [DONE]":
            yield "done", ""
            return
        if not line.startswith("data: "):
            continue
        try:
            items = list(_payload_items(orjson.loads(line[6:])))
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            yield "error", f"The server sent an event haystream does not know ({line[:80]!r}): is --url haystream?"
            return
        yield from items


def _payload_items(payload: Any) -> Iterator[tuple[str, str]]:
    """The (kind, text) pairs of one event; AttributeError or TypeError when it is not shaped like haystream's."""
    if "error" in payload:
        error = payload["error"]
        yield "error", str(error.get("message", error) if isinstance(error, dict) else error)
    elif "event" in payload:
        event = payload["event"]
        if event.get("type") == "status" and not (event.get("data") or {}).get("hidden"):
            yield "status", str((event.get("data") or {}).get("description", ""))
    else:
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                yield "reasoning", str(delta["reasoning_content"])
            if delta.get("content"):
                yield "content", str(delta["content"])
            if choice.get("finish_reason") == "length":
                yield "length", ""


if __name__ == "__main__":
    main()
