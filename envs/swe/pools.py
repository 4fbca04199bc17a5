"""Sandbox pools shared by the SWE episodes of an event loop: one warm pool per (backend, image),
started on first use and closed by `close_shared_pools` (episodes come and go; containers stay).
Keyed by the running loop too, because a pool's queues and tasks belong to the loop that made it."""

from __future__ import annotations

import asyncio

from workers.sandbox import PoolStats, SandboxLimits, SandboxPool

SWE_WORK_MB = 2048
"""Size cap of the sandbox work dir: a repository, its dependencies and the episode's snapshot
of it must fit (the bytes count against the memory limit, so small repositories cost little)."""

_pools: dict[tuple[asyncio.AbstractEventLoop, str, str], SandboxPool] = {}
_starting: dict[tuple[asyncio.AbstractEventLoop, str, str], asyncio.Task[SandboxPool]] = {}


async def shared_pool(backend: str, image: str, size: int) -> SandboxPool:
    """This loop's warm pool for `image` on `backend`, started with `size` sandboxes if new."""
    key = (asyncio.get_running_loop(), backend, image)
    if key in _pools:
        return _pools[key]
    if key not in _starting:
        # One start per key, however many episodes ask at once.
        _starting[key] = asyncio.create_task(_start(backend, image, size))
    try:
        _pools[key] = await asyncio.shield(_starting[key])
    finally:
        _starting.pop(key, None)
    return _pools[key]


async def _start(backend: str, image: str, size: int) -> SandboxPool:
    pool = SandboxPool(backend=backend, image=image, size=size,  # type: ignore[arg-type]
                       limits=SandboxLimits(work_mb=SWE_WORK_MB, pids=512))
    await pool.start()
    return pool


def shared_pool_stats() -> dict[str, PoolStats]:
    """Counters of this loop's shared pools by "<backend>-<image>" (for health metrics)."""
    loop = asyncio.get_running_loop()
    return {f"{backend}-{image}": pool.stats() for (owner, backend, image), pool in _pools.items()
            if owner is loop}


async def close_shared_pools() -> None:
    """Close this loop's shared pools (their containers are removed)."""
    loop = asyncio.get_running_loop()
    mine = [key for key in _pools if key[0] is loop]
    await asyncio.gather(*(_pools.pop(key).close() for key in mine))
