"""`EpisodeRunner`: drives episodes token in / token out and emits one `Trajectory` each; a
group's episodes share their first request.

The conversation is never decoded and re-encoded between turns: the prompt is rendered once, each
model turn appends exactly the sampled tokens, and each environment turn appends the rendering of
only the new messages. What the learner trains on is therefore exactly what the sampler saw.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from envs.base import Action, Environment, Message, StepResult, Task
from rl.trajectory import Trajectory
from workers.rollout import Generation, Sampling


class ChatRenderer:
    """Renders chat messages to token ids with the model's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        probe = "\x00PROBE\x00"
        # The text the template puts between the end of an assistant turn (its EOS, which the
        # model samples) and the next messages: everything after "probe<eos>" in a rendering.
        rendered = self._text([Message(role="assistant", content=probe)], add_generation_prompt=False)
        self._after_eos = rendered.split(probe + tokenizer.eos_token, 1)[-1] if probe in rendered else ""

    def _text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt(self, messages: list[Message]) -> list[int]:
        """Token ids of the first prompt, ending with the assistant's generation header."""
        return self.encode(self._text(messages, add_generation_prompt=True))

    def followup(self, messages: list[Message], model_ended_with_eos: bool) -> list[int]:
        """Token ids appended after a model turn: closing the turn if the model did not, then the
        new messages and the next assistant header."""
        head = "" if model_ended_with_eos else self.tokenizer.eos_token
        return self.encode(head + self._after_eos + self._text(messages, add_generation_prompt=True))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class EpisodeOutcome(BaseModel):
    """A finished episode: its trajectory, or why it has none."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    trajectory: Trajectory | None
    """None when no reward could be computed (the sample is dropped and counted)."""
    error: str | None = None
    """Why there is no trajectory."""
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


class EpisodeRunner:
    """Runs episodes of any environment against a rollout worker (a Ray actor handle or a local
    `RolloutWorker`)."""

    def __init__(self, renderer: ChatRenderer, run_id: str, max_model_len: int) -> None:
        self.renderer = renderer
        self.run_id = run_id
        self.max_model_len = max_model_len

    async def run(self, env: Environment, task: Task, worker: Any, sampling: Sampling,
                  group_id: str) -> EpisodeOutcome:
        """One episode; `env.close()` always runs."""
        return (await self.run_group([env], task, worker, sampling, group_id))[0]

    async def run_group(self, envs: list[Environment], task: Task, worker: Any, sampling: Sampling,
                        group_id: str) -> list[EpisodeOutcome]:
        """One episode of `task` per environment; every `env.close()` always runs.

        When the episodes open with the same prompt (they do unless `reset` is randomised), their
        first turns are sampled as one n-sample request: one actor call and one prefill for the
        group instead of one per episode. Later turns diverge and are sampled one by one."""
        start = time.perf_counter()
        try:
            observations = await asyncio.gather(*(env.reset(task) for env in envs))
            prompts = [self.renderer.prompt(obs.messages) for obs in observations]
            firsts, first_s = await self._shared_first_turns(prompts, worker, sampling)
            runs = await asyncio.gather(*(
                self._turns(env, prompt, first, first_s, worker, sampling)
                for env, prompt, first in zip(envs, prompts, firsts, strict=True)))
        finally:
            await asyncio.gather(*(env.close() for env in envs))
        return [self._outcome(env, task, group_id, prompt, run, start)
                for env, prompt, run in zip(envs, prompts, runs, strict=True)]

    async def _shared_first_turns(self, prompts: list[list[int]], worker: Any,
                                  sampling: Sampling) -> tuple[list[Generation | None], float]:
        """The first model turn of every episode as one request when all prompts are equal;
        otherwise no turn (each episode samples its own)."""
        budget = self.max_model_len - len(prompts[0])
        if len(prompts) == 1 or budget <= 0 or any(p != prompts[0] for p in prompts[1:]):
            return [None] * len(prompts), 0.0
        turn = sampling.model_copy(update={"n": len(prompts), "max_tokens": min(sampling.max_tokens, budget)})
        t0 = time.perf_counter()
        gens = await _generate(worker, prompts[0], turn)
        return list(gens), time.perf_counter() - t0

    async def _turns(self, env: Environment, prompt_ids: list[int], first: Generation | None, first_s: float,
                     worker: Any, sampling: Sampling) -> tuple[_Buffer, StepResult | None, float, bool]:
        """The episode's turns after `reset`; `first`, when given, is its already-sampled first turn."""
        buf, result, gen_s, truncated = _Buffer(), None, first_s, False
        for _ in range(env.max_turns):
            budget = self.max_model_len - len(prompt_ids) - len(buf.ids)
            if budget <= 0:
                break
            if first is not None:
                gen, first = first, None
            else:
                turn = sampling.model_copy(update={"n": 1, "max_tokens": min(sampling.max_tokens, budget)})
                t0 = time.perf_counter()
                gen = (await _generate(worker, prompt_ids + buf.ids, turn))[0]
                gen_s += time.perf_counter() - t0
            buf.add_model(gen)
            truncated = gen.finish_reason == "length"
            action = Action(text=self.renderer.decode(gen.token_ids), token_ids=gen.token_ids, truncated=truncated)
            result = await env.step(action)
            if result.done:
                break
            ended = bool(gen.token_ids) and gen.token_ids[-1] == self.renderer.eos_id
            buf.add_env(self.renderer.followup(result.observation.messages, ended))
        return buf, result, gen_s, truncated

    def _outcome(self, env: Environment, task: Task, group_id: str, prompt_ids: list[int],
                 run: tuple[_Buffer, StepResult | None, float, bool], start: float) -> EpisodeOutcome:
        buf, result, gen_s, truncated = run
        if result is None or not result.done:
            return EpisodeOutcome(trajectory=None, error="episode did not finish within the model's "
                                  "turn or length limits", generate_s=gen_s)
        if result.reward is None:
            return EpisodeOutcome(trajectory=None, error=str(result.info.get("error", "no reward")),
                                  info=_jsonable(result.info), generate_s=gen_s)
        traj = Trajectory(
            id=uuid.uuid4().hex, run_id=self.run_id, env=env.name, task_id=task.id, group_id=group_id,
            group_size=0, prompt_ids=np.array(prompt_ids), completion_ids=np.array(buf.ids),
            loss_mask=np.array(buf.mask), sampler_logprobs=np.array(buf.logprobs),
            policy_versions=np.array(buf.versions), reward=result.reward, reward_info=_jsonable(result.info),
            timings={"generate": gen_s, "episode": time.perf_counter() - start}, truncated=truncated)
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

