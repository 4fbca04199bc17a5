"""An environment plugin shipped with the cluster test's Ray job (its working_dir), registered
through the `codeworld.envs` entry point of the dist-info beside it, as a pip package would be.

`reply-length-sandboxed`: reward = the reply's length in bytes / 40, counted by a program in a
sandbox, so every episode runs one sandbox. A random tiny model earns varied rewards on it, so
every group carries gradient."""

from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from envs.base import Action, EnvParams, Environment, Message, Observation, StepResult, Task
from envs.code import SandboxParams, sandbox_pool
from workers.sandbox import ExecRequest, Status


class Params(EnvParams):
    sandbox: SandboxParams = Field(default_factory=SandboxParams)
    """Which sandbox pool counts the bytes."""


class ReplyLengthSandboxed(Environment):
    Params = Params

    @classmethod
    def load_tasks(cls, params: Params, data: Path | None, split: str) -> Sequence[Task]:
        return [Task(id=f"t{i}", prompt=[Message(role="user", content=f"{i}+7=?")]) for i in range(50)]

    async def reset(self, task: Task) -> Observation:
        return Observation(messages=task.prompt)

    async def step(self, action: Action) -> StepResult:
        pool = await sandbox_pool(self.params.sandbox)
        count = "import sys; print(len(sys.stdin.buffer.read()))"
        result = await pool.run(ExecRequest(command=["python3", "-c", count], stdin=action.text.encode()))
        if result.status is not Status.OK:
            return StepResult(done=True, reward=None, info={"status": result.status.value, "error": result.error})
        return StepResult(done=True, reward=int(result.stdout) / 40, info={"status": "ok", "sandbox_s": result.wall_s})
