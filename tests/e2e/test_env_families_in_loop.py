"""Every built-in environment family inside the async RL loop, in one short run (the SWE family
has its own loop test in tests/envs/swe/test_swe_in_loop.py)."""

import asyncio
import collections
from pathlib import Path

from rl.config import load_config
from rl.orchestrator import load_recorded, run_training

FAMILIES = ["math", "arithmetic", "humaneval", "mbpp", "self_debug", "exec_trace"]


def test_math_code_selfdebug_and_trace_envs_train_in_the_loop(
    tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None
) -> None:
    envs = ", ".join(f"{{name: {name}}}" for name in FAMILIES)
    cfg = load_config(
        None,
        [
            "run.name=families",
            f"run.dir={tmp_path / 'run'}",
            "run.steps=2",
            "run.record_batches=true",
            f"model.path={tiny_model}",
            "rollout.max_tokens=24",
            "rollout.max_model_len=2048",
            "algorithm.group_size=2",
            "algorithm.batch_size=24",
            "algorithm.filter_zero_variance=false",
            "algorithm.max_staleness=0",  # the learner waits for every admitted group, slow families too
            "logging.trackers=[]",
            "logging.progress=false",
            f"bus.redis_url={redis_url}",
            f"envs=[{envs}]",
        ],
    )
    summary = asyncio.run(run_training(cfg))
    assert summary.steps == 2
    seen = collections.Counter()
    for step in (1, 2):
        for t in load_recorded(cfg.run.dir / "batches" / f"step_{step:06d}.msgpack"):
            seen[t.env] += 1
            assert 0.0 <= t.reward <= 1.0 and t.num_model_tokens > 0
    assert set(seen) == set(FAMILIES), (seen, summary.dropped)
    # self_debug is multi-turn: environment tokens (test feedback) sit between model turns
    # whenever the first attempt failed, which a random model's code always does.
    multi = [
        t
        for s in (1, 2)
        for t in load_recorded(cfg.run.dir / "batches" / f"step_{s:06d}.msgpack")
        if t.env == "self_debug"
    ]
    assert any((t.loss_mask == 0).any() for t in multi)
