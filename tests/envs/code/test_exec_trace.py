"""Execution-trace prediction: task generation, the tracer's ground truth (run in Docker), the
textual format and the per-step score."""

from __future__ import annotations

import json

import pytest
from conftest import DOCKER, run_episode

from envs.base import Message, Task
from envs.exec_trace import parse_trace, score
from envs.exec_trace_tracer import short_repr, trace_call
from envs.registry import get_env

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
ENV = get_env("exec_trace")
PARAMS = ENV.Params.model_validate({**DOCKER, "max_steps": 40})

PROGRAM = """def fact(n):
    acc = 1
    for k in range(2, n + 1):
        acc = acc * k
    return acc


def safe_div(a, b):
    try:
        return a // b
    except ZeroDivisionError:
        return None


def rec(n):
    if n == 0:
        return 0
    return 1 + rec(n - 1)
"""

FACT_3 = [
    "2: n=3",
    "3: acc=1, n=3",
    "4: acc=1, k=2, n=3",
    "3: acc=2, k=2, n=3",
    "4: acc=2, k=3, n=3",
    "3: acc=6, k=3, n=3",
    "5: acc=6, k=3, n=3",
    "return: 6",
]


def _task(entry: str, call: str) -> Task:
    return Task(
        id=f"trace/{call}",
        prompt=[Message(role="user", content="trace it")],
        hidden={"program": PROGRAM, "entry": entry, "call": call},
    )


def _reply(steps: list[str]) -> str:
    return "Let me think.\n<trace>\n" + "\n".join(steps) + "\n</trace>"


@MODULE_LOOP
async def test_ground_truth_from_the_sandbox_matches_the_hand_trace() -> None:
    [exact] = await run_episode(ENV, PARAMS, _task("fact", "fact(3)"), _reply(FACT_3))
    assert exact.reward == 1.0 and exact.info["steps"] == 8
    one_off = FACT_3[:3] + ["3: acc=3, k=2, n=3"] + FACT_3[4:]
    [partial] = await run_episode(ENV, PARAMS, _task("fact", "fact(3)"), _reply(one_off))
    assert partial.reward == pytest.approx(7 / 8)
    [short] = await run_episode(ENV, PARAMS, _task("fact", "fact(3)"), _reply(FACT_3[:4]))
    assert short.reward == pytest.approx(4 / 8)
    [no_block] = await run_episode(ENV, PARAMS, _task("fact", "fact(3)"), "\n".join(FACT_3))
    assert no_block.reward == 0.0


@MODULE_LOOP
async def test_exceptions_and_recursion_in_the_trace() -> None:
    env = ENV(PARAMS)
    await env.reset(_task("safe_div", "safe_div(1, 0)"))
    assert await env.ground_truth() == [
        "9: a=1, b=0",
        "10: a=1, b=0",
        "exception: ZeroDivisionError",
        "11: a=1, b=0",
        "12: a=1, b=0",
        "return: None",
    ]
    await env.reset(_task("rec", "rec(2)"))
    assert await env.ground_truth() == ["16: n=2", "18: n=2", "return: 2"]  # inner calls untraced


@MODULE_LOOP
async def test_long_executions_are_cut_to_max_steps() -> None:
    params = PARAMS.model_copy(update={"max_steps": 5})
    env = ENV(params)
    await env.reset(_task("fact", "fact(30)"))
    assert await env.ground_truth() == [
        "2: n=30",
        "3: acc=1, n=30",
        "4: acc=1, k=2, n=30",
        "3: acc=2, k=2, n=30",
        "4: acc=2, k=3, n=30",
    ]


@MODULE_LOOP
async def test_dataset_tasks_validate_against_their_own_ground_truth() -> None:
    for source, first_id in (("mbpp", "trace/mbpp/1"), ("humaneval", "trace/HumanEval/0")):
        params = PARAMS.model_copy(update={"source": source, "limit": 3})
        tasks = ENV.load_tasks(params, None, "test")
        assert tasks[0].id == first_id and len(tasks) == 3
        assert "<trace>" in tasks[0].prompt[0].content and "  1 | " in tasks[0].prompt[0].content
        for task in tasks:
            env = ENV(params)
            await env.reset(task)
            [result] = await run_episode(ENV, params, task, await env.gold_output(task))
            assert result.reward == 1.0


def test_format_helpers() -> None:
    assert parse_trace("x <trace>\n 2:   n=3 \n\nreturn: 6\n</trace>") == ["2: n=3", "return: 6"]
    assert parse_trace("<trace>\n1: a=1\n") == ["1: a=1"]  # cut off by the token limit
    assert parse_trace("no block") is None
    assert score([], []) == 1.0 and score(["a"], []) == 0.0
    assert short_repr(object()).startswith("<object object") and " at 0x" not in short_repr(object())
    assert short_repr("x" * 500) == repr("x" * 500)[:97] + "..."


def test_tracer_runs_in_process_too() -> None:
    namespace: dict = {}
    exec(compile(PROGRAM, "program.py", "exec"), namespace)
    result = trace_call(namespace, "fact", "fact(2)", max_steps=50)
    assert result["truncated"] is False and result["steps"][-1] == ["return", "2"]


TAILS = {
    "garbage": "not json",
    "wrong types": json.dumps({"steps": [["line", "2", 5]], "truncated": False}),
    "unknown step": json.dumps({"steps": [["jump", "2"]], "truncated": False}),
    "too many steps": json.dumps({"steps": [["return", "1"]] * 41, "truncated": False}),
    "deep nesting": "[" * 100_000,
}


@MODULE_LOOP
@pytest.mark.parametrize("name", list(TAILS))
async def test_a_tracer_report_that_is_not_one_gives_no_reward_and_no_exception(name: str) -> None:
    """Whatever the traced program leaves as the last line of stdout (here from an atexit hook,
    after the tracer's own report) is validated: a line that is not a tracer report means no
    ground truth (reward None), never an exception out of `step`."""
    program = f"import atexit\natexit.register(lambda: print({TAILS[name]!r}))\n" + PROGRAM
    task = Task(
        id=f"trace/{name}",
        prompt=[Message(role="user", content="trace it")],
        hidden={"program": program, "entry": "fact", "call": "fact(3)"},
    )
    [result] = await run_episode(ENV, PARAMS, task, _reply(FACT_3))
    assert result.done and result.reward is None and "malformed" in result.info["error"], result.info


@MODULE_LOOP
async def test_a_traced_program_that_prints_still_has_its_ground_truth() -> None:
    task = Task(
        id="trace/prints",
        prompt=[Message(role="user", content="trace it")],
        hidden={"program": "print('loading')\n" + PROGRAM, "entry": "fact", "call": "fact(3)"},
    )
    shifted = [(int(n) + 1, rest) for n, _, rest in (s.partition(":") for s in FACT_3[:-1])]
    steps = [f"{n}:{rest}" for n, rest in shifted] + FACT_3[-1:]  # one line printed before PROGRAM
    [result] = await run_episode(ENV, PARAMS, task, _reply(steps))
    assert result.reward == 1.0, result.info
