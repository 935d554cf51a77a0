"""The `haystream` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="haystream", help="Serve Haystack pipelines as streaming OpenAI-compatible endpoints.", no_args_is_help=True
)


@app.callback()
def _root() -> None:
    """Serve Haystack pipelines as streaming OpenAI-compatible endpoints."""


@app.command()
def serve(
    pipelines_dir: Annotated[
        Path | None,
        typer.Option(
            "--pipelines-dir",
            "-d",
            help="Wrappers folder (env HAYSTREAM_PIPELINES_DIR, default pipeline_wrappers).",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Interface to listen on (env HAYSTREAM_HOST, default 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (env HAYSTREAM_PORT, default 1416).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (env HAYSTREAM_WORKERS, default 1).")] = None,
) -> None:
    """Run the server: hayhooks' app with haystream's OpenAI routes in front."""
    import os

    import uvicorn

    from haystream.server.settings import ServerSettings

    overrides = {
        key: value
        for key, value in {
            "pipelines_dir": str(pipelines_dir) if pipelines_dir else None,
            "host": host,
            "port": port,
            "workers": workers,
        }.items()
        if value is not None
    }
    settings = ServerSettings(**overrides)
    # Worker processes build their own app from the environment: hand the resolved settings down that way.
    for key, value in settings.model_dump().items():
        os.environ[f"HAYSTREAM_{key.upper()}"] = str(value)
    uvicorn.run(
        "haystream.server.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )


def main() -> None:
    """Entry point of the `haystream` script."""
    app()


if __name__ == "__main__":
    main()
