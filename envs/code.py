"""Competitive-programming environments: the model writes code, hidden tests run in a sandbox.

One turn. The reply's last ```python block becomes the program (placed after the problem's
prefix, e.g. HumanEval's prompt with its imports and helpers); `reward.code_run.grade` runs it on
the hidden tests' inputs in the sandbox and compares the outputs on the host. Reward: 1 when
every test passes (default) or the fraction passed; None when the sandbox failed.

Registered: `humaneval`, `mbpp`, `mbpp_plus`, `leetcode`, `apps` (function-call tests, and
stdin/stdout tests for APPS problems without a starter signature).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from envs.base import Action, EnvParams, Environment, Message, Observation, StepResult, Task
from envs.code_datasets import (
    CodeProblem,
    load_apps,
    load_humaneval,
    load_leetcode,
    load_mbpp,
    load_mbpp_plus,
)
from envs.data import resolve
from envs.registry import register_env
from reward.code import CodeTests, ExecLimits, GradeResult
from workers.sandbox.choice import SandboxService

DEFAULT_IMAGE = "codeworld-sandbox:py311"


class SandboxParams(BaseModel):
    """Which sandbox pool grades the programs."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["docker", "local", "auto"] = "auto"
    """"docker" (hardened containers), "local" (bubblewrap/rlimits) or "auto" (docker if up)."""
    image: str = DEFAULT_IMAGE
    """Docker image of the sandboxes (built by `codeworld sandbox build-image`)."""
    size: int = Field(2, ge=1)
    """Warm sandboxes in the pool (shared by all episodes of this process and event loop)."""
    local_isolation: Literal["bwrap", "rlimit"] | None = None
    """Local backend only: "bwrap" (namespaces, required), "rlimit" (none: where bubblewrap
    cannot create namespaces) or None (bubblewrap when installed)."""
    allow_unisolated: bool = False
    """Accept a pool that isolates programs by rlimits only (they can read the host's files, the
    answers included, reach the network and signal the trainer's processes). Off: such a pool
    is refused when it starts; on: every step's info says `"isolation": "rlimit"`."""
    service: SandboxService = Field(default_factory=SandboxService)
    """Where the pool lives: this process, a pool actor per node of the Ray cluster, or a sandbox
    service (`workers.sandbox.choice`)."""


class CodeParams(EnvParams):
    """Parameters shared by the code environments."""

    reward_mode: Literal["all", "fraction"] = "all"
    """"all": 1 only if every hidden test passes; "fraction": the share of tests passed."""
    limits: ExecLimits = Field(default_factory=ExecLimits)
    """Time, memory and output limits of one grading run."""
    sandbox: SandboxParams = Field(default_factory=SandboxParams)
    """Which sandbox pool runs the programs."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N problems of the file."""


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python (or untagged) code block of a reply; an unclosed last block counts
    (generation may stop at the token limit); the whole reply when it has no block."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3", "")]
    return python[-1] if python else text


def build_program(prefix: str, reply: str) -> str:
    """The program to run: the prefix, then the reply's code. A reply that is only a function
    body (its first line indented) continues the prefix's last function directly."""
    code = extract_code(reply)
    first = next((line for line in code.splitlines() if line.strip()), "")
    if prefix and first[:1] in (" ", "\t"):
        return prefix + code
    return f"{prefix}\n\n{code}" if prefix else code


def problem_to_task(problem: CodeProblem) -> Task:
    """A `CodeProblem` as a `Task`: the statement is the prompt; tests and gold stay hidden."""
    hidden: dict[str, Any] = {"tests": problem.tests.model_dump(), "prefix": problem.prefix, "gold": problem.gold}
    if problem.public is not None:
        hidden["public"] = problem.public.model_dump()
    return Task(
        id=problem.id, prompt=[Message(role="user", content=problem.statement)], hidden=hidden, meta=problem.meta
    )


class CodeEnv(Environment):
    """Base of the single-turn code environments; a subclass names its loader and default file."""

    Params = CodeParams
    loader: ClassVar[Callable[[Path], list[CodeProblem]]]
    """Reads the dataset file into problems."""
    default_file: ClassVar[str]
    """The file under the data root used when no `data` path is given."""

    @classmethod
    def load_tasks(cls, params: CodeParams, data: Path | None, split: str) -> Sequence[Task]:
        """The problems of the file (these benchmarks ship one split: `split` is not used).
        A row whose id repeats an earlier row's is left out (22 rows of the APPS subset)."""
        unique: dict[str, CodeProblem] = {}
        for problem in cls.loader(resolve(data, cls.default_file)):
            unique.setdefault(problem.id, problem)
        return [problem_to_task(p) for p in list(unique.values())[: params.limit]]

    async def reset(self, task: Task) -> Observation:
        self.task = task
        return Observation(messages=task.prompt)

    def program(self, reply: str) -> str:
        """The program a reply stands for, on this episode's task."""
        return build_program(self.task.hidden["prefix"], reply)

    async def pool(self):
        """This process's shared sandbox pool for the configured backend and image; refused
        (EnvConfigError) when it isolates by rlimits only and the config does not accept that."""
        return await sandbox_pool(self.params.sandbox)

    async def run_tests(self, tests: CodeTests, program: str) -> GradeResult:
        """Grade `program` on `tests` in the shared sandbox pool."""
        from reward.code_run import grade

        return await grade(await self.pool(), tests, program, self.params.limits, self.params.reward_mode)

    async def step(self, action: Action) -> StepResult:
        tests = CodeTests.model_validate(self.task.hidden["tests"])
        result = await self.run_tests(tests, self.program(action.text))
        return StepResult(done=True, reward=result.reward, info=grade_info(result))

    async def gold_output(self, task: Task) -> str | None:
        """A reply made of the dataset's own solution (for `codeworld envs validate`)."""
        gold = task.hidden.get("gold")
        return None if gold is None else f"```python\n{gold}\n```"


async def sandbox_pool(params: SandboxParams):
    """The shared pool `params` asks for, its isolation checked against `allow_unisolated`."""
    from envs.swe.pools import require_isolation, shared_pool

    pool = await shared_pool(params.backend, params.image, params.size, params.local_isolation, service=params.service)
    require_isolation(pool, params.allow_unisolated, "params.sandbox.allow_unisolated")
    return pool


def grade_info(result: GradeResult) -> dict[str, Any]:
    """The compact grading summary put in `StepResult.info` (with what isolated the run)."""
    failures = [o for o in result.outcomes if not o.passed]
    return {
        "passed": result.passed,
        "total": result.total,
        "status": result.status,
        "error": result.error,
        "sandbox_s": result.sandbox_s,
        "isolation": result.isolation,
        "first_failure": failures[0].model_dump() if failures else None,
    }


@register_env("humaneval")
class HumanEvalEnv(CodeEnv):
    """HumanEval: complete a function; tests recorded from the file's own `check`."""

    loader = staticmethod(load_humaneval)
    default_file = "humaneval/HumanEval.jsonl"


@register_env("mbpp")
class MBPPEnv(CodeEnv):
    """MBPP (full or sanitized): write a function; its assert tests are hidden but the first."""

    loader = staticmethod(load_mbpp)
    default_file = "mbpp/mbpp.jsonl"


@register_env("mbpp_plus")
class MBPPPlusEnv(CodeEnv):
    """MBPP+ (EvalPlus): MBPP problems with many extra inputs, judged against the reference."""

    loader = staticmethod(load_mbpp_plus)
    default_file = "mbppplus/MbppPlus-v0.1.0.jsonl"


@register_env("leetcode")
class LeetCodeEnv(CodeEnv):
    """LeetCode contest problems: complete `class Solution`; ~100 hidden tests each."""

    loader = staticmethod(load_leetcode)
    default_file = "leetcode_contest/20240121-Jul.jsonl"


@register_env("apps")
class AppsEnv(CodeEnv):
    """APPS: stdin/stdout programs, or functions when the problem gives a starter signature."""

    loader = staticmethod(load_apps)
    default_file = "apps150/selected150.jsonl"
