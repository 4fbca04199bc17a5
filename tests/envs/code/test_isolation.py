"""Rewards refuse a sandbox that isolates by rlimits only unless the config accepts it by name;
when accepted, every graded step says so. Real pools: the local backend with its rlimit-only
isolation (what `auto` falls back to without Docker or bubblewrap), and Docker."""

from __future__ import annotations

import pytest

from envs.base import Action, EnvConfigError, Message, StepResult, Task
from envs.code import MBPPEnv
from envs.code_datasets import asserts_to_tests

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
TASK = Task(
    id="add",
    prompt=[Message(role="user", content="add")],
    hidden={"tests": asserts_to_tests("assert add(1, 2) == 3", "add").model_dump(), "prefix": "", "gold": None},
)
REPLY = "```python\ndef add(a, b):\n    return a + b\n```"
RLIMIT_ONLY = {"backend": "local", "local_isolation": "rlimit"}
DOCKER = {"sandbox": {"backend": "docker"}}


async def run_episode(env_cls: type[MBPPEnv], params, task: Task, reply: str) -> list[StepResult]:
    env = env_cls(params)
    await env.reset(task)
    try:
        return [await env.step(Action(text=reply, token_ids=[]))]
    finally:
        await env.close()


@MODULE_LOOP
async def test_an_rlimit_only_sandbox_is_refused_naming_the_key() -> None:
    params = MBPPEnv.Params.model_validate({"sandbox": RLIMIT_ONLY})
    key = r"set `params\.sandbox\.allow_unisolated: true`"
    with pytest.raises(EnvConfigError, match=r"rlimits only .* " + key):
        await run_episode(MBPPEnv, params, TASK, REPLY)


@MODULE_LOOP
async def test_an_accepted_rlimit_only_sandbox_is_flagged_in_every_step() -> None:
    params = MBPPEnv.Params.model_validate({"sandbox": {**RLIMIT_ONLY, "allow_unisolated": True}})
    [result] = await run_episode(MBPPEnv, params, TASK, REPLY)
    assert (result.reward, result.info["isolation"]) == (1.0, "rlimit")


@MODULE_LOOP
async def test_docker_and_bubblewrap_need_no_flag() -> None:
    [docker] = await run_episode(MBPPEnv, MBPPEnv.Params.model_validate(DOCKER), TASK, REPLY)
    assert (docker.reward, docker.info["isolation"]) == (1.0, "docker")
    bwrap = MBPPEnv.Params.model_validate({"sandbox": {"backend": "local", "local_isolation": "bwrap"}})
    [local] = await run_episode(MBPPEnv, bwrap, TASK, REPLY)
    assert local.reward == 1.0 and local.info["isolation"].startswith("bwrap")
