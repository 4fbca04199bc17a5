"""Synthetic arithmetic with difficulty knobs: the demo's task family.

Problems are `a<op>b=?`; the answer is expected as `\\boxed{result}`. The held-out (test) split is
drawn first and excluded from the train split, so held-out accuracy measures generalisation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, model_validator

from envs.base import EnvParams, Message, Task
from envs.math import BoxedAnswerEnv
from envs.registry import register_env


class ArithmeticParams(EnvParams):
    min_digits: int = Field(1, ge=1)
    """Fewest digits of an operand."""
    max_digits: int = Field(2, ge=1)
    """Most digits of an operand."""
    ops: str = "+-*"
    """Operators to draw from (any of + - *)."""
    mul_max_digits: int = Field(1, ge=1)
    """Most digits of the second factor of a product (keeps products learnable)."""
    n_train: int = Field(20000, ge=1)
    """Train tasks (drawn with replacement from the problems not held out)."""
    n_test: int = Field(500, ge=1)
    """Held-out tasks."""
    seed: int = 1234
    """Seed of the problem draw (independent of the run's seed)."""

    @model_validator(mode="after")
    def _check(self) -> ArithmeticParams:
        if self.min_digits > self.max_digits or not self.ops or set(self.ops) - set("+-*"):
            raise ValueError("need min_digits <= max_digits and ops made of + - *.")
        return self


def _operand(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    digits = rng.randint(lo_digits, hi_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _draw(rng: random.Random, p: ArithmeticParams) -> tuple[str, int]:
    op = rng.choice(p.ops)
    a = _operand(rng, p.min_digits, p.max_digits)
    b = _operand(rng, 1, p.mul_max_digits) if op == "*" else _operand(rng, p.min_digits, p.max_digits)
    return f"{a}{op}{b}", {"+": a + b, "-": a - b, "*": a * b}[op]


def _task(expr: str, result: int, index: int, split: str) -> Task:
    return Task(
        id=f"arith-{split}-{index}",
        prompt=[Message(role="user", content=f"{expr}=?")],
        hidden={"answer": str(result)},
        meta={"expr": expr},
    )


@register_env("arithmetic")
class ArithmeticEnv(BoxedAnswerEnv):
    """`a<op>b=?` → `\\boxed{result}`, graded by math-verify."""

    Params = ArithmeticParams

    @classmethod
    def load_tasks(cls, params: ArithmeticParams, data: Path | None, split: str) -> Sequence[Task]:
        test_rng = random.Random(f"{params.seed}-test")
        held_out: dict[str, int] = {}
        for _ in range(50 * params.n_test):
            if len(held_out) == params.n_test:
                break
            expr, result = _draw(test_rng, params)
            held_out.setdefault(expr, result)
        if split != "train":
            return [_task(e, r, i, "test") for i, (e, r) in enumerate(held_out.items())]
        rng, tasks = random.Random(f"{params.seed}-train"), []
        while len(tasks) < params.n_train:
            expr, result = _draw(rng, params)
            if expr not in held_out:
                tasks.append(_task(expr, result, len(tasks), "train"))
        return tasks
