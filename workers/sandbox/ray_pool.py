"""One SandboxPool per Ray node, as an actor placed by the node's `node:<ip>` resource, and
RaySandboxPool: the SandboxPool API over those actors (callers prefer the pool on their node)."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, AsyncIterator

import ray

from workers.sandbox.config import SandboxLimits
from workers.sandbox.models import ExecRequest, ExecResult, PoolStats
from workers.sandbox.pool import DEFAULT_IMAGE, SandboxPool
from workers.sandbox.sessions import SessionRegistry

_NODE_SHARE = 0.001
"""Fraction of a node's `node:<ip>` resource an actor asks for: pins it to that node, blocks no one."""


class SandboxPoolActor:
    """Holds one node's pool. Async actor: calls overlap, so a slow run never blocks others."""

    def __init__(self, backend: str, image: str, size: int, limits: dict[str, Any]) -> None:
        self.pool = SandboxPool(backend=backend, image=image, size=size, limits=SandboxLimits(**limits))  # type: ignore[arg-type]
        self.sessions = SessionRegistry(self.pool)

    async def start(self) -> str:
        await self.pool.start()
        return ray.get_runtime_context().get_node_id()

    async def run(self, request: ExecRequest) -> ExecResult:
        return await self.pool.run(request)

    async def stats(self) -> PoolStats:
        return self.pool.stats()

    async def open_session(self) -> str:
        return await self.sessions.open()

    async def session_exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        return await self.sessions.get(session_id).exec(request)

    async def session_put(self, session_id: str, files: dict[str, bytes]) -> None:
        await self.sessions.get(session_id).put_files(files)

    async def session_get(self, session_id: str, paths: list[str]) -> dict[str, bytes]:
        return await self.sessions.get(session_id).get_files(paths)

    async def close_session(self, session_id: str) -> None:
        await self.sessions.close(session_id)

    async def close(self) -> None:
        await self.sessions.close_all()
        await self.pool.close()


class RaySandboxPool:
    """`async with RaySandboxPool(backend="docker", size=4) as pool: await pool.run(req)` inside a
    Ray job: one SandboxPoolActor per alive node (or on the nodes given)."""

    def __init__(self, backend: str = "docker", image: str = DEFAULT_IMAGE, size: int = 4,
                 limits: SandboxLimits | None = None, node_ips: list[str] | None = None) -> None:
        self.backend, self.image, self.size = backend, image, size
        self.limits = limits or SandboxLimits()
        self.node_ips = node_ips
        self.actors: dict[str, Any] = {}
        self._round_robin: itertools.cycle | None = None

    async def __aenter__(self) -> "RaySandboxPool":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        ips = self.node_ips or [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]]
        actor_cls = ray.remote(num_cpus=0)(SandboxPoolActor)
        handles = [actor_cls.options(resources={f"node:{ip}": _NODE_SHARE}).remote(
            self.backend, self.image, self.size, self.limits.model_dump()) for ip in ips]
        node_ids = [await handle.start.remote() for handle in handles]
        self.actors = dict(zip(node_ids, handles))
        self._round_robin = itertools.cycle(list(self.actors.values()))

    def _pick(self) -> Any:
        """The pool on the caller's own node if there is one (no bytes cross the network)."""
        try:
            here = ray.get_runtime_context().get_node_id()
        except Exception:  # not inside a Ray worker or driver with a node id
            here = None
        if here in self.actors:
            return self.actors[here]
        assert self._round_robin is not None, "RaySandboxPool.start() must run first"
        return next(self._round_robin)

    async def run(self, request: ExecRequest) -> ExecResult:
        return await self._pick().run.remote(request)

    async def stats(self) -> dict[str, PoolStats]:
        return {node: await actor.stats.remote() for node, actor in self.actors.items()}

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator["RaySession"]:
        actor = self._pick()
        session_id = await actor.open_session.remote()
        try:
            yield RaySession(actor, session_id)
        finally:
            await actor.close_session.remote(session_id)

    async def close(self) -> None:
        for actor in self.actors.values():
            await actor.close.remote()
            ray.kill(actor)
        self.actors = {}


class RaySession:
    """A session held by one node's actor."""

    def __init__(self, actor: Any, session_id: str) -> None:
        self._actor, self._id = actor, session_id

    async def exec(self, request: ExecRequest) -> ExecResult:
        return await self._actor.session_exec.remote(self._id, request)

    async def put_files(self, files: dict[str, bytes]) -> None:
        await self._actor.session_put.remote(self._id, files)

    async def get_files(self, paths: list[str]) -> dict[str, bytes]:
        return await self._actor.session_get.remote(self._id, paths)
