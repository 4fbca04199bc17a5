"""Self-debug: the model writes code, sees how it did on the public tests, and revises.

Each turn the reply's program runs on the public tests (the problem's examples: APPS samples, or
the first `n_public` hidden tests) and the model is shown, per test, the input, the expected
value and what its program produced. The episode ends when the public tests all pass or the turn
budget is spent; the reward is then the hidden tests' verdict on the last program. Any code
dataset environment (`mbpp`, `humaneval`, `apps`, ...) can be the source of problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from envs.base import Action, Message, Observation, StepResult, Task
from envs.code import CodeEnv, CodeParams, grade_info
from envs.registry import get_env, register_env
from reward.code import CodeTests, GradeResult, first_tests
from reward.code_harness import decode

MAX_TURNS = 8
FEEDBACK_CHARS = 300


class SelfDebugParams(CodeParams):
    """Parameters of the self-debug environment."""

    dataset: str = "mbpp"
    """The code environment whose problems are used (e.g. mbpp, humaneval, apps, leetcode)."""
    turns: int = Field(3, ge=1, le=MAX_TURNS)
    """Model turns at most; the last one is graded on the hidden tests whatever the public say."""
    n_public: int = Field(1, ge=1)
    """Public tests taken from the head of the hidden tests when the problem has no examples."""


def _clip(text: str) -> str:
    return text if len(text) <= FEEDBACK_CHARS else text[: FEEDBACK_CHARS - 3] + "..."


def feedback(tests: CodeTests, result: GradeResult, turns_left: int) -> str:
    """The message telling the model how its program did on the public tests."""
    lines = [f"Your program passed {result.passed} of {result.total} example tests."]
    for i, outcome in enumerate(result.outcomes):
        if tests.mode == "call":
            shown_input = tests.probes[i]
            wanted = tests.expected[i][0] if tests.alternatives else tests.expected[i]
            expected = repr(decode(wanted))
        else:
            shown_input, expected = tests.inputs[i], tests.expected[i]
        got = outcome.error or outcome.got or ""
        verdict = "passed" if outcome.passed else "FAILED"
        lines.append(
            f"Test {i + 1} {verdict}:\n  input: {_clip(shown_input)}\n"
            f"  expected: {_clip(str(expected))}\n  got: {_clip(got)}"
        )
    lines.append(
        f"Fix the program ({turns_left} turn(s) left) and reply with the complete "
        "corrected code in a ```python code block."
    )
    return "\n".join(lines)


@register_env("self_debug")
class SelfDebugEnv(CodeEnv):
    """Multi-turn self-debugging on code problems: public-test feedback, hidden-test reward."""

    Params = SelfDebugParams
    max_turns: ClassVar[int] = MAX_TURNS

    @classmethod
    def source(cls, params: SelfDebugParams) -> type[CodeEnv]:
        """The code environment class that supplies the problems."""
        source = get_env(params.dataset)
        if not issubclass(source, CodeEnv) or issubclass(source, SelfDebugEnv):
            raise ValueError(f"self_debug dataset {params.dataset!r} is not a code environment.")
        return source

    @classmethod
    def load_tasks(cls, params: SelfDebugParams, data: Path | None, split: str) -> Sequence[Task]:
        source = cls.source(params)
        inner = source.Params.model_validate(params.model_dump(include=set(CodeParams.model_fields)))
        note = (
            "\nYou will see your program's results on the example tests and may revise it "
            f"up to {params.turns - 1} time(s)."
        )
        return [
            t.model_copy(update={"prompt": [Message(role="user", content=t.prompt[0].content + note)]})
            for t in source.load_tasks(inner, data, split)
        ]

    async def reset(self, task: Task) -> Observation:
        self.turn = 0
        return await super().reset(task)

    async def public_tests(self) -> CodeTests:
        """The problem's examples, or the first `n_public` hidden tests (filled in if needed)."""
        from reward.code_run import materialize

        if "public" in self.task.hidden:
            return CodeTests.model_validate(self.task.hidden["public"])
        hidden = CodeTests.model_validate(self.task.hidden["tests"])
        hidden = await materialize(await self.pool(), hidden, self.params.limits)
        return first_tests(hidden, self.params.n_public)

    async def step(self, action: Action) -> StepResult:
        from reward.code_run import ReferenceFailed, SandboxFailed

        self.turn += 1
        program = self.program(action.text)
        if self.turn < self.params.turns:
            try:
                public = await self.public_tests()
            except (ReferenceFailed, SandboxFailed) as exc:
                return StepResult(done=True, reward=None, info={"error": str(exc), "turns": self.turn})
            result = await self.run_tests(public, program)
            if result.reward is None:
                return StepResult(done=True, reward=None, info={**grade_info(result), "turns": self.turn})
            if result.passed < result.total:
                text = feedback(public, result, self.params.turns - self.turn)
                return StepResult(
                    done=False,
                    observation=Observation(messages=[Message(role="user", content=text)]),
                    info={"public_passed": result.passed, "public_total": result.total},
                )
        final = await self.run_tests(CodeTests.model_validate(self.task.hidden["tests"]), program)
        return StepResult(done=True, reward=final.reward, info={**grade_info(final), "turns": self.turn})
