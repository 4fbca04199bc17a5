"""The new-environment example of docs/environments.md, run exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from envs.base import Action
from envs.registry import get_env, list_envs

DOC = Path(__file__).resolve().parents[3] / "docs" / "environments.md"


def _example_source() -> str:
    return re.search(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL).group(1)


def test_example_is_under_30_lines() -> None:
    assert len(_example_source().strip().splitlines()) < 30


@pytest.mark.asyncio
async def test_example_registers_and_grades() -> None:
    exec(compile(_example_source(), str(DOC), "exec"), {"__name__": "docs_example"})
    cls = get_env("reverse_word")
    assert "reverse_word" in list_envs()
    tasks = cls.load_tasks(cls.Params(n=3), None, "train")
    assert [t.id for t in tasks] == ["w0", "w1", "w2"]
    env = cls(cls.Params())
    observation = await env.reset(tasks[2])
    assert observation.messages[0].content == "Reverse: word2"
    right = await env.step(Action(text=" 2drow\n", token_ids=[1]))
    wrong = await env.step(Action(text="word2", token_ids=[1]))
    assert (right.done, right.reward, wrong.reward) == (True, 1.0, 0.0)
