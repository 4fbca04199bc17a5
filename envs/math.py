"""Math environments: one turn, the final `\\boxed{}` answer checked by `reward.math`.

`BoxedAnswerEnv` is the shared single-turn logic; `MathEnv` reads the public GSM8K and MATH-500
files (and any JSONL with `problem`/`question` and `answer` fields): also the full MATH release
(answer = the last `\\boxed{}` of `solution`), AIME 2024 and 1983-2023, and AMC 2023.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from envs.base import Action, EnvParams, Environment, Message, Observation, StepResult, Task
from envs.data import read_records, resolve
from envs.registry import register_env
from reward.math import extract_boxed, extract_hashes, shared_verifier

BOXED_INSTRUCTION = "Put the final answer in \\boxed{}."


class BoxedAnswerEnv(Environment):
    """Single turn: show the prompt, grade the reply's final answer against `task.hidden["answer"]`."""

    allow_hashes: ClassVar[bool] = False

    async def reset(self, task: Task) -> Observation:
        self.task = task
        return Observation(messages=task.prompt)

    async def step(self, action: Action) -> StepResult:
        verdict = await shared_verifier().verify(
            action.text, str(self.task.hidden["answer"]), allow_hashes=self.allow_hashes
        )
        return StepResult(done=True, reward=verdict.reward, info=verdict.model_dump())

    async def gold_output(self, task: Task) -> str:
        """A reply holding the gold answer (for `codeworld envs validate`)."""
        return f"\\boxed{{{task.hidden['answer']}}}"


class MathParams(EnvParams):
    format: Literal["auto", "gsm8k", "math500"] = "auto"
    """File format; auto picks by the fields of the first row."""
    instruction: str = BOXED_INSTRUCTION
    """Appended to every problem."""
    limit: int | None = None
    """Use only the first N rows."""


def _gold_answer(row: dict[str, Any]) -> str | None:
    """The row's `answer` (AMC23 stores integers as floats: 27.0 -> "27"), else the last
    `\\boxed{}` of its `solution` (the full MATH release has no answer field); None when there
    is none or it is empty (a few MATH train solutions box nothing)."""
    answer = row["answer"] if "answer" in row else extract_boxed(row["solution"])
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    return str(answer) if answer is not None and str(answer).strip() else None


def _task_id(row: dict[str, Any], index: int) -> str:
    """`unique_id` (MATH) or `id` (AIME 2024, AMC23: 0 is an id too), else year and numbers
    (AIME 1983-2023), else the row index."""
    for key in ("unique_id", "id"):
        if row.get(key) is not None:
            return str(row[key])
    if {"year", "aime_number", "problem_number"} <= row.keys():
        return f"aime-{row['year']}-{row['aime_number']}-{row['problem_number']}"
    return f"math-{index}"


def _row_to_task(row: dict[str, Any], index: int, fmt: str, instruction: str) -> Task | None:
    """The row as a task; None for a row without a gold answer (2 of MATH train's 7,500)."""
    if fmt == "gsm8k":
        problem, answer = row["question"], extract_hashes(row["answer"])
        task_id = f"gsm8k-{index}"
    else:
        problem, answer = row.get("problem") or row["question"], _gold_answer(row)
        task_id = _task_id(row, index)
    if answer is None:
        return None
    return Task(
        id=task_id,
        prompt=[Message(role="user", content=f"{problem}\n{instruction}")],
        hidden={"answer": str(answer)},
        meta={k: row[k] for k in ("level", "subject") if k in row},
    )


@register_env("math")
class MathEnv(BoxedAnswerEnv):
    """Competition/grade-school math from a public JSONL file (GSM8K, MATH-500, ...)."""

    Params = MathParams

    @classmethod
    def load_tasks(cls, params: MathParams, data: Path | None, split: str) -> Sequence[Task]:
        path = resolve(data, "math500/test.jsonl")
        rows = read_records(path)[: params.limit]
        if not rows:
            raise ValueError(f"Dataset file {str(path)!r} has no rows.")
        fmt = params.format
        if fmt == "auto":
            fmt = "gsm8k" if "question" in rows[0] and "####" in str(rows[0].get("answer")) else "math500"
        try:
            tasks = [_row_to_task(r, i, fmt, params.instruction) for i, r in enumerate(rows)]
            return [t for t in tasks if t is not None]
        except KeyError as err:
            raise ValueError(f"{path}: rows lack the field {err.args[0]!r} of format {fmt!r}.") from None
