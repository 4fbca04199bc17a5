"""Grading in the real Docker sandbox: correct programs pass, mutants fail, and every
reward-hacking probe (early exit, SkipTest, always-equal objects, fake pass markers, forged
harness records) gets reward 0. A sandbox failure gives no reward (None), never 0."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from envs.code_datasets import asserts_to_tests
from reward.code import CodeTests, ExecLimits
from reward.code_run import grade
from workers.sandbox import DEFAULT_IMAGE, ExecResult, SandboxPool, Status

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIMITS = ExecLimits(timeout_per_test_s=2.0, timeout_total_s=30.0)
ADD_TESTS = asserts_to_tests("assert add(1, 2) == 3\nassert add(-5, 5) == 0\nassert add(10, 0) == 10", "add")
ECHO_TESTS = CodeTests(mode="stdio", inputs=["1 2\n", "10 -3\n"], expected=["3\n", "7\n"])
STDIO_OK = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool() -> AsyncIterator[SandboxPool]:
    async with SandboxPool(backend="docker", image=DEFAULT_IMAGE, size=2) as sandbox_pool:
        yield sandbox_pool


async def test_correct_program_passes(pool: SandboxPool) -> None:
    result = await grade(pool, ADD_TESTS, "def add(a, b):\n    return a + b\n", LIMITS)
    assert (result.reward, result.passed, result.total, result.status) == (1.0, 3, 3, "ok")
    assert result.sandbox_s > 0


@pytest.mark.parametrize("body", ["return None", "return a + b + 1", "return a - b"])
async def test_mutants_fail(pool: SandboxPool, body: str) -> None:
    result = await grade(pool, ADD_TESTS, f"def add(a, b):\n    {body}\n", LIMITS)
    assert result.reward == 0.0 and result.passed < 3


HACKS = {
    "exit at import": "import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b\n",
    "os._exit in the call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "SystemExit in the call": "def add(a, b):\n    raise SystemExit(0)\n",
    "SkipTest in the call": "import unittest\ndef add(a, b):\n    raise unittest.SkipTest('skip')\n",
    "SkipTest at import": "import unittest\nraise unittest.SkipTest('skip')\n",
    "always-equal object": "class Any:\n    def __eq__(self, other):\n        return True\n"
    "    __hash__ = object.__hash__\ndef add(a, b):\n    return Any()\n",
    "int subclass equal to all": "class Lie(int):\n    def __eq__(self, other):\n        return True\n"
    "    __hash__ = int.__hash__\ndef add(a, b):\n    return Lie(12345)\n",
    "fake pass markers": "print('All tests passed')\nprint('{\"i\": 0, \"value\": 3}')\n"
    "def add(a, b):\n    print('PASSED')\n    return None\n",
    "forged records on the report fd": (
        "import os\nfor fd in range(3, 20):\n    try:\n"
        '        os.write(fd, b\'\\nnonce {"i": 0, "value": 3}\\n{"done": 3}\\n\')\n'
        "    except OSError:\n        pass\n"
        "def add(a, b):\n    return None\n"
    ),
    "swallows the time limit": "def add(a, b):\n    while True:\n        try:\n            pass\n"
    "        except BaseException:\n            pass\n",
}


@pytest.mark.parametrize("name", list(HACKS))
async def test_reward_hacks_get_zero(pool: SandboxPool, name: str) -> None:
    result = await grade(pool, ADD_TESTS, HACKS[name], LIMITS)
    assert result.reward == 0.0, (name, result)
    assert result.passed == 0


async def test_stdio_program_and_fake_markers(pool: SandboxPool) -> None:
    ok = await grade(pool, ECHO_TESTS, STDIO_OK, LIMITS)
    assert (ok.reward, ok.passed) == (1.0, 2)
    fake = await grade(pool, ECHO_TESTS, "print('All tests passed: 2/2')\n", LIMITS)
    exits = await grade(pool, ECHO_TESTS, "import sys\nprint(3)\nsys.exit(1)\n", LIMITS)
    assert fake.reward == 0.0 and exits.reward == 0.0
    assert "exit code 1" in exits.outcomes[0].error


async def test_fraction_reward_and_time_limit(pool: SandboxPool) -> None:
    program = (
        "def add(a, b):\n    if a == 10:\n        while True:\n            pass\n    return a + b if a > 0 else 7\n"
    )
    all_mode = await grade(pool, ADD_TESTS, program, LIMITS)
    fraction = await grade(pool, ADD_TESTS, program, LIMITS, reward_mode="fraction")
    assert all_mode.reward == 0.0
    assert fraction.reward == pytest.approx(1 / 3)
    assert "time limit" in fraction.outcomes[2].error


async def test_stdio_output_flood_is_cut(pool: SandboxPool) -> None:
    limits = LIMITS.model_copy(update={"max_output_bytes": 10_000})
    result = await grade(pool, ECHO_TESTS, "while True:\n    print('x' * 1000)\n", limits)
    assert result.reward == 0.0
    assert "over 10000 bytes" in result.outcomes[0].error


async def test_stdio_big_input_unread_and_leftover_children(pool: SandboxPool) -> None:
    big = CodeTests(mode="stdio", inputs=["7\n" + "x" * 2_000_000], expected=["7"])
    unread = await grade(pool, big, "print(input())\n", LIMITS)  # reads one line of 2 MB
    assert unread.reward == 1.0
    spawner = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nprint(3)\n"
    started = await grade(pool, ECHO_TESTS, spawner, LIMITS)
    # The sleeping grandchild keeps stdout open: the test runs into its wall-clock bound.
    assert started.reward == 0.0 and "time limit" in started.outcomes[0].error
    assert started.sandbox_s < 2 * 3 * LIMITS.timeout_per_test_s + 5


class _BrokenSandbox:
    """Stands in for a sandbox whose infrastructure fails: a fault the tests cannot cause."""

    async def run(self, request) -> ExecResult:
        return ExecResult(status=Status.SANDBOX_ERROR, error="container vanished")


async def test_sandbox_failure_gives_no_reward() -> None:
    result = await grade(_BrokenSandbox(), ADD_TESTS, "def add(a, b):\n    return a + b\n", LIMITS)
    assert result.reward is None
    assert "container vanished" in result.error


async def test_a_run_cut_short_says_why(pool: SandboxPool) -> None:
    """The grade's error carries what the sandbox saw of a run that ended before its report did:
    the exit code, or the sandbox's own error (a 0 a user cannot explain is a 0 nobody trusts)."""
    exits = await grade(pool, ADD_TESTS, "import os\ndef add(a, b):\n    os._exit(3)\n", LIMITS)
    assert (
        exits.reward == 0.0 and exits.error == "run ended as runtime_error before all tests were reported (exit code 3)"
    ), exits.error
