"""The HTTP sandbox service against callers that probe it: every route (documentation and unknown
paths included) answers 401 without the token, bodies over the cap get 413 whether or not they
declare their size, output and sessions are capped, and errors the caller did not cause come
back generic. A real uvicorn server over a real local sandbox pool."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator

import docker
import httpx
import pytest
import uvicorn

from workers.sandbox import ExecRequest, SandboxError, SandboxUnavailable, Status
from workers.sandbox.client import SandboxClient
from workers.sandbox.server import ServerConfig, create_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "guard-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
SMALL = {"max_body_bytes": 8192}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serve(**overrides) -> AsyncIterator[str]:
    port = _free_port()
    config = ServerConfig(**{"backend": "local", "size": 2, "token": TOKEN, **SMALL, **overrides})
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not serving.done(), serving
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


ROUTES = [
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/stats"),
    ("POST", "/v1/run"),
    ("POST", "/v1/sessions"),
    ("POST", "/v1/sessions/x/exec"),
    ("POST", "/v1/sessions/x/put"),
    ("POST", "/v1/sessions/x/get"),
    ("DELETE", "/v1/sessions/x"),
    ("GET", "/no/such/route"),
    ("PUT", "/v1/run"),
    ("OPTIONS", "/v1/run"),
    ("HEAD", "/docs"),
]
BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong-token-0123456789"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": TOKEN},
    {"X-Token": TOKEN},
    {"Authorization": f"Bearer {TOKEN},Bearer {TOKEN}"},
]


async def test_every_route_needs_the_token() -> None:
    async with serve() as url, httpx.AsyncClient(base_url=url) as http:
        for method, path in ROUTES:
            for headers in BAD_CREDENTIALS:
                response = await http.request(method, path, headers=headers, params={"token": TOKEN})
                assert response.status_code == 401, (method, path, headers, response.text)
                if method != "HEAD":
                    assert "bearer token" in response.json()["detail"]
        # With the token the documentation is there, and an unknown route is only then a 404.
        assert (await http.get("/docs", headers=AUTH)).status_code == 200
        assert (await http.get("/openapi.json", headers=AUTH)).json()["info"]["title"] == "codeworld sandbox"
        assert (await http.get("/no/such/route", headers=AUTH)).status_code == 404


def _run_body(size: int) -> bytes:
    """A valid /v1/run body of exactly `size` bytes."""
    head, tail = '{"command": ["true"], "env": {"PAD": "', '"}}'
    body = (head + "x" * (size - len(head) - len(tail)) + tail).encode()
    assert len(body) == size
    return body


async def _raw_post(url: str, chunks: list[bytes], finish: bool, length: int | None = None) -> bytes:
    """POST /v1/run over a raw socket, chunked (no Content-Length) or declaring `length` whatever
    is sent; the reply's head."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    writer.write(
        f"POST /v1/run HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n".encode()
    )
    for chunk in chunks:
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if length is None else chunk)
    if finish:
        writer.write(b"0\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.read(4096), timeout=30)
    writer.close()
    return head


async def test_bodies_over_the_cap_get_413_whether_declared_or_streamed() -> None:
    async with serve() as url, httpx.AsyncClient(base_url=url, headers=AUTH) as http:
        fits = await http.post("/v1/run", content=_run_body(8000), headers=JSON)
        assert fits.status_code == 200 and fits.json()["status"] == "ok", fits.text
        declared = await http.post("/v1/run", content=_run_body(8193), headers=JSON)
        assert declared.status_code == 413 and "8192 bytes" in declared.json()["detail"]
        body = _run_body(20_000)
        streamed = await _raw_post(url, [body[i : i + 1000] for i in range(0, len(body), 1000)], finish=False)
        assert streamed.startswith(b"HTTP/1.1 413"), streamed[:200]
        body = _run_body(6000)
        small = await _raw_post(url, [body[i : i + 1000] for i in range(0, len(body), 1000)], finish=True)
        assert small.startswith(b"HTTP/1.1 200"), small[:300]
        # A huge declared size is refused before a byte of the body is read.
        assert (await _raw_post(url, [], finish=False, length=99_999_999_999)).startswith(b"HTTP/1.1 413")
        async with SandboxClient(url, TOKEN) as client:
            with pytest.raises(ValueError, match="over the service's cap"):
                await client.run(ExecRequest(command=["true"], files={"big": b"x" * 9000}))


async def test_output_over_the_cap_is_refused() -> None:
    async with serve(max_output_bytes=2048) as url, SandboxClient(url, TOKEN) as client:
        with pytest.raises(ValueError, match="max_output_bytes 2049 is over the service's cap of 2048"):
            await client.run(ExecRequest(command=["true"], max_output_bytes=2049))
        flood = ExecRequest(command=["sh", "-c", "head -c 5000 /dev/zero"], max_output_bytes=2048)
        ok = await client.run(flood)
        assert ok.status is Status.OUTPUT_LIMIT and len(ok.stdout) <= 2048
        async with client.session() as box:
            with pytest.raises(ValueError, match="max_output_bytes"):
                await box.exec(ExecRequest(command=["true"]))  # the default, 1 MiB, is over this cap
            await box.put_files({"a.bin": b"1" * 1500, "b.bin": b"2" * 1500})
            assert await box.get_files(["a.bin"]) == {"a.bin": b"1" * 1500}
            with pytest.raises(ValueError, match="hold 3000 bytes, over the service's cap"):
                await box.get_files(["a.bin", "b.bin"])


async def test_sessions_are_capped_per_client_and_in_all() -> None:
    async with serve(max_sessions_per_client=2) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as http:
        # Five opens at once: the cap counts those still waiting for a sandbox.
        opened = await asyncio.gather(*(http.post("/v1/sessions") for _ in range(5)))
        codes = sorted(r.status_code for r in opened)
        assert codes == [200, 200, 429, 429, 429]
        refused = next(r for r in opened if r.status_code == 429)
        assert "maximum of 2 sessions" in refused.json()["detail"]
        first = next(r for r in opened if r.status_code == 200).json()["id"]
        assert (await http.delete(f"/v1/sessions/{first}")).status_code == 200
        assert (await http.post("/v1/sessions")).status_code == 200
    async with serve(max_sessions=1) as url, SandboxClient(url, TOKEN) as client:
        async with client.session():
            with pytest.raises(SandboxUnavailable, match="maximum of 1 sessions"):
                async with client.session():
                    pass
        async with client.session() as again:  # the first one closed: room again
            assert (await again.exec(ExecRequest(command=["true"]))).status is Status.OK


def _my_containers() -> set[str]:
    client = docker.from_env()
    try:
        found = client.api.containers(filters={"label": f"codeworld.owner.pid={os.getpid()}"})
    finally:
        client.close()
    return {c["Id"] for c in found}


async def test_errors_the_caller_did_not_cause_are_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _my_containers()
    async with serve(backend="docker", size=1) as url, SandboxClient(url, TOKEN) as client:
        async with client.session() as box:
            # A real failure: the session's container dies under it (killed here, as a crashed
            # daemon or an OOM-killed container would); the service says only that.
            await box.put_files({"a.txt": b"x"})
            docker_client = docker.from_env()
            for container in _my_containers() - before:
                docker_client.api.kill(container)
            docker_client.close()
            with pytest.raises(SandboxError) as lost:
                await box.put_files({"b.txt": b"y"})
            assert str(lost.value) == "no sandbox could serve the call; try again later."

        # An internal bug cannot be caused from outside; injected here (the pool's stats raise),
        # it must come back as a generic 500 that holds none of its text.
        def broken_stats(self):
            raise RuntimeError("secret detail: /var/lib/codeworld/pool-7 token=abc")

        monkeypatch.setattr("workers.sandbox.pool.SandboxPool.stats", broken_stats)
        async with httpx.AsyncClient(base_url=url, headers=AUTH) as http:
            response = await http.get("/v1/stats")
        assert response.status_code == 500 and response.json() == {"detail": "internal error."}
        assert "secret" not in response.text
        bad = await client._http.post("/v1/run", content=b'{"command": []}', headers=JSON)
        assert bad.status_code == 400 and bad.json()["detail"].startswith("body.command")
