"""Fixtures of the code-environment tests: environments graded in the real Docker sandbox."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from envs.base import Action, Environment, Task
from envs.swe.pools import close_shared_pools

DOCKER = {"sandbox": {"backend": "docker"}}
"""Env params that pin grading to the Docker backend (the default, "auto", may pick local)."""


@pytest_asyncio.fixture(scope="module", loop_scope="module", autouse=True)
async def _close_pools() -> AsyncIterator[None]:
    """Close the module loop's shared sandbox pools once its tests are done."""
    yield
    await close_shared_pools()


async def run_episode(env_cls: type[Environment], params, task: Task, *replies: str):
    """Play `replies` as successive model turns; returns the list of step results."""
    env = env_cls(params)
    await env.reset(task)
    results = []
    for reply in replies:
        results.append(await env.step(Action(text=reply, token_ids=[])))
        if results[-1].done:
            break
    await env.close()
    return results
