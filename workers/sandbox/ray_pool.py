"""Sandboxes across a Ray cluster: one `SandboxPool` per node that can run them, each held by an
actor pinned to its node, and `RaySandboxPool`, the SandboxPool API over those actors.

A caller gets the pool on its own node while that pool has a sandbox to spare (no bytes cross the
network), else the least loaded pool in the cluster. Nodes that cannot run sandboxes of the
backend (no Docker daemon, no image) get no actor. Every run and session also brings back its
pool's counters, so `stats_by_node` is current without a call of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Literal

from workers.sandbox.config import ImagePolicy, SandboxLimits, SandboxProfile
from workers.sandbox.models import ExecRequest, ExecResult, PoolStats
from workers.sandbox.pool import DEFAULT_IMAGE, SandboxPool, SandboxUnavailable
from workers.sandbox.sessions import SessionRegistry

log = logging.getLogger(__name__)

Backend = Literal["docker", "local", "auto"]


def why_no_sandboxes(backend: Backend = "docker", image: str = DEFAULT_IMAGE, pull: bool = False) -> str | None:
    """Why this node cannot run `backend` sandboxes of `image` (None: it can; with `pull`, a node
    without the image pulls it). The local backend (and "auto", which falls back to it) runs on
    any Linux node."""
    if backend != "docker":
        return None
    import docker
    import docker.errors

    try:
        client = docker.from_env(timeout=10)
    except docker.errors.DockerException as exc:
        return f"no Docker daemon: {' '.join(str(exc).split())[:160]}"
    try:
        client.ping()
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return None if pull else f"Docker has no image {image!r}"
    except Exception as exc:  # any daemon failure means the same: no sandboxes here
        return f"Docker does not answer: {' '.join(str(exc).split())[:160]}"
    finally:
        client.close()
    return None


def probe_nodes(
    node_ids: list[str],
    backend: Backend = "docker",
    image: str = DEFAULT_IMAGE,
    timeout_s: float = 60.0,
    pull: bool = False,
) -> dict[str, str | None]:
    """`why_no_sandboxes` on each node (a task pinned there, claiming nothing)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(why_no_sandboxes)
    calls = {
        node: probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            backend, image, pull
        )
        for node in node_ids
    }
    out: dict[str, str | None] = {}
    for node, call in calls.items():
        try:
            out[node] = ray.get(call, timeout=timeout_s)
        except Exception as exc:  # a node that cannot even run the probe runs no sandboxes either
            out[node] = f"the probe failed: {type(exc).__name__}"
    return out


class SandboxPoolActor:
    """Holds one node's pool. Async actor: calls overlap, so a slow run never blocks others."""

    def __init__(
        self,
        backend: Backend,
        image: str,
        size: int,
        limits: dict[str, Any],
        local_isolation: Literal["bwrap", "rlimit"] | None,
        profile: SandboxProfile | None = None,
        images: ImagePolicy | None = None,
    ) -> None:
        self.pool = SandboxPool(
            backend=backend,
            image=image,
            size=size,
            limits=SandboxLimits(**limits),
            local_isolation=local_isolation,
            profile=profile,
            images=images,
        )
        self.sessions = SessionRegistry(self.pool)

    async def start(self) -> tuple[str, str]:
        """Warm the pool; returns the backend it resolved to and this node's address."""
        import ray

        await self.pool.start()
        return self.pool.backend_name, ray.util.get_node_ip_address()

    async def run(self, request: ExecRequest) -> tuple[ExecResult, PoolStats]:
        return await self.pool.run(request), self.pool.stats()

    async def stats(self) -> PoolStats:
        return self.pool.stats()

    async def open_session(self) -> tuple[str, PoolStats]:
        return await self.sessions.open(), self.pool.stats()

    async def session_exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        return await self.sessions.get(session_id).exec(request)

    async def session_put(self, session_id: str, files: dict[str, bytes]) -> None:
        await self.sessions.get(session_id).put_files(files)

    async def session_get(self, session_id: str, paths: list[str]) -> dict[str, bytes]:
        return await self.sessions.get(session_id).get_files(paths)

    async def close_session(self, session_id: str) -> PoolStats:
        await self.sessions.close(session_id)
        return self.pool.stats()

    async def close(self) -> None:
        await self.sessions.close_all()
        await self.pool.close()


class _NodePool:
    """The driver's view of one node's pool actor."""

    def __init__(self, actor: Any, address: str, size: int) -> None:
        self.actor, self.address, self.size = actor, address, size
        self.in_flight = 0
        """Runs and sessions this process has going on the node right now."""
        self.stats: PoolStats | None = None
        """The node pool's counters as of its last answer."""


class RaySandboxPool:
    """`async with RaySandboxPool(backend="docker", size=4) as pool: await pool.run(req)` inside a
    Ray job: one SandboxPoolActor per alive node that can run the backend's sandboxes."""

    def __init__(
        self,
        backend: Backend = "docker",
        image: str = DEFAULT_IMAGE,
        size: int = 4,
        limits: SandboxLimits | None = None,
        local_isolation: Literal["bwrap", "rlimit"] | None = None,
        node_ids: list[str] | None = None,
        profile: SandboxProfile | None = None,
        images: ImagePolicy | None = None,
    ) -> None:
        """`profile` and `images`: as `SandboxPool`'s, for every node's pool."""
        self.backend_name: str = backend
        self.image, self.size = image, size
        self.limits = limits or SandboxLimits()
        self.local_isolation = local_isolation
        self.node_ids = node_ids
        self.profile, self.images = profile, images
        self.nodes: dict[str, _NodePool] = {}

    async def __aenter__(self) -> "RaySandboxPool":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """An actor on every node that can run the sandboxes; SandboxUnavailable when none can."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ids = self.node_ids or [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        why = await asyncio.to_thread(
            probe_nodes,
            ids,
            self.backend_name,  # type: ignore[arg-type]
            self.image,
            pull=bool(self.images and self.images.pull),
        )
        usable = [node for node in ids if why[node] is None]
        if not usable:
            raise SandboxUnavailable(
                f"no node of the Ray cluster can run {self.backend_name} sandboxes: "
                + "; ".join(sorted(set(filter(None, why.values()))))
            )
        actor_cls = ray.remote(num_cpus=0)(SandboxPoolActor)
        args = (
            self.backend_name,
            self.image,
            self.size,
            self.limits.model_dump(),
            self.local_isolation,
            self.profile,
            self.images,
        )
        actors = {
            node: actor_cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(*args)
            for node in usable
        }
        for node, actor in actors.items():
            try:
                backend, address = await actor.start.remote()
            except Exception as exc:  # one node's failure leaves the others serving
                log.warning("sandbox pool on node %s did not start: %s", node[:12], exc)
                ray.kill(actor)
                continue
            self.backend_name = backend
            self.nodes[node] = _NodePool(actor, address, self.size)
        if not self.nodes:
            raise SandboxUnavailable(f"no {self.backend_name} sandbox pool started on any node of the Ray cluster.")
        log.info(
            "sandbox pools (%s, %s) on %s",
            self.backend_name,
            self.image,
            ", ".join(n.address for n in self.nodes.values()),
        )

    def _pick(self) -> _NodePool:
        """This node's pool while it has a sandbox to spare, else the least loaded one."""
        import ray

        here = self.nodes.get(ray.get_runtime_context().get_node_id())
        if here is not None and here.in_flight < here.size:
            return here
        return min(self.nodes.values(), key=lambda n: (n.in_flight / n.size, n.address))

    async def run(self, request: ExecRequest) -> ExecResult:
        node = self._pick()
        node.in_flight += 1
        try:
            result, node.stats = await node.actor.run.remote(request)
        finally:
            node.in_flight -= 1
        return result

    def stats_by_node(self) -> dict[str, PoolStats]:
        """Each node pool's counters as of its last answer, by node address."""
        return {n.address: n.stats for n in self.nodes.values() if n.stats is not None}

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator["RaySession"]:
        node = self._pick()
        node.in_flight += 1
        try:
            session_id, node.stats = await node.actor.open_session.remote()
            try:
                yield RaySession(node.actor, session_id)
            finally:
                node.stats = await node.actor.close_session.remote(session_id)
        finally:
            node.in_flight -= 1

    async def close(self) -> None:
        import ray

        for node in self.nodes.values():
            try:
                await node.actor.close.remote()
            finally:
                ray.kill(node.actor)
        self.nodes = {}


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
