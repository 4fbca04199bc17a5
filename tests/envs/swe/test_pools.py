"""The shared pools of SWE episodes: their counters by name, and the cap on idle pools that never
closes one an episode still holds for its grading (real local sandboxes: cheap to start)."""

from __future__ import annotations

import pytest

from envs.swe import pools
from envs.swe.pools import MAX_IDLE_POOLS, release_pool, shared_pool, shared_pool_stats

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_pool_counters_are_named_by_backend_and_image(swe_pool) -> None:
    # Failed before: the stats unpacked a pool's key into three names while it has four.
    stats = {label: s for (_node, label), s in shared_pool_stats().items()}
    assert "docker-codeworld-sandbox:py311" in stats and stats["docker-codeworld-sandbox:py311"].size == 2


async def test_idle_pools_beyond_the_cap_close_but_a_held_one_stays() -> None:
    held = await shared_pool("local", "held-image", 1, lease=True)
    first_idle = await shared_pool("local", "idle-0", 1)
    for i in range(1, MAX_IDLE_POOLS + 1):
        await shared_pool("local", f"idle-{i}", 1)
    open_images = {key[2] for key in pools._pools}
    assert "held-image" in open_images and "idle-0" not in open_images
    assert first_idle._closed and not held._closed
    assert sum(1 for key in pools._pools if key[2].startswith("idle-")) == MAX_IDLE_POOLS
    release_pool(held)
    await shared_pool("local", "idle-extra", 1)
    assert held._closed  # released, it is the least recently used idle pool now
    for key in [k for k in pools._pools if k[1] == "local"]:
        await pools._pools.pop(key).close()
