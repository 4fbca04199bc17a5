"""Self-debug episodes in Docker: feedback on the public tests, revision, hidden-test reward."""

from __future__ import annotations

import pytest
from conftest import DOCKER, run_episode

from envs.registry import get_env

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
ENV = get_env("self_debug")

WRONG = "```python\ndef min_cost(cost, m, n):\n    return 0\n```"
RIGHT = """```python
def min_cost(cost, m, n):
    tc = [[0] * (n + 1) for _ in range(m + 1)]
    for i in range(m + 1):
        for j in range(n + 1):
            best = min([tc[a][b] for a, b in ((i - 1, j - 1), (i - 1, j), (i, j - 1)) if a >= 0 and b >= 0],
                       default=0)
            tc[i][j] = best + cost[i][j]
    return tc[m][n]
```"""
# Passes the public test (the first: expected 8) but none of the hidden others.
OVERFIT = "```python\ndef min_cost(cost, m, n):\n    return 8\n```"


def _task(params, task_id: str):
    return next(t for t in ENV.load_tasks(params, None, "test") if t.id == task_id)


@MODULE_LOOP
async def test_wrong_then_right_gets_feedback_then_full_reward() -> None:
    params = ENV.Params.model_validate({**DOCKER, "dataset": "mbpp", "turns": 3, "limit": 1})
    task = _task(params, "mbpp/1")
    assert "revise" in task.prompt[0].content
    first, second = await run_episode(ENV, params, task, WRONG, RIGHT)
    assert not first.done and first.reward is None
    feedback = first.observation.messages[0].content
    assert "passed 0 of 1" in feedback and "expected: 8" in feedback and "got: 0" in feedback
    assert "min_cost([[1, 2, 3], [4, 8, 2], [1, 5, 3]], 2, 2)" in feedback  # the input is shown
    assert second.done and second.reward == 1.0 and second.info["turns"] == 2


@MODULE_LOOP
async def test_public_pass_ends_the_episode_and_hidden_tests_decide() -> None:
    params = ENV.Params.model_validate({**DOCKER, "dataset": "mbpp", "turns": 3, "limit": 1})
    [only] = await run_episode(ENV, params, _task(params, "mbpp/1"), OVERFIT, RIGHT)
    assert only.done and only.reward == 0.0 and only.info["passed"] == 1, only.info


@MODULE_LOOP
async def test_last_turn_is_graded_even_when_wrong() -> None:
    params = ENV.Params.model_validate({**DOCKER, "dataset": "mbpp", "turns": 2, "limit": 1})
    results = await run_episode(ENV, params, _task(params, "mbpp/1"), WRONG, WRONG, RIGHT)
    assert len(results) == 2 and results[-1].done and results[-1].reward == 0.0


@MODULE_LOOP
async def test_humaneval_public_tests_come_from_recorded_checks() -> None:
    params = ENV.Params.model_validate({**DOCKER, "dataset": "humaneval", "turns": 2, "n_public": 2, "limit": 1})
    task = _task(params, "HumanEval/0")
    wrong, right = "```python\n    return False\n```", f"```python\n{task.hidden['gold']}\n```"
    first, second = await run_episode(ENV, params, task, wrong, right)
    assert "of 2 example tests" in first.observation.messages[0].content
    assert second.reward == 1.0


def test_unknown_or_non_code_dataset_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a code environment"):
        ENV.load_tasks(ENV.Params(dataset="math"), None, "test")
