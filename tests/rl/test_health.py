"""Sandbox and verifier health metrics from real grading: programs run in a real sandbox pool (the
local backend) pass, time out, crash or run out of memory; one run meets a closed pool (a real
SANDBOX_ERROR, the sample dropped); the monitor turns the outcomes and the pool's counters into
env/ and sandbox/ metrics."""

from __future__ import annotations

import numpy as np

from envs.code import grade_info
from envs.code_datasets import asserts_to_tests
from reward.code import ExecLimits
from reward.code_run import grade
from rl.health import HealthMonitor
from rl.trajectory import Trajectory
from workers.episode import EpisodeOutcome
from workers.sandbox import SandboxLimits, SandboxPool

TESTS = asserts_to_tests("assert add(1, 2) == 3\nassert add(2, 2) == 4", "add")
# The whole run's deadline is below one test's, so a loop ends the run (a per-test timeout would be
# a failed test inside a run that ends "ok").
LIMITS = ExecLimits(timeout_per_test_s=3.0, timeout_total_s=1.5, memory_mb=128)
PROGRAMS = {
    "ok": "def add(a, b):\n    return a + b\n",
    "timeout": "def add(a, b):\n    while True:\n        pass\n",
    "runtime_error": "import os\nos._exit(3)\n",
    "oom": "hog = bytearray(512 * 2**20)\ndef add(a, b):\n    return a + b\n",
}


def outcome(result, i: int) -> EpisodeOutcome:
    """What the episode runner makes of a graded episode (env.step's info, reward None = dropped)."""
    info = grade_info(result)
    if result.reward is None:
        return EpisodeOutcome(trajectory=None, error=str(info["error"]), info=info)
    traj = Trajectory(
        id=f"t{i}",
        run_id="health",
        env="mbpp",
        task_id="add",
        group_id="g",
        group_size=3,
        prompt_ids=np.arange(3),
        completion_ids=np.arange(4),
        loss_mask=np.ones(4),
        sampler_logprobs=np.zeros(4),
        policy_versions=np.zeros(4),
        reward=result.reward,
        reward_info=info,
        timings={"generate": 0.01, "episode": 0.01 + result.sandbox_s + 0.05},
    )
    return EpisodeOutcome(trajectory=traj)


async def test_health_counts_statuses_latencies_drops_and_pool_counters() -> None:
    monitor = HealthMonitor()
    pool = SandboxPool(backend="local", size=2, limits=SandboxLimits(pids=64, work_mb=64, tmp_mb=32))
    await pool.start()
    try:
        results = [await grade(pool, TESTS, program, LIMITS) for program in PROGRAMS.values()]
        stats = pool.stats()
    finally:
        await pool.close()
    results.append(await grade(pool, TESTS, PROGRAMS["ok"], LIMITS))  # the pool is closed: no reward
    assert [r.status for r in results] == ["ok", "timeout", "runtime_error", "oom", "sandbox_error"]
    assert results[-1].reward is None
    monitor.observe("mbpp", [outcome(r, i) for i, r in enumerate(results)])
    got = monitor.drain({"local-py": stats})
    counts = ("timeouts", "runtime_errors", "ooms", "sandbox_errors", "no_reward", "verifier_deadline")
    assert [got[f"env/mbpp/{k}"] for k in counts] == [1, 1, 1, 1, 1, 0]
    assert got["env/mbpp/graded_per_s"] > 0
    sandbox_s = [r.sandbox_s for r in results[:4]]  # the run that met a closed pool never ran
    assert got["env/mbpp/sandbox_p50_s"] == np.percentile(sandbox_s, 50)
    assert got["env/mbpp/sandbox_p99_s"] == np.percentile(sandbox_s, 99)
    assert results[1].sandbox_s >= 1.5  # the timeout took its whole deadline
    assert got["env/mbpp/verify_p99_s"] >= got["env/mbpp/verify_p50_s"] >= 0.05
    node = monitor.node
    assert got[f"sandbox/{node}/local-py/runs"] == stats.runs >= 4
    assert got[f"sandbox/{node}/local-py/busy"] == stats.size - stats.ready
    assert got[f"sandbox/{node}/local-py/exec_per_s"] > 0
    again = monitor.drain({"local-py": stats})  # nothing happened since: the interval is empty
    assert again[f"sandbox/{node}/local-py/exec_per_s"] == 0 and not any(k.startswith("env/") for k in again)
