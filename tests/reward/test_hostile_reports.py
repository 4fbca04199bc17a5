"""A program that reaches the harness's report channel and writes records the harness never
writes, through the real harness in the real Docker sandbox, driven through real code
environments: the grade is 0 and nothing leaves `env.step`.

Two ways in, both open to today's sandbox: in call mode the candidate runs inside the harness and
finds its reporter (nonce and report fd) by frame introspection; in stdio mode the forked program
finds the nonce the same way and reopens the harness's report pipe through /proc/<ppid>/fd.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from envs.base import Action, Message, Task
from envs.code import MBPPEnv
from envs.code_datasets import asserts_to_tests
from envs.swe.pools import close_shared_pools
from reward.code import CodeTests

pytestmark = pytest.mark.asyncio(loop_scope="module")

PARAMS = MBPPEnv.Params.model_validate(
    {"sandbox": {"backend": "docker"}, "limits": {"timeout_per_test_s": 2.0, "timeout_total_s": 30.0}}
)
ADD = asserts_to_tests("assert add(1, 2) == 3\nassert add(-5, 5) == 0", "add")
ECHO = CodeTests(mode="stdio", inputs=["1 2\n", "10 -3\n"], expected=["3\n", "7\n"])

FIND_REPORTER = """
import os, sys

def _reporter():
    frame = sys._getframe()
    while frame is not None:
        found = frame.f_locals.get("report")
        if found is not None and hasattr(found, "_nonce"):
            return found
        frame = frame.f_back
    raise RuntimeError("no reporter on the stack")
"""

# Framed bodies a forger would try: not records, wrong types, bad tags, deep nesting, huge
# numbers, NaN literals, and a record for a test before the harness writes its own.
PAYLOADS = {
    "a list": b"[1, 2]",
    "a bare number": b"5",
    "bool index": b'{"i": true, "value": 3}',
    "unknown tag": b'{"i": 0, "value": {"__evil__": 1}}',
    "two-key tag": b'{"i": 0, "value": {"__tuple__": [], "__set__": []}}',
    "bad hex": b'{"i": 0, "value": {"__bytes__": "zz"}}',
    "complex of a huge int": b'{"i": 0, "value": {"__complex__": [' + b"9" * 400 + b", 0.0]}}",
    "deep nesting": b'{"i": 0, "value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "integer of 5000 digits": b'{"i": 0, "value": ' + b"7" * 5000 + b"}",
    "NaN literal": b'{"i": 0, "value": NaN}',
    "error that is not text": b'{"i": 0, "error": {"a": [1]}}',
    "load_error that is a list": b'{"load_error": [1]}',
    "first record for test 0": b'{"i": 0, "value": 3}',
}


@pytest_asyncio.fixture(scope="module", loop_scope="module", autouse=True)
async def _close_pools() -> AsyncIterator[None]:
    yield
    await close_shared_pools()


def _task(tests: CodeTests) -> Task:
    return Task(
        id="forge",
        prompt=[Message(role="user", content="write it")],
        hidden={"tests": tests.model_dump(), "prefix": "", "gold": None},
    )


async def _step(tests: CodeTests, program: str):
    env = MBPPEnv(PARAMS)
    await env.reset(_task(tests))
    try:
        return await env.step(Action(text=f"```python\n{program}\n```", token_ids=[]))
    finally:
        await env.close()


def _call_forger(payload: bytes) -> str:
    # The function is right: only the forged line stands between it and reward 1.
    return (
        FIND_REPORTER
        + f"""
def add(a, b):
    report = _reporter()
    os.write(report._fd, b"\\n" + report._nonce + b" " + {payload!r} + b"\\n")
    return a + b
"""
    )


def _stdio_forger(payload: bytes) -> str:
    return (
        FIND_REPORTER
        + f"""
report = _reporter()
pipe = os.open("/proc/%d/fd/%d" % (os.getppid(), report._fd), os.O_WRONLY)
os.write(pipe, b"\\n" + report._nonce + b" " + {payload!r} + b"\\n")
a, b = map(int, input().split())
print(a + b)
"""
    )


async def test_honest_programs_pass_through_the_same_env() -> None:
    assert (await _step(ADD, "def add(a, b):\n    return a + b\n")).reward == 1.0
    assert (await _step(ECHO, "a, b = map(int, input().split())\nprint(a + b)\n")).reward == 1.0


@pytest.mark.parametrize("name", list(PAYLOADS))
async def test_forged_records_by_frame_introspection_score_0(name: str) -> None:
    result = await _step(ADD, _call_forger(PAYLOADS[name]))
    assert result.done and result.reward == 0.0, (name, result.info)
    assert result.info["passed"] == 0 and "malformed" in result.info["error"], result.info


@pytest.mark.parametrize(
    "name",
    [
        "a list",
        "bool index",
        "deep nesting",
        "integer of 5000 digits",
        "error that is not text",
        "first record for test 0",
    ],
)
async def test_forged_records_through_proc_score_0(name: str) -> None:
    payload = PAYLOADS[name].replace(b'"value": 3', b'"stdout": "3"')
    result = await _step(ECHO, _stdio_forger(payload))
    assert result.done and result.reward == 0.0, (name, result.info)
    assert result.info["passed"] == 0 and "malformed" in result.info["error"], result.info


async def test_float_answers_do_not_pass_integer_tests() -> None:
    big = CodeTests(mode="stdio", inputs=["\n"], expected=["1000000007\n"])
    assert (await _step(big, "print(1e9)\n")).reward == 0.0
    assert (await _step(big, "print(1000000007.0)\n")).reward == 1.0
    call = CodeTests(mode="call", probes=["f()"], expected=[1000000007])
    assert (await _step(call, "def f():\n    return 1e9\n")).reward == 0.0
    assert (await _step(call, "def f():\n    return 1000000007.0\n")).reward == 1.0
