"""Serving the dashboard with uvicorn: in the foreground (`codeworld dashboard`) or on a background
thread of a training run (`codeworld train`)."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import threading
from pathlib import Path
from urllib.parse import urlencode

DEFAULT_PORT = 8700
"""The port `codeworld dashboard` listens on unless told otherwise."""
TOKEN_ENV = "CODEWORLD_DASHBOARD_TOKEN"
"""Environment variable holding the token (for listening on an address other than loopback)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> str | None:
    """The token to require: the one given, else $CODEWORLD_DASHBOARD_TOKEN, else a fresh random one
    when `host` is not loopback (listening there without a token is never allowed); None on loopback
    without one."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    return token


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `port`, or on a free port when it is taken."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    for candidate in dict.fromkeys((port, 0)):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), candidate))
        except OSError:
            sock.close()
            if candidate == 0:
                raise
            continue
        sock.listen(128)
        return sock
    raise AssertionError("unreachable: binding port 0 either works or raises")


def page_url(host: str, port: int, run: str | None, token: str | None) -> str:
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    params = urlencode([(k, v) for k, v in (("run", run), ("token", token)) if v])
    return f"http://{shown}:{port}/" + (f"?{params}" if params else "")


class DashboardServer:
    """uvicorn serving the dashboard app on an already bound socket."""

    def __init__(self, runs_dir: Path, host: str, port: int, token: str | None) -> None:
        import uvicorn

        from rl.api.app import create_app

        self.host, self.token = host, resolve_token(host, token)
        self.socket = bind(host, port)
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(
            create_app(runs_dir, self.token), log_level="warning", access_log=False, timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def url(self, run: str | None = None) -> str:
        return page_url(self.host, self.port, run, self.token)

    def serve(self) -> None:
        """Serve in this thread until interrupted."""
        self.server.run(sockets=[self.socket])

    def start(self) -> None:
        """Serve on a daemon thread (uvicorn installs no signal handlers off the main thread)."""
        self._thread = threading.Thread(target=self.serve, name="codeworld-dashboard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.socket.close()


def run_location(run_dir: Path) -> tuple[Path, str]:
    """The runs directory a run's dashboard serves (its parent, so sibling runs can be compared) and
    the run's id there."""
    resolved = run_dir.resolve()
    shown = run_dir.parent if run_dir.name else resolved.parent
    return shown, resolved.name


def start_for_run(run_dir: Path, host: str, port: int) -> DashboardServer:
    """The dashboard of a training run, serving on a background thread."""
    root, _ = run_location(run_dir)
    server = DashboardServer(root, host, port, token=None)
    server.start()
    return server


def watch_command(run_dir: Path, host: str, port: int) -> str:
    """How to open a run's dashboard after the run: the command and the page's URL."""
    root, run_id = run_location(run_dir)
    port = port or DEFAULT_PORT  # the run took any free port; the command takes the usual one
    options = "" if host == "127.0.0.1" else f" --host {host}"
    options += "" if port == DEFAULT_PORT else f" --port {port}"
    return f"codeworld dashboard {root}{options}  →  {page_url(host, port, run_id, None)}"
