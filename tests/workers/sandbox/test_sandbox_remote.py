"""The same API across processes: the HTTP service (real uvicorn server, bearer token) with its
client, and the per-node Ray actor."""

from __future__ import annotations

import asyncio
import socket

import pytest
import ray
import uvicorn

from workers.sandbox import ExecRequest, Status
from workers.sandbox.client import SandboxClient
from workers.sandbox.ray_pool import RaySandboxPool
from workers.sandbox.server import ServerConfig, create_app

pytestmark = pytest.mark.asyncio(loop_scope="session")

TOKEN = "test-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_http_service_runs_and_holds_sessions() -> None:
    port = _free_port()
    config = ServerConfig(backend="local", size=1, token=TOKEN)
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not serving.done(), serving
        await asyncio.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        async with SandboxClient(url, TOKEN) as client:
            echo = "import sys; sys.stdout.buffer.write(b'\\xff' + sys.stdin.buffer.read())"
            r = await client.run(ExecRequest(command=["python3", "-c", echo], stdin=b"\x00bin"))
            assert (r.status, r.stdout) == (Status.OK, b"\xff\x00bin")
            async with client.session() as box:
                await box.put_files({"a.txt": b"one"})
                r = await box.exec(ExecRequest(command=["sh", "-c", "cat a.txt > b.txt"]))
                assert r.status is Status.OK
                assert await box.get_files(["b.txt", "nope"]) == {"b.txt": b"one"}
                with pytest.raises(ValueError, match="contains '..'"):
                    await box.put_files({"../escape": b"x"})
            assert (await client.stats()).runs == 1
        async with SandboxClient(url, "wrong-token-0123456789") as intruder:
            with pytest.raises(PermissionError):
                await intruder.run(ExecRequest(command=["true"]))
    finally:
        server.should_exit = True
        await serving
    async with SandboxClient(url, TOKEN) as client:  # service gone: an infrastructure failure
        assert (await client.run(ExecRequest(command=["true"]))).status is Status.SANDBOX_ERROR


async def test_ray_actor_per_node() -> None:
    started_here = not ray.is_initialized()  # the whole suite may share one Ray runtime
    if started_here:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        async with RaySandboxPool(backend="local", size=1) as pool:
            node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
            assert set(pool.nodes) == node_ids
            r = await pool.run(ExecRequest(command=["python3", "-c", "print(sum(range(10)))"]))
            assert (r.status, r.stdout) == (Status.OK, b"45\n")
            async with pool.session() as box:
                await box.put_files({"x.py": b"print('from file')"})
                assert (await box.exec(ExecRequest(command=["python3", "x.py"]))).stdout == b"from file\n"
                assert await box.get_files(["x.py"]) == {"x.py": b"print('from file')"}
            stats = pool.stats_by_node()  # brought back by every run and session
            assert [s.runs for s in stats.values()] == [1]
    finally:
        if started_here:
            ray.shutdown()


async def test_an_environment_chooses_its_pool_by_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """`SandboxService`: the HTTP service and the Ray pools as choices; `auto` is the process pool
    unless the Ray cluster has more than one node (tests/e2e/test_cluster.py covers that)."""
    from pydantic import ValidationError

    from workers.sandbox import SandboxLimits, SandboxPool, SandboxUnavailable
    from workers.sandbox.choice import SandboxService, open_pool, resolved_kind

    with pytest.raises(ValidationError, match="service.kind http needs service.url"):
        SandboxService(kind="http")
    assert resolved_kind(SandboxService()) == "process"
    monkeypatch.delenv("CODEWORLD_SANDBOX_TOKEN", raising=False)
    with pytest.raises(SandboxUnavailable, match=r"needs its token in \$CODEWORLD_SANDBOX_TOKEN"):
        await open_pool(SandboxService(kind="http", url="http://127.0.0.1:9"), "local", "img", 1, SandboxLimits(), None)
    monkeypatch.setenv("CODEWORLD_SANDBOX_TOKEN", TOKEN)
    client = await open_pool(
        SandboxService(kind="http", url="http://127.0.0.1:9"), "local", "img", 1, SandboxLimits(), None
    )
    try:  # nothing listens there: an infrastructure failure, not an exception
        assert (await client.run(ExecRequest(command=["true"]))).status is Status.SANDBOX_ERROR
    finally:
        await client.close()
    pool = await open_pool(SandboxService(kind="process"), "local", "img", 1, SandboxLimits(), None)
    try:
        assert isinstance(pool, SandboxPool)
        assert (await pool.run(ExecRequest(command=["true"]))).status is Status.OK
    finally:
        await pool.close()
