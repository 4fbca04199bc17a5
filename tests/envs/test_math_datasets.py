"""The `math` environment reads every public math file of the shared data: MATH (full), AIME 2024,
AIME 1983-2023 and AMC23 besides MATH-500 and GSM8K; gold answers pass the verifier."""

from __future__ import annotations

import json

import pytest

from envs.base import Action
from envs.data import data_root
from envs.registry import get_env

ENV = get_env("math")


def _tasks(path: str, **params):
    return ENV.load_tasks(ENV.Params(**params), data_root() / path, "test")


@pytest.mark.parametrize(
    ("path", "count", "first_id", "first_answer"),
    [
        ("math/test.jsonl", 5000, "test/algebra/1.json", "2"),
        ("math/train.jsonl", 7496, "train/algebra/0.json", "0"),  # 2 box nothing, 2 box ""
        ("aime2024/test.jsonl", 30, "60", "204"),
        ("aime_1983_2023/aime.json", 975, "aime-1983-1-1", "60"),
        ("amc23/test.jsonl", 40, "0", "27"),  # stored as 27.0
        ("math_train_answers/math.json", 7470, "math-0", "0"),  # 4 empty or null answers
    ],
)
def test_public_math_files_load(path: str, count: int, first_id: str, first_answer: str) -> None:
    tasks = _tasks(path)
    assert len(tasks) == count and len({t.id for t in tasks}) == count
    assert (tasks[0].id, tasks[0].hidden["answer"]) == (first_id, first_answer)
    assert all(t.hidden["answer"] not in ("", "None") for t in tasks)


def test_full_math_answer_is_the_last_boxed_of_the_solution() -> None:
    rows = [json.loads(line) for line in (data_root() / "math" / "test.jsonl").open()]
    nested = next(r for r in rows if "\\boxed{\\frac" in r["solution"])
    task = next(t for t in _tasks("math/test.jsonl") if t.id == nested["unique_id"])
    answer = task.hidden["answer"]
    assert answer.startswith("\\frac{") and answer.count("{") == answer.count("}")


def test_math500_is_a_subset_of_full_math_test() -> None:
    full = {t.id: t.hidden["answer"] for t in _tasks("math/test.jsonl")}
    subset = _tasks("math500/test.jsonl")
    assert all(t.id in full for t in subset)


@pytest.mark.asyncio
async def test_integer_gold_answers_verify_and_wrong_ones_do_not() -> None:
    tasks = list(_tasks("aime2024/test.jsonl", limit=4)) + list(_tasks("amc23/test.jsonl", limit=4))
    for task in tasks:
        env = ENV(ENV.Params())
        await env.reset(task)
        right = await env.step(Action(text=await env.gold_output(task), token_ids=[]))
        wrong = await env.step(Action(text=f"\\boxed{{{int(task.hidden['answer']) + 1}}}", token_ids=[]))
        assert (right.reward, wrong.reward) == (1.0, 0.0), task.id
