"""The single-turn code environments on the shared benchmark files, graded in Docker: gold
solutions pass, mutated ones fail, and hand-written solutions of gold-less datasets pass."""

from __future__ import annotations

import ast
import asyncio
import builtins
import functools
import json
import warnings
from pathlib import Path

import pytest
from conftest import DOCKER, run_episode

from envs.code import build_program, extract_code
from envs.data import data_root
from envs.registry import get_env

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")


@functools.cache
def _tasks(name: str) -> tuple:
    """The env's tasks from its default shared file, read once per test session."""
    cls = get_env(name)
    return tuple(cls.load_tasks(cls.Params.model_validate(DOCKER), None, "test"))


def _load(name: str, limit: int | None = None):
    cls = get_env(name)
    return cls, cls.Params.model_validate(DOCKER), list(_tasks(name))[:limit]


class Rewards(list):
    """Rewards of a batch of episodes; its repr also lists the non-1.0 episodes' details, so
    a failed assertion says which task failed and why."""

    def __init__(self, tasks, results) -> None:
        super().__init__(r[-1].reward for r in results)
        self.details = [(t.id, r[-1].reward, r[-1].info) for t, r in zip(tasks, results) if r[-1].reward != 1.0]

    def __repr__(self) -> str:
        return f"{list(self)!r} not-1.0: {self.details[:5]!r}"


async def _rewards(cls, params, jobs) -> Rewards:
    """Run the episodes; one whose sample was dropped (reward None: the sandbox failed, which a
    machine under heavy load can cause) is run once more, with a warning. Wrong rewards are
    never retried."""
    results = await asyncio.gather(*(run_episode(cls, params, task, reply) for task, reply in jobs))
    dropped = [i for i, r in enumerate(results) if r[-1].reward is None]
    for i in dropped:
        warnings.warn(f"{jobs[i][0].id}: sample dropped ({results[i][-1].info}); running it again")
        results[i] = await run_episode(cls, params, *jobs[i])
    return Rewards([task for task, _ in jobs], results)


def _tested_name(probe: str) -> str:
    """The first called name in a probe that is not a builtin wrapper like bool()."""
    calls = [n.func.id for n in ast.walk(ast.parse(probe)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    return next(name for name in calls if name not in dir(builtins))


def _fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code}\n```\n"


def test_extract_code_and_build_program() -> None:
    assert extract_code("a\n```python\nx = 1\n```\nb\n```py\ny = 2\n```") == "y = 2\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off
    assert extract_code("x = 3") == "x = 3"
    assert build_program("def f():\n", "```python\n    return 1\n```") == "def f():\n    return 1\n"
    assert build_program("import os\n", "def g(): pass") == "import os\n\n\ndef g(): pass"


def test_loaders_read_every_shared_file() -> None:
    counts = {name: len(_load(name)[2]) for name in ("humaneval", "mbpp", "mbpp_plus", "leetcode", "apps")}
    assert counts == {"humaneval": 164, "mbpp": 974, "mbpp_plus": 399, "leetcode": 180, "apps": 128}
    cls = get_env("mbpp")
    sanitized = cls.load_tasks(cls.Params(), data_root() / "mbpp" / "sanitized-mbpp.json", "test")
    assert len(sanitized) == 427
    gz = get_env("humaneval").load_tasks(cls.Params(), data_root() / "humaneval" / "HumanEval.jsonl.gz", "test")
    assert [t.id for t in gz][:2] == ["HumanEval/0", "HumanEval/1"] and len(gz) == 164


@MODULE_LOOP
async def test_humaneval_canonical_solutions_all_pass_and_return_none_all_fail() -> None:
    cls, params, tasks = _load("humaneval")
    gold = await _rewards(cls, params, [(t, _fenced(t.hidden["gold"])) for t in tasks])
    assert gold == [1.0] * 164
    mutated = await _rewards(cls, params, [(t, "```python\n    return None\n```") for t in tasks])
    assert mutated == [0.0] * 164


@MODULE_LOOP
async def test_mbpp_gold_passes_and_mutants_fail() -> None:
    cls, params, tasks = _load("mbpp", limit=40)
    assert await _rewards(cls, params, [(t, _fenced(t.hidden["gold"])) for t in tasks]) == [1.0] * 40
    # Redefine the tested function after the gold code: same name, wrong value.
    names = [_tested_name(t.hidden["tests"]["probes"][0]) for t in tasks]
    mutants = [(t, _fenced(f"{t.hidden['gold']}\ndef {n}(*a, **k):\n    return None")) for t, n in zip(tasks, names)]
    assert await _rewards(cls, params, mutants) == [0.0] * 40


@MODULE_LOOP
async def test_mbpp_plus_reference_outputs_judge_extra_inputs() -> None:
    cls, params, tasks = _load("mbpp_plus", limit=3)
    assert all(len(t.hidden["tests"]["probes"]) > 10 for t in tasks)
    assert await _rewards(cls, params, [(t, _fenced(t.hidden["gold"])) for t in tasks]) == [1.0] * 3
    # Mbpp/2 similar_elements: a list instead of the reference's tuple is a different value.
    wrong = "def similar_elements(a, b):\n    return list(set(a) & set(b))"
    assert await _rewards(cls, params, [(tasks[0], _fenced(wrong))]) == [0.0]


MIN_PUSHES = """
class Solution:
    def minimumPushes(self, word: str) -> int:
        return sum(i // 8 + 1 for i in range(len(word)))
"""


@MODULE_LOOP
async def test_leetcode_handwritten_solution_passes_all_hundred_tests() -> None:
    cls, params, tasks = _load("leetcode")
    task = next(t for t in tasks if t.id == "weekly-contest-381-minimum-number-of-pushes-to-type-word-i")
    [ok], [off] = await asyncio.gather(
        run_episode(cls, params, task, _fenced(MIN_PUSHES)),
        run_episode(cls, params, task, _fenced(MIN_PUSHES.replace("i // 8 + 1", "i // 8 + 2"))),
    )
    assert (ok.reward, ok.info["passed"], ok.info["total"]) == (1.0, 100, 100)
    assert off.reward == 0.0


QAQ = """
s = input().strip()
n = len(s)
print(sum(1 for i in range(n) for j in range(i + 1, n) for k in range(j + 1, n)
          if s[i] == 'Q' and s[j] == 'A' and s[k] == 'Q'))
"""
ROUND_HALF = "import math\ndef solution(n):\n    return math.floor(n * 2 + 0.5) / 2\n"


@MODULE_LOOP
async def test_apps_stdin_stdout_and_call_problems() -> None:
    cls, params, tasks = _load("apps")
    by_id = {t.id: t for t in tasks}
    assert json.loads(json.dumps(by_id["apps/1607"].hidden["tests"]))["mode"] == "stdio"
    qaq, qaq_wrong, half, half_wrong = await asyncio.gather(
        run_episode(cls, params, by_id["apps/1607"], _fenced(QAQ)),
        run_episode(cls, params, by_id["apps/1607"], _fenced(QAQ.replace("print(", "print(1 + "))),
        run_episode(cls, params, by_id["apps/4276"], _fenced(ROUND_HALF)),
        run_episode(cls, params, by_id["apps/4276"], _fenced(ROUND_HALF.replace("floor", "ceil"))),
    )
    assert (qaq[0].reward, qaq[0].info["total"]) == (1.0, 43)
    assert (half[0].reward, qaq_wrong[0].reward, half_wrong[0].reward) == (1.0, 0.0, 0.0)


@MODULE_LOOP
async def test_full_apps_release_format(tmp_path: Path) -> None:
    """A row of the full APPS release (JSON-string `input_output` and `solutions`) loads and
    its gold solution passes, for both test styles."""
    rows = [
        {
            "problem_id": 1,
            "question": "Print a+b.",
            "starter_code": "",
            "difficulty": "introductory",
            "input_output": json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}),
            "solutions": json.dumps(["a, b = map(int, input().split())\nprint(a + b)\n"]),
        },
        {
            "problem_id": 2,
            "question": "Return the pair swapped.",
            "starter_code": "def swap(a, b):\n",
            "difficulty": "introductory",
            "input_output": json.dumps(
                {"fn_name": "swap", "inputs": [[1, "x"], [[1], 2]], "outputs": [[["x", 1]], [[2, [1]]]]}
            ),
            "solutions": json.dumps(["def swap(a, b):\n    return (b, a)\n"]),
        },
    ]
    path = tmp_path / "apps_full.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cls = get_env("apps")
    params = cls.Params.model_validate(DOCKER)
    tasks = cls.load_tasks(params, path, "test")
    assert [t.hidden["tests"]["mode"] for t in tasks] == ["stdio", "call"]
    assert await _rewards(cls, params, [(t, _fenced(t.hidden["gold"])) for t in tasks]) == [1.0, 1.0]
    assert await _rewards(cls, params, [(tasks[1], _fenced("def swap(a, b):\n    return (a, b)"))]) == [0.0]
