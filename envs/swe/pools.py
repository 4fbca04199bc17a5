"""Sandbox pools shared by the episodes of an event loop: one warm pool per (backend, image,
service), started on first use and closed by `close_shared_pools` (episodes come and go;
containers stay). The service (`workers.sandbox.choice`) says where the pool lives: in this
process, as one actor per node of the Ray cluster, or behind a sandbox service. Keyed by the
running loop too, because a pool's queues and tasks belong to the loop that made it.

A pool's isolation is read from its first run when it starts. Rewards refuse a pool that isolates
by rlimits only (`Isolation.RLIMIT`: no namespaces, no container) unless the environment's config
accepts it by name (`require_isolation`): such programs see the host's files (the dataset's
answers among them), the network, and as non-root the trainer's own processes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from envs.base import EnvConfigError
from workers.sandbox import (
    ExecRequest,
    ImagePolicy,
    Isolation,
    PoolStats,
    SandboxLimits,
    SandboxProfile,
    SandboxUnavailable,
    Status,
)
from workers.sandbox.choice import SandboxService, open_pool, stats_by_node

SWE_WORK_MB = 2048
"""Size cap of the sandbox work dir: a repository, its dependencies and the episode's snapshot
of it must fit (the bytes count against the memory limit, so small repositories cost little)."""

MAX_IDLE_POOLS = 8
"""Pools of a loop kept warm beyond those in use: the least recently used idle one is closed when
a new image needs a pool (SWE tasks come one image each; a warm pool pays while its task's group
and grading reuse it)."""

_Key = tuple[asyncio.AbstractEventLoop, str, str, str | None, SandboxProfile | None, ImagePolicy | None, str]
_pools: dict[_Key, Any] = {}
_starting: dict[_Key, asyncio.Task[Any]] = {}
_isolation: dict[int, Isolation] = {}
_used: dict[_Key, float] = {}
_leases: dict[int, int] = {}


async def shared_pool(
    backend: str,
    image: str,
    size: int,
    local_isolation: str | None = None,
    profile: SandboxProfile | None = None,
    images: ImagePolicy | None = None,
    lease: bool = False,
    service: SandboxService | None = None,
) -> Any:
    """This loop's warm pool for `image` on `backend`, started with `size` sandboxes if new
    (`local_isolation`: the local backend's "bwrap" or "rlimit", None = the best available;
    `profile` and `images`: see `SandboxPool`; `service`: where the pool lives, None = `auto`,
    see `workers.sandbox.choice`). With `lease`, the caller holds the pool until `release_pool`:
    a held pool is never closed to make room for another image's."""
    loop = asyncio.get_running_loop()
    service = service or SandboxService()
    key = (loop, backend, image, local_isolation, profile, images, service.model_dump_json())
    _used[key] = loop.time()
    if key not in _pools:
        if key not in _starting:
            # One start per key, however many episodes ask at once.
            start = _start(backend, image, size, local_isolation, profile, images, service)
            _starting[key] = asyncio.create_task(start)
            await _close_idle(loop)
        try:
            _pools[key] = await asyncio.shield(_starting[key])
        finally:
            _starting.pop(key, None)
    pool = _pools[key]
    if lease:
        _leases[id(pool)] = _leases.get(id(pool), 0) + 1
    return pool


def release_pool(pool: Any) -> None:
    """Ends one lease of `shared_pool(..., lease=True)`."""
    left = _leases.get(id(pool), 0) - 1
    if left > 0:
        _leases[id(pool)] = left
    else:
        _leases.pop(id(pool), None)


async def _close_idle(loop: asyncio.AbstractEventLoop) -> None:
    """Closes the least recently used idle pools of `loop` beyond MAX_IDLE_POOLS."""
    idle = sorted(
        (k for k, p in _pools.items() if k[0] is loop and id(p) not in _leases and _is_idle(p)),
        key=lambda k: _used.get(k, 0.0),
    )
    for key in idle[: max(0, len(idle) - MAX_IDLE_POOLS + 1)]:
        pool = _pools.pop(key)
        _isolation.pop(id(pool), None)
        _used.pop(key, None)
        await pool.close()


def _is_idle(pool: Any) -> bool:
    """No sandbox of the pool is in use on any node (a sandbox service reports no counters here:
    never idle, so never closed)."""
    stats = stats_by_node(pool, "").values()
    return bool(stats) and all(s.ready == s.size and s.waiting == 0 for s in stats)


async def _start(
    backend: str,
    image: str,
    size: int,
    local_isolation: str | None,
    profile: SandboxProfile | None,
    images: ImagePolicy | None,
    service: SandboxService,
) -> Any:
    pool = await open_pool(
        service,
        backend,
        image,
        size,  # type: ignore[arg-type]
        SandboxLimits(work_mb=SWE_WORK_MB, pids=512),
        local_isolation,
        profile,
        images,
    )  # type: ignore[arg-type]
    # What isolates the programs is reported on every result; a first run reads it before any
    # grading depends on it.
    first = await pool.run(ExecRequest(command=["true"], timeout_s=60))
    if first.status != Status.OK or first.isolation is None:
        await pool.close()
        raise SandboxUnavailable(
            f"the new {pool.backend_name} sandbox pool failed its first run ({first.status.value}: {first.error[:200]})"
        )
    _isolation[id(pool)] = first.isolation
    return pool


def require_isolation(pool: Any, allow_unisolated: bool, setting: str) -> Isolation:
    """The isolation of a shared pool; EnvConfigError when it is rlimits only and the config
    (`setting`, the key's dotted path) does not accept that."""
    isolation = _isolation[id(pool)]
    if isolation is Isolation.RLIMIT and not allow_unisolated:
        raise EnvConfigError(
            f"The {pool.backend_name} sandbox isolates programs by rlimits only (they can read the host's "
            f"files, the answers included, reach the network and signal the trainer's processes); install "
            f"Docker or bubblewrap, or set `{setting}: true` to accept that."
        )
    return isolation


def shared_pool_stats() -> dict[tuple[str, str], PoolStats]:
    """Counters of this loop's shared pools by (node, "<backend>-<image>") (for health metrics):
    one entry per node for pools spread over a Ray cluster."""
    loop = asyncio.get_running_loop()
    out: dict[tuple[str, str], PoolStats] = {}
    for (owner, backend, image, *_options), pool in _pools.items():
        if owner is loop:
            out.update(stats_by_node(pool, f"{backend}-{image}"))
    return out


async def close_shared_pools() -> None:
    """Close this loop's shared pools (their containers are removed)."""
    loop = asyncio.get_running_loop()
    mine = [key for key in _pools if key[0] is loop]
    for key in mine:
        _isolation.pop(id(_pools[key]), None)
        _used.pop(key, None)
    await asyncio.gather(*(_pools.pop(key).close() for key in mine))
