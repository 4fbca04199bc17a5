"""The SWE environment inside the real async RL loop (Ray, vLLM, Redis Streams, FSDP2 learner), on
an official-layout SWE-bench instance (its image built by `codeworld swe build-image`): a random
tiny model's episodes run their turns in sandboxes whose /testbed is writable, are graded by
SWE-bench's evaluation script in a fresh sandbox, and train one step."""

import asyncio
import json
from pathlib import Path

import pytest
from conftest import LITE

from rl.config import load_config
from rl.orchestrator import load_recorded, run_training


@pytest.fixture(scope="module")
def long_context_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The suite's tiny model, with room for the SWE prompt (about 1,800 of its tokens)."""
    from rl.tiny_model import TinyModelSpec, init_tiny

    out = tmp_path_factory.mktemp("tiny-swe")
    init_tiny(out, TinyModelSpec(seed=0, max_position_embeddings=4096))
    return str(out)


def test_swe_episodes_train_one_step(
    tmp_path: Path, long_context_tiny_model: str, official_images: dict, redis_url: str, ray_session: None
) -> None:
    instance = "marshmallow-code__marshmallow-1359"
    rows = [r for r in json.loads((LITE / "dev.json").read_text()) if r["instance_id"] == instance]
    task_file = tmp_path / "official.jsonl"
    task_file.write_text(json.dumps(rows[0]) + "\n")
    params = "{max_turns: 2, pool_size: 2, pull_images: false}"
    cfg = load_config(
        None,
        [
            "run.name=swe-loop",
            f"run.dir={tmp_path / 'run'}",
            "run.steps=1",
            "run.record_batches=true",
            f"model.path={long_context_tiny_model}",
            "rollout.max_tokens=16",
            "rollout.max_model_len=3072",
            "algorithm.group_size=2",
            "algorithm.batch_size=2",
            "learner.world_size=1",
            "logging.trackers=[]",
            "logging.progress=false",
            f"bus.redis_url={redis_url}",
            f"envs=[{{name: swe, data: {task_file}, params: {params}}}]",
        ],
    )
    summary = asyncio.run(run_training(cfg))
    # All-zero groups carry no gradient and are counted as such; none lost its reward.
    assert summary.steps == 1 and summary.dropped["no_reward"] == 0
    batch = load_recorded(cfg.run.dir / "batches" / "step_000001.msgpack")
    assert len(batch) == 4 and {t.env for t in batch} == {"swe"}
    for traj in batch:
        assert traj.task_id == instance
        assert traj.reward == 0.0  # a random model does not fix the bug; it is graded, not dropped
        assert traj.reward_info["reason"] in ("out of turns", "submitted", "out of tokens")
        assert traj.reward_info["grade"]["fail_to_pass"]["failed"] == json.loads(rows[0]["FAIL_TO_PASS"])
        assert traj.reward_info["isolation"] == "docker"
        # two model turns with one environment turn between them
        mask = traj.loss_mask.tolist()
        assert 0 in mask and mask[0] == 1 and mask[-1] == 1
