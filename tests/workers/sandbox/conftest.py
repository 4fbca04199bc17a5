"""Fixtures of the sandbox tests: real pools on the real Docker engine and the real local backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sandbox_testkit import BACKENDS, make_pool

from workers.sandbox import SandboxPool


@pytest.fixture(scope="module", params=BACKENDS)
async def pool(request: pytest.FixtureRequest) -> AsyncIterator[SandboxPool]:
    """Two warm sandboxes of one backend, shared by a module's tests."""
    async with make_pool(request.param) as sandbox_pool:
        yield sandbox_pool
