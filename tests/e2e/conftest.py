"""A dense-reward environment for loop tests: a random tiny model earns varied rewards on it,
so every group carries gradient (arithmetic would give all-zero groups before warm start)."""

import asyncio
from collections.abc import Sequence
from pathlib import Path

from envs.base import Action, EnvParams, Environment, Message, Observation, StepResult, Task
from envs.registry import register_env


@register_env("test-reply-length")
class ReplyLengthEnv(Environment):
    """Reward: the reply's length in characters / 40 (random tokens differ in length)."""

    @classmethod
    def load_tasks(cls, params: EnvParams, data: Path | None, split: str) -> Sequence[Task]:
        return [Task(id=f"t{i}", prompt=[Message(role="user", content=f"{i}+7=?")]) for i in range(50)]

    async def reset(self, task: Task) -> Observation:
        return Observation(messages=task.prompt)

    async def step(self, action: Action) -> StepResult:
        return StepResult(done=True, reward=len(action.text) / 40)


@register_env("test-slow-reply")
class SlowReplyEnv(ReplyLengthEnv):
    """ReplyLengthEnv whose tasks t0, t5, t10, ... take `slow_s` seconds to grade: groups that fall
    behind the learner and go stale (the long tail of multi-turn environments)."""

    class Params(EnvParams):
        slow_s: float = 0.0
        """Seconds a slow task's grading takes."""

    async def step(self, action: Action) -> StepResult:
        if self._task_id.endswith(("0", "5")):
            await asyncio.sleep(self.params.slow_s)
        return await super().step(action)

    async def reset(self, task: Task) -> Observation:
        self._task_id = task.id
        return await super().reset(task)


@register_env("test-half-flat")
class HalfFlatEnv(ReplyLengthEnv):
    """ReplyLengthEnv whose even-numbered tasks reward every reply alike (1.0): about half the
    groups carry no signal, as on the demo."""

    async def reset(self, task: Task) -> Observation:
        self._flat = int(task.id[1:]) % 2 == 0
        return await super().reset(task)

    async def step(self, action: Action) -> StepResult:
        if self._flat:
            return StepResult(done=True, reward=1.0)
        return await super().step(action)
