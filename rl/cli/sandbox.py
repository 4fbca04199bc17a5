"""`codeworld sandbox ...` commands."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="sandbox commands.")

DEFAULT_IMAGE = "codeworld-sandbox:py311"


@app.command("build-image")
def build_image(
    tag: str = typer.Option(DEFAULT_IMAGE, "--tag", help="Image name:tag to build."),
    if_missing: bool = typer.Option(False, "--if-missing", help="Do nothing if the image already exists."),
    suite: str = typer.Option("bookworm", help="Debian suite to bootstrap."),
    mirror: Optional[str] = typer.Option(None, help="Debian mirror URL (default: debootstrap's)."),
) -> None:
    """Build the sandbox image offline: debootstrap (Python 3.11 + pytest) and docker import."""
    from workers.sandbox.image import build_image as build, image_exists

    if if_missing and image_exists(tag):
        typer.echo(f"codeworld: sandbox image {tag} is present.")
        return
    try:
        build(tag, suite=suite, mirror=mirror, echo=typer.echo)
    except (PermissionError, FileNotFoundError, RuntimeError) as exc:
        typer.echo(f"codeworld: {exc}", err=True)
        raise typer.Exit(1)


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    backend: str = typer.Option("auto", help="docker, local or auto."),
    image: str = typer.Option(DEFAULT_IMAGE, help="Sandbox image (docker backend)."),
    timeout_s: float = typer.Option(10.0, "--timeout", help="Wall-clock limit in seconds."),
    memory_mb: int = typer.Option(512, "--memory-mb", help="Memory limit in MiB."),
) -> None:
    """Run one command in a fresh sandbox, with this terminal's stdin: `codeworld sandbox run -- CMD...`."""
    from workers.sandbox import ExecRequest, SandboxPool

    if not ctx.args:
        typer.echo("codeworld: give the command to run after `--`.", err=True)
        raise typer.Exit(2)
    stdin = b"" if sys.stdin.isatty() else sys.stdin.buffer.read()

    async def go():
        async with SandboxPool(backend=backend, image=image, size=1) as pool:
            return await pool.run(ExecRequest(command=ctx.args, stdin=stdin, timeout_s=timeout_s, memory_mb=memory_mb))

    result = asyncio.run(go())
    sys.stdout.buffer.write(result.stdout)
    sys.stderr.buffer.write(result.stderr)
    typer.echo(
        f"[{result.status.value} exit={result.exit_code} wall={result.wall_s:.3f}s "
        f"isolation={result.isolation.value if result.isolation else None}] {result.error}",
        err=True,
    )
    raise typer.Exit(0 if result.status.value == "ok" else 1)


@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8765, help="Port to listen on."),
    backend: str = typer.Option("docker", help="docker, local or auto."),
    image: str = typer.Option(DEFAULT_IMAGE, help="Sandbox image (docker backend)."),
    size: int = typer.Option(4, help="Warm sandboxes in the pool."),
    token_file: Optional[Path] = typer.Option(
        None, help="File holding the bearer token (default: $CODEWORLD_SANDBOX_TOKEN)."
    ),
) -> None:
    """Serve a sandbox pool over HTTP (bearer token required) for callers outside Ray."""
    import uvicorn

    from workers.sandbox.server import ServerConfig, create_app

    token = token_file.read_text().strip() if token_file else os.environ.get("CODEWORLD_SANDBOX_TOKEN", "")
    if not token:
        typer.echo(
            "codeworld: set CODEWORLD_SANDBOX_TOKEN or pass --token-file; the service never runs open.", err=True
        )
        raise typer.Exit(2)
    config = ServerConfig(backend=backend, image=image, size=size, token=token)
    uvicorn.run(create_app(config), host=host, port=port, log_level="info")
