"""A private `redis-server` for one codeworld process, used when `bus.redis_url` is unset.

The server is a child process in its own process group, so Ctrl-C in the terminal reaches the
orchestrator first and the orchestrator shuts the bus down in order. It is stopped at `close()`, at
interpreter exit (atexit) and, because Ray/vLLM shutdown paths and SIGKILL skip atexit, by the
kernel when its parent dies (`PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from rl.config import ConfigError

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before fork: preexec_fn must not load libraries
_T = TypeVar("_T")

_spawner_lock = threading.Lock()
_spawner_queue: queue.SimpleQueue | None = None


def _spawner_loop(jobs: queue.SimpleQueue) -> None:
    while True:
        fn, fut = jobs.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller's thread, which re-raises it
                fut.set_exception(exc)


def _on_spawner_thread(fn: Callable[[], _T]) -> _T:
    """Run `fn` on a daemon thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process: a server
    forked from a short-lived thread (asyncio.to_thread, a Ray method thread) would be killed as
    soon as that thread ends. Forking from a thread that never ends ties it to the process.
    """
    global _spawner_queue
    with _spawner_lock:
        if _spawner_queue is None:
            _spawner_queue = queue.SimpleQueue()
            threading.Thread(
                target=_spawner_loop, args=(_spawner_queue,), name="codeworld-spawner", daemon=True
            ).start()
        jobs = _spawner_queue
    fut: Future[_T] = Future()
    jobs.put((fn, fut))
    return fut.result()


def _forget_spawner_after_fork() -> None:
    # A forked child inherits the queue but not the thread that serves it.
    global _spawner_queue
    _spawner_queue = None


os.register_at_fork(after_in_child=_forget_spawner_after_fork)


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        if _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A `redis-server` on a free loopback port, owned by this process.

    Usable as a context manager; `url` is the address to hand to `TrajectoryBus`.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        dir: Path | None = None,
        binary: str = "redis-server",
        start_timeout_s: float = 10.0,
        password: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """Start the server and wait until it answers PING.

        appendonly: write an append-only file so a restarted server on the same `dir` has the data
            back. Redis writes a command to the file before it replies, so a killed server loses
            nothing it acknowledged; the fsync every second only matters if the machine dies.
        dir: working directory (AOF, log); kept at close. None: a temp dir removed at close.
        binary: the redis-server executable (name on PATH or a path).
        start_timeout_s: how long to wait for the first PING answer.
        password: require this password (`requirepass`); `url` carries it.
        tls: (certificate, key) files: serve TLS only (`url` is rediss://, trusting that
            certificate as its CA: a self-signed one for tests).
        """
        self.password, self.tls = password, tls
        exe = shutil.which(binary)
        if exe is None:
            raise RuntimeError(
                f"redis-server not found: install the redis-server package (looked for {binary!r} on PATH)"
            )
        self._owns_dir = dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="codeworld-redis-")) if dir is None else Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen | None = None
        self._exe, self._appendonly, self._timeout_s = exe, appendonly, start_timeout_s
        self.restarts = 0
        """Times `restart` brought the server back."""
        atexit.register(self.close)
        try:
            self._start(exe, appendonly, start_timeout_s)
        except BaseException:
            self.close()
            raise

    def restart(self) -> None:
        """Start the server again on the same port and directory (with `appendonly`, its data
        come back from the append-only file) after it died; a live server is stopped first."""
        if self._proc is not None:
            _stop_group(self._proc)
        self._start(self._exe, self._appendonly, self._timeout_s, port=self.port)
        self.restarts += 1

    def alive(self) -> bool:
        """Whether the server process still runs."""
        return self._proc is not None and self._proc.poll() is None

    def _start(self, exe: str, appendonly: bool, timeout_s: float, port: int | None = None) -> None:
        # Another process may take the free port between our probe and redis' bind: retry then.
        for _ in range(5):
            self.port = port or _free_port()
            argv = [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if appendonly else "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.dir),
            ]
            if self.password is not None:
                argv += ["--requirepass", self.password]
            if self.tls is not None:
                cert, key = self.tls
                argv += [
                    "--port",
                    "0",
                    "--tls-port",
                    str(self.port),
                    "--tls-cert-file",
                    str(cert),
                    "--tls-key-file",
                    str(key),
                    "--tls-ca-cert-file",
                    str(cert),
                    "--tls-auth-clients",
                    "no",
                ]
            with open(self.dir / "redis.log", "ab") as log:
                self._proc = _on_spawner_thread(
                    lambda: subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=_die_with_parent(os.getpid()),
                    )
                )
            if self._wait_ready(timeout_s):
                return
            if "Address already in use" not in self._log_tail():
                break
        raise RuntimeError(
            f"redis-server did not start (exit code {self._proc.poll()}); "
            f"log {self.dir / 'redis.log'}:\n{self._log_tail()}"
        )

    def _wait_ready(self, timeout_s: float) -> bool:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and self._proc.poll() is None:
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def url(self) -> str:
        """URL of the server (rediss:// with TLS), with its password when it has one."""
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"

    @property
    def pid(self) -> int | None:
        """Process id of the server while it runs."""
        return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 5 s) and remove its temp dir. Idempotent."""
        atexit.unregister(self.close)
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_group(proc)
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrivateRedis(url={self.url!r}, pid={self.pid})"


def _stop_group(proc: subprocess.Popen) -> None:
    # The whole group: redis forks children for background saves and AOF rewrites. Once the server
    # is reaped its pid (= group id) may be reused, so an exited server is not signalled.
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class RedisUnavailable(ConfigError, ConnectionError):
    """`bus.redis_url` cannot be used: unreachable, a password refused or missing, TLS failing."""


def redact(url: str) -> str:
    """`url` with its password (if any) replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{parts.hostname}{port}"))


def with_password(url: str, password_env: str) -> str:
    """`url`, given the password in `$password_env` when it carries none itself."""
    password = os.environ.get(password_env)
    parts = urlsplit(url)
    if parts.password is not None or not password:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def check_redis(url: str, password_env: str) -> None:
    """PING `url`; RedisUnavailable with one sentence saying what is wrong (never the password)."""
    shown, parts = redact(url), urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 6379}"
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        # RESP3 clients open with HELLO, which a server with a password answers with an
        # authentication error when none was sent (NOAUTH with RESP2).
        auth = isinstance(exc, redis.AuthenticationError) or "NOAUTH" in str(exc)
        if auth and parts.password is None:
            raise RedisUnavailable(
                f"bus.redis_url {shown}: the Redis at {where} requires a password; put "
                f"it in the URL (redis://:PASSWORD@host:port/0) or in ${password_env}."
            ) from None
        what = "refused the password" if auth else "answered PING with an error"
        raise RedisUnavailable(
            f"bus.redis_url {shown}: the Redis at {where} {what} ({' '.join(str(exc).split())})."
        ) from None
    except redis.RedisError as exc:
        tls = (
            " (TLS: is it a TLS port, and does ssl_ca_certs name the CA that signed its certificate?)"
            if parts.scheme == "rediss"
            else ""
        )
        raise RedisUnavailable(
            f"bus.redis_url {shown}: no Redis answers at {where}{tls}: {' '.join(str(exc).split())}"
        ) from None
    finally:
        client.close()


def connect_or_start(
    redis_url: str | None, aof_dir: Path | None = None, password_env: str = "CODEWORLD_REDIS_PASSWORD"
) -> tuple[str, PrivateRedis | None]:
    """The Redis to use: `redis_url` if given (with the password from `$password_env` when the URL
    has none; checked with PING), else a new `PrivateRedis` (with an append-only file in `aof_dir`
    when given, so that a restart keeps its data).

    Returns the URL to connect with and the private server, which the caller closes at shutdown
    (None when the URL was given).
    """
    if redis_url is None:
        server = PrivateRedis(appendonly=aof_dir is not None, dir=aof_dir)
        return server.url, server
    url = with_password(redis_url, password_env)
    check_redis(url, password_env)
    return url, None
