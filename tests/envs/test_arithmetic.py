"""The synthetic arithmetic family: held-out problems never appear in training."""

import asyncio

import pytest

from envs.base import Action
from envs.registry import get_env


def test_heldout_split_is_disjoint_and_graded() -> None:
    env_cls = get_env("arithmetic")
    params = env_cls.Params(max_digits=2, n_train=3000, n_test=200)
    train = env_cls.load_tasks(params, None, "train")
    test = env_cls.load_tasks(params, None, "test")
    assert len(train) == 3000 and len(test) == 200
    assert not {t.meta["expr"] for t in train} & {t.meta["expr"] for t in test}
    task = test[0]
    a = eval(task.meta["expr"])  # the expression is plain integer arithmetic
    assert task.hidden["answer"] == str(a)

    async def grade(text: str) -> float | None:
        env = env_cls(params)
        await env.reset(task)
        return (await env.step(Action(text=text, token_ids=[]))).reward

    assert asyncio.run(grade(f"\\boxed{{{a}}}")) == 1.0
    assert asyncio.run(grade(f"\\boxed{{{a + 1}}}")) == 0.0


def test_difficulty_knobs_shape_the_problems() -> None:
    env_cls = get_env("arithmetic")
    tasks = env_cls.load_tasks(env_cls.Params(min_digits=3, max_digits=3, ops="+", n_train=50), None, "train")
    for t in tasks:
        a, b = t.meta["expr"].split("+")
        assert len(a) == 3 and len(b) == 3


def test_every_environment_accepts_a_length_penalty_as_reward_shaping() -> None:
    from envs.arithmetic import ArithmeticEnv, ArithmeticParams

    env = ArithmeticEnv(ArithmeticParams(length_penalty=0.01))
    assert env.shape_reward(1.0, 10) == pytest.approx(0.9)
    assert ArithmeticEnv(ArithmeticParams()).shape_reward(1.0, 10) == 1.0
