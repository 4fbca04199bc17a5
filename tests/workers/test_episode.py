"""EpisodeRunner against a real vLLM worker: a group's shared first turn is one n-sample request."""

import asyncio
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from envs.arithmetic import ArithmeticEnv, ArithmeticParams
from envs.base import Observation, Task
from workers.episode import ChatRenderer, EpisodeRunner
from workers.rollout import Generation, Sampling


class CountingWorker:
    """The real Ray worker behind a shim that records the `n` of each generate call."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.calls: list[int] = []

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> list[Generation]:
        self.calls.append(sampling.n)
        return await self.handle.generate.remote(prompt_ids, sampling)


class NumberedResetEnv(ArithmeticEnv):
    """Arithmetic whose reset tells each instance apart, so a group's prompts differ."""

    counter = 0

    async def reset(self, task: Task) -> Observation:
        obs = await super().reset(task)
        NumberedResetEnv.counter += 1
        last = obs.messages[-1]
        numbered = last.model_copy(update={"content": f"{last.content} ({NumberedResetEnv.counter})"})
        return obs.model_copy(update={"messages": [*obs.messages[:-1], numbered]})


@pytest.fixture
def runner(tiny_model: str) -> EpisodeRunner:
    return EpisodeRunner(ChatRenderer(AutoTokenizer.from_pretrained(tiny_model)), "episode-test", 512)


def task() -> Task:
    params = ArithmeticParams(n_train=5)
    return ArithmeticEnv.load_tasks(params, None, "train")[0]


def test_a_group_with_one_prompt_samples_its_first_turn_as_one_request(worker, runner: EpisodeRunner) -> None:
    counting, params = CountingWorker(worker), ArithmeticParams(n_train=5)
    envs = [ArithmeticEnv(params) for _ in range(6)]
    outcomes = asyncio.run(runner.run_group(envs, task(), counting, Sampling(max_tokens=10), "g0"))
    assert counting.calls == [6]
    trajs = [o.trajectory for o in outcomes]
    assert all(t is not None for t in trajs)
    assert len({tuple(t.prompt_ids) for t in trajs}) == 1
    assert len({tuple(t.completion_ids) for t in trajs}) > 1, "the group's samples must differ"
    for t in trajs:
        n = len(t.completion_ids)
        assert 1 <= n <= 10 and t.loss_mask.tolist() == [1] * n
        assert len(t.sampler_logprobs) == len(t.policy_versions) == n
        assert np.all(t.sampler_logprobs <= 0)


def test_a_group_whose_prompts_differ_samples_each_episode_alone(worker, runner: EpisodeRunner) -> None:
    counting, params = CountingWorker(worker), ArithmeticParams(n_train=5)
    envs = [NumberedResetEnv(params) for _ in range(3)]
    outcomes = asyncio.run(runner.run_group(envs, task(), counting, Sampling(max_tokens=10), "g1"))
    assert counting.calls == [1, 1, 1]
    assert len({tuple(o.trajectory.prompt_ids) for o in outcomes}) == 3
