"""Fixtures shared by the whole suite. Area-specific fixtures live in their folder's conftest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rl.redis_server import PrivateRedis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of one real redis-server shared by the session; tests keep apart by run_id."""
    with PrivateRedis() as server:
        yield server.url
