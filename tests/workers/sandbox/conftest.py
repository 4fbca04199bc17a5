"""Fixtures of the sandbox tests: real pools on the real Docker engine and the real local backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sandbox_testkit import BACKENDS, TEST_LIMITS

from workers.sandbox import SandboxPool


@pytest.fixture(scope="module", params=BACKENDS)
async def pool(request: pytest.FixtureRequest) -> AsyncIterator[SandboxPool]:
    """Two warm sandboxes of one backend, shared by a module's tests."""
    async with SandboxPool(backend=request.param, size=2, limits=TEST_LIMITS) as sandbox_pool:
        yield sandbox_pool
