"""EpisodeRunner against a real vLLM worker: a group's shared first turn is one n-sample request."""

import asyncio
import functools
import itertools
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from envs.arithmetic import ArithmeticEnv, ArithmeticParams
from envs.base import EnvConfigError, Message, Observation, StepResult, Task
from workers.chat import ChatRenderer
from workers.episode import EpisodeRunner
from workers.rollout import Generation, Sampling


class CountingWorker:
    """The real Ray worker behind a shim that records the `n` and the stop tokens of each
    generate call."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.calls: list[int] = []
        self.stops: list[list[int]] = []

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> list[Generation]:
        self.calls.append(sampling.n)
        self.stops.append(sampling.stop_token_ids)
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


class FaultyEnv(ArithmeticEnv):
    """Arithmetic that raises in `reset` or `step` as an environment with a bug would. An injected
    fault: the built-in environments no longer raise on any sandbox output, so no real input
    makes one do it on purpose."""

    closed = 0

    def __init__(self, params: ArithmeticParams, fault: str = "") -> None:
        super().__init__(params)
        self.fault = fault

    async def reset(self, task: Task) -> Observation:
        if self.fault == "reset":
            raise ValueError("the task row is broken")
        return await super().reset(task)

    async def step(self, action):
        if self.fault == "step":
            raise KeyError("grader bug")
        if self.fault == "config":
            raise EnvConfigError("the sandbox is not isolated")
        if self.fault == "no_observation":
            return StepResult(done=False)
        return await super().step(action)

    async def close(self) -> None:
        FaultyEnv.closed += 1
        if self.fault == "close":
            raise RuntimeError("close failed")


def test_an_environment_that_raises_drops_only_its_sample(worker, runner: EpisodeRunner) -> None:
    counting, params = CountingWorker(worker), ArithmeticParams(n_train=5)
    faults = ["", "reset", "step", "no_observation", "close", ""]
    envs = [FaultyEnv(params, fault) for fault in faults]
    FaultyEnv.closed = 0
    outcomes = asyncio.run(runner.run_group(envs, task(), counting, Sampling(max_tokens=10), "g2"))
    assert counting.calls == [5]  # the five that reset still share their first turn
    assert FaultyEnv.closed == 6
    kinds = [o.kind for o in outcomes]
    assert kinds == [None, "env_error:ValueError", "env_error:KeyError", "env_error:ValueError", None, None]
    assert [o.trajectory is not None for o in outcomes] == [True, False, False, False, True, True]
    assert "reset raised ValueError: the task row is broken" == outcomes[1].error
    assert "done=False without an observation" in outcomes[3].error


def test_a_configuration_error_still_ends_the_run(worker, runner: EpisodeRunner) -> None:
    envs = [FaultyEnv(ArithmeticParams(n_train=5), fault) for fault in ("", "config")]
    FaultyEnv.closed = 0
    with pytest.raises(EnvConfigError, match="not isolated"):
        asyncio.run(runner.run_group(envs, task(), worker, Sampling(max_tokens=10), "g3"))
    assert FaultyEnv.closed == 2


class NeverDoneEnv(ArithmeticEnv):
    """Arithmetic that always asks for another turn: the policy never gets to an answer."""

    max_turns = 3

    async def step(self, action):
        return StepResult(done=False, observation=Observation(messages=[Message(role="user", content="again?")]))


@pytest.mark.parametrize(("max_model_len", "why"), [(512, "turns"), (40, "context")])
def test_an_episode_out_of_turns_or_context_is_scored_not_dropped(
    worker, tiny_model: str, max_model_len: int, why: str
) -> None:
    """Issue #9, defect 2: running out of turns or context is the policy's failure. It used to give
    no trajectory (counted as no reward), so rambling was never punished and the group's baseline
    was biased up; now it is a trajectory with the configured reward, flagged truncated."""
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(tiny_model))
    runner = EpisodeRunner(renderer, "episode-test", max_model_len, unfinished_reward=-0.5)
    envs = [NeverDoneEnv(ArithmeticParams(n_train=5)) for _ in range(2)]
    outcomes = asyncio.run(runner.run_group(envs, task(), worker, Sampling(max_tokens=10), "g4"))
    for outcome in outcomes:
        t = outcome.trajectory
        assert t is not None, outcome.error
        assert (t.reward, t.truncated, t.reward_info["unfinished"]) == (-0.5, True, why)
        assert t.loss_mask.sum() > 0 and len(t.prompt_ids) + len(t.completion_ids) <= max_model_len


def test_a_prompt_that_leaves_no_room_is_dropped_as_such(worker, tiny_model: str) -> None:
    runner = EpisodeRunner(ChatRenderer(AutoTokenizer.from_pretrained(tiny_model)), "episode-test", 8)
    outcome = asyncio.run(
        runner.run(ArithmeticEnv(ArithmeticParams(n_train=5)), task(), worker, Sampling(max_tokens=10), "g5")
    )
    assert outcome.trajectory is None and outcome.kind == "prompt_too_long"


class CheckAgainEnv(ArithmeticEnv):
    """Arithmetic over three turns: the first two replies are answered with a request to check the
    answer, the third is graded."""

    max_turns = 3
    CHECK = "Check your answer and reply again."

    def __init__(self, params: ArithmeticParams) -> None:
        super().__init__(params)
        self.turn = 0

    async def step(self, action):
        self.turn += 1
        if self.turn < self.max_turns:
            check = Message(role="user", content=self.CHECK)
            return StepResult(done=False, observation=Observation(messages=[check]))
        return await super().step(action)


def test_a_multi_turn_episode_renders_environment_turns_in_context(worker, tiny_model: str) -> None:
    """Issue #9, defect 3, on the real engine with the demo tokenizer (ChatML, EOS = end of turn):
    each environment turn is the rest of the model's turn's close (all of `<|im_end|>\\n`, or the
    `\\n` after a sampled `<|im_end|>`), the new message and the generation prompt; every turn
    stops at `<|im_end|>`."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    runner = EpisodeRunner(ChatRenderer(tok), "episode-test", 512)
    counting, params = CountingWorker(worker), ArithmeticParams(n_train=5)
    outcomes = asyncio.run(
        runner.run_group([CheckAgainEnv(params) for _ in range(2)], task(), counting, Sampling(max_tokens=8), "g6")
    )
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert counting.calls == [2, 1, 1, 1, 1]
    assert all(im_end in stops for stops in counting.stops)
    encode = functools.partial(tok.encode, add_special_tokens=False)
    for outcome in outcomes:
        t = outcome.trajectory
        assert t is not None and t.reward is not None, outcome.error
        assert t.prompt_ids.tolist() == encode(
            f"<|im_start|>user\n{task().prompt[0].content}<|im_end|>\n<|im_start|>assistant\n"
        )
        pairs = zip(t.completion_ids.tolist(), t.loss_mask.tolist(), strict=True)
        runs = [list(run) for _, run in itertools.groupby(pairs, key=lambda pair: pair[1])]
        assert [run[0][1] for run in runs] == [1, 0, 1, 0, 1]
        for model, env in zip(runs[0::2], runs[1::2], strict=False):
            close = "" if model[-1][0] == im_end else "<|im_end|>"
            said = f"{close}\n<|im_start|>user\n{CheckAgainEnv.CHECK}<|im_end|>\n<|im_start|>assistant\n"
            assert [i for i, _ in env] == encode(said)
