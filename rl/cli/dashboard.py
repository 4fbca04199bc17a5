"""`codeworld dashboard`: serve the dashboard over a runs directory, for runs training or finished."""

from pathlib import Path

import typer

from rl.api.server import DEFAULT_PORT


def dashboard(
    runs_dir: Path = typer.Argument(Path("runs"), help="Directory holding run directories (or one run)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port to listen on (a free one when taken)."),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on; other than loopback "
        "requires a token ($CODEWORLD_DASHBOARD_TOKEN, else a random one is printed).",
    ),
) -> None:
    """Watch runs in a browser: curves, evaluation, sandbox health and a sample browser."""
    from rl.api.server import DashboardServer

    if not runs_dir.is_dir():
        typer.echo(f"codeworld: runs directory {str(runs_dir)!r} does not exist.", err=True)
        raise typer.Exit(2)
    try:
        server = DashboardServer(runs_dir, host, port, token=None)
    except OSError as err:
        typer.echo(f"codeworld: cannot listen on {host}:{port}: {err.strerror or err}.", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"codeworld dashboard over {runs_dir.resolve()}: {server.url()}  (Ctrl-C stops it)", err=True)
    server.serve()


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard)
