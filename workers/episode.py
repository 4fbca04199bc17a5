"""`EpisodeRunner`: drives episodes token in / token out and emits one `Trajectory` each; a
group's episodes share their first request.

The conversation is never decoded and re-encoded between turns: the prompt is rendered once, each
model turn appends exactly the sampled tokens (every turn stops at the chat template's end-of-turn
token), and each environment turn appends what the template renders between the model's text and
the next generation header in the whole conversation (`workers.chat.ChatRenderer.followup`). What
the learner trains on is therefore exactly what the sampler saw.

An exception out of an environment's `reset` or `step` is that sample's infrastructure failure:
the episode gets no trajectory, with the error's kind (`env_error:ValueError`) for the drop
counters, and the group's other episodes run on; only `EnvConfigError` ends the run.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from envs.base import Action, EnvConfigError, Environment, StepResult, Task
from rl.trajectory import Trajectory
from workers.chat import ChatRenderer
from workers.rollout import Generation, Sampling

log = logging.getLogger(__name__)


class EpisodeOutcome(BaseModel):
    """A finished episode: its trajectory, or why it has none."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    trajectory: Trajectory | None
    """None when no reward could be computed (the sample is dropped and counted)."""
    error: str | None = None
    """Why there is no trajectory."""
    kind: str | None = None
    """Why there is no trajectory, as a key for counting drops: `env_error:<ExceptionType>` (the
    environment raised), `env_reward_none` (it gave no reward) or `prompt_too_long` (the prompt
    left no room for a single token)."""
    info: dict[str, Any] = {}
    """The environment's last `StepResult.info` when there is no trajectory (the trajectory carries
    it as `reward_info` otherwise): health metrics read the sandbox status from it."""
    generate_s: float = 0.0
    """Seconds spent waiting on the engine."""


class _Buffer:
    """Completion tokens with their per-token mask, sampler logprobs and versions."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []

    def add_model(self, gen: Generation) -> None:
        self.ids += gen.token_ids
        self.mask += [1] * len(gen.token_ids)
        self.logprobs += gen.logprobs
        self.versions += gen.versions

    def add_env(self, ids: list[int]) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)


@dataclass
class _Run:
    """What `_turns` leaves for `_outcome`: the tokens, the last step, and how the episode ended."""

    buf: _Buffer
    result: StepResult | None = None
    gen_s: float = 0.0
    truncated: bool = False
    failure: tuple[str, str] | None = None
    """(kind, message) when the environment raised."""
    unfinished: str | None = None
    """Why the environment never finished the episode ("context" or "turns"): the policy's doing."""


async def _env_call(coro: Awaitable[Any], what: str) -> tuple[Any, tuple[str, str] | None]:
    """Await an environment's `reset` or `step`. An exception out of it fails that sample only
    (an infrastructure failure: no reward, counted by kind); one sample's failure never ends the
    run. EnvConfigError does end it: a configuration that fails every sample must not be hidden."""
    try:
        value = await coro
        if isinstance(value, StepResult) and not value.done and value.observation is None:
            raise ValueError("step() returned done=False without an observation")
        return value, None
    except EnvConfigError:
        raise
    except Exception as exc:
        log.warning("environment %s raised; the sample gets no reward", what, exc_info=True)
        return None, (f"env_error:{type(exc).__name__}", f"{what} raised {type(exc).__name__}: {exc}"[:500])


class EpisodeRunner:
    """Runs episodes of any environment against a rollout worker (a Ray actor handle or a local
    `RolloutWorker`)."""

    def __init__(self, renderer: ChatRenderer, run_id: str, max_model_len: int, unfinished_reward: float = 0.0) -> None:
        """`unfinished_reward`: the reward of an episode the policy let run out of context or turns
        before the environment finished it (a policy failure: scored, never dropped)."""
        self.renderer = renderer
        self.run_id = run_id
        self.max_model_len = max_model_len
        self.unfinished_reward = unfinished_reward

    async def run(self, env: Environment, task: Task, worker: Any, sampling: Sampling, group_id: str) -> EpisodeOutcome:
        """One episode; `env.close()` always runs."""
        return (await self.run_group([env], task, worker, sampling, group_id))[0]

    async def run_group(
        self, envs: list[Environment], task: Task, worker: Any, sampling: Sampling, group_id: str
    ) -> list[EpisodeOutcome]:
        """One episode of `task` per environment; every `env.close()` always runs.

        When the episodes open with the same prompt (they do unless `reset` is randomised), their
        first turns are sampled as one n-sample request: one actor call and one prefill for the
        group instead of one per episode. Later turns diverge and are sampled one by one. Every
        turn stops at the chat template's end-of-turn tokens as well as at `sampling`'s own."""
        start = time.perf_counter()
        stops = [t for t in self.renderer.end_of_turn_ids if t not in sampling.stop_token_ids]
        sampling = sampling.model_copy(update={"stop_token_ids": [*sampling.stop_token_ids, *stops]})
        runs: list[_Run] = [_Run(_Buffer()) for _ in envs]
        prompts: list[list[int]] = [[] for _ in envs]
        try:
            resets = await asyncio.gather(*(_env_call(env.reset(task), "reset") for env in envs))
            live = [i for i, (_, failure) in enumerate(resets) if failure is None]
            for i, (obs, failure) in enumerate(resets):
                if failure is None:
                    prompts[i] = self.renderer.prompt(obs.messages)
                else:
                    runs[i].failure = failure
            if live:
                firsts, first_s = await self._shared_first_turns([prompts[i] for i in live], worker, sampling)
                done = await asyncio.gather(
                    *(
                        self._turns(envs[i], prompts[i], first, first_s, worker, sampling)
                        for i, first in zip(live, firsts, strict=True)
                    )
                )
                for i, run in zip(live, done, strict=True):
                    runs[i] = run
        finally:
            closed = await asyncio.gather(*(env.close() for env in envs), return_exceptions=True)
            for error in closed:
                if isinstance(error, Exception):
                    log.warning("environment close() raised %r; the episode's outcome stands", error)
                elif isinstance(error, BaseException):
                    raise error
        return [
            self._outcome(env, task, group_id, prompt, run, start)
            for env, prompt, run in zip(envs, prompts, runs, strict=True)
        ]

    async def _shared_first_turns(
        self, prompts: list[list[int]], worker: Any, sampling: Sampling
    ) -> tuple[list[Generation | None], float]:
        """The first model turn of every episode as one request when all prompts are equal;
        otherwise no turn (each episode samples its own)."""
        budget = self.max_model_len - len(prompts[0])
        if len(prompts) == 1 or budget <= 0 or any(p != prompts[0] for p in prompts[1:]):
            return [None] * len(prompts), 0.0
        turn = sampling.model_copy(update={"n": len(prompts), "max_tokens": min(sampling.max_tokens, budget)})
        t0 = time.perf_counter()
        gens = await _generate(worker, prompts[0], turn)
        return list(gens), time.perf_counter() - t0

    async def _turns(
        self,
        env: Environment,
        prompt_ids: list[int],
        first: Generation | None,
        first_s: float,
        worker: Any,
        sampling: Sampling,
    ) -> _Run:
        """The episode's turns after `reset`; `first`, when given, is its already-sampled first turn."""
        run = _Run(_Buffer(), gen_s=first_s, unfinished="turns")
        buf = run.buf
        for _ in range(env.max_turns):
            budget = self.max_model_len - len(prompt_ids) - len(buf.ids)
            if budget <= 0:
                run.unfinished = "context"
                break
            if first is not None:
                gen, first = first, None
            else:
                turn = sampling.model_copy(update={"n": 1, "max_tokens": min(sampling.max_tokens, budget)})
                t0 = time.perf_counter()
                gen = (await _generate(worker, prompt_ids + buf.ids, turn))[0]
                run.gen_s += time.perf_counter() - t0
            buf.add_model(gen)
            run.truncated = gen.finish_reason == "length"
            action = Action(text=self.renderer.decode(gen.token_ids), token_ids=gen.token_ids, truncated=run.truncated)
            run.result, run.failure = await _env_call(env.step(action), "step")
            if run.failure is not None or run.result.done:
                run.unfinished = None
                break
            followup = self.renderer.followup(run.result.observation.messages, gen.token_ids)
            if len(prompt_ids) + len(buf.ids) + len(followup) >= self.max_model_len:
                run.unfinished = "context"  # no room left for a reply: the environment's turn is not kept
                break
            buf.add_env(followup)
        return run

    def _outcome(
        self, env: Environment, task: Task, group_id: str, prompt_ids: list[int], run: _Run, start: float
    ) -> EpisodeOutcome:
        buf, result, gen_s = run.buf, run.result, run.gen_s
        if run.failure is not None:
            kind, message = run.failure
            return EpisodeOutcome(trajectory=None, error=message, kind=kind, generate_s=gen_s)
        if run.unfinished is not None:
            if not any(buf.mask):
                return EpisodeOutcome(
                    trajectory=None,
                    error="the prompt leaves no room for the model to reply within max_model_len",
                    kind="prompt_too_long",
                    generate_s=gen_s,
                )
            # The policy ran out of context or turns: its failure, scored (never dropped, which
            # would bias the group's baseline up and never punish rambling) and flagged truncated.
            result = StepResult(
                done=True,
                reward=self.unfinished_reward,
                info={"unfinished": run.unfinished, **(result.info if result else {})},
            )
            run.truncated = True
        if result.reward is None:
            return EpisodeOutcome(
                trajectory=None,
                error=str(result.info.get("error", "no reward")),
                kind="env_reward_none",
                info=_jsonable(result.info),
                generate_s=gen_s,
            )
        reward = env.shape_reward(result.reward, sum(buf.mask))
        if reward != result.reward:
            result = result.model_copy(update={"info": {**result.info, "verified_reward": result.reward}})
        traj = Trajectory(
            id=uuid.uuid4().hex,
            run_id=self.run_id,
            env=env.name,
            task_id=task.id,
            group_id=group_id,
            group_size=0,
            prompt_ids=np.array(prompt_ids),
            completion_ids=np.array(buf.ids),
            loss_mask=np.array(buf.mask),
            sampler_logprobs=np.array(buf.logprobs),
            policy_versions=np.array(buf.versions),
            reward=reward,
            reward_info=_jsonable(result.info),
            timings={"generate": gen_s, "episode": time.perf_counter() - start},
            truncated=run.truncated,
        )
        return EpisodeOutcome(trajectory=traj, generate_s=gen_s)


async def _generate(worker: Any, prompt_ids: list[int], sampling: Sampling) -> list[Generation]:
    """Call a Ray actor handle or an in-process worker alike."""
    method = worker.generate
    return await (method.remote(prompt_ids, sampling) if hasattr(method, "remote") else method(prompt_ids, sampling))


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    """Keep reward_info msgpack-safe: string keys, primitive leaves (others become strings)."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)

    return clean(info)
