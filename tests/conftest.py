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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A freshly built ~1 M-parameter Qwen2 checkpoint with its locally trained tokenizer."""
    from rl.tiny_model import TinyModelSpec, init_tiny

    out = tmp_path_factory.mktemp("tiny")
    init_tiny(out, TinyModelSpec(seed=0))
    return str(out)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance for the tests that need actors."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
