"""Expected values taken from a trusted solution, in the real Docker sandbox: recording a
dataset's own check, reference outputs, caching, and tasks whose reference is broken."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from reward.code import CodeTests, ExecLimits, RecordSpec
from reward.code_harness import decode
from reward.code_run import ReferenceFailed, grade, materialize
from workers.sandbox import DEFAULT_IMAGE, SandboxPool

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIMITS = ExecLimits(timeout_per_test_s=2.0, timeout_total_s=30.0)
GOLD = "def double(xs):\n    return [2 * x for x in xs]\n"
CHECK = """
def check(candidate):
    assert candidate([1, 2]) == [2, 4]
    for n in range(3):
        assert candidate(list(range(n))) == [2 * k for k in range(n)]
"""


class CountingPool:
    """A real pool that counts the runs it is asked for."""

    def __init__(self, pool: SandboxPool) -> None:
        self.pool, self.runs = pool, 0

    async def run(self, request):
        self.runs += 1
        return await self.pool.run(request)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool() -> AsyncIterator[CountingPool]:
    async with SandboxPool(backend="docker", image=DEFAULT_IMAGE, size=2) as sandbox_pool:
        yield CountingPool(sandbox_pool)


async def test_recording_turns_a_check_into_probes_and_is_cached(pool: CountingPool) -> None:
    tests = CodeTests(mode="call", record=RecordSpec(program=GOLD + CHECK, entry="double", check="check(__record__)"))
    filled = await materialize(pool, tests, LIMITS)
    assert filled.probes == [
        "double(*[[1, 2]], **{})",
        "double(*[[]], **{})",
        "double(*[[0]], **{})",
        "double(*[[0, 1]], **{})",
    ]
    assert [decode(v) for v in filled.expected] == [[2, 4], [], [0], [0, 2]]
    runs = pool.runs
    assert (await materialize(pool, tests, LIMITS)) == filled and pool.runs == runs  # cached
    good = await grade(pool, tests, "def double(xs):\n    return [x + x for x in xs]\n", LIMITS)
    bad = await grade(pool, tests, "def double(xs):\n    return xs\n", LIMITS)
    assert (good.reward, good.total, bad.reward, bad.passed) == (1.0, 4, 0.0, 2)  # [] and [0]


async def test_reference_outputs_become_expected_values(pool: CountingPool) -> None:
    tests = CodeTests(mode="call", probes=["double(*[[3]])", "double(*[[-1, 5]])"], reference=GOLD)
    filled = await materialize(pool, tests, LIMITS)
    assert [decode(v) for v in filled.expected] == [[6], [-2, 10]]
    assert (await grade(pool, tests, GOLD, LIMITS)).reward == 1.0


async def test_string_set_orders_agree_across_sandboxes(pool: CountingPool) -> None:
    """Set iteration order of strings depends on the interpreter's hash seed; reference and
    candidate runs land in different sandboxes, so the seed must be the same everywhere."""
    program = "def uniq(words):\n    return tuple(set(words))\n"
    words = [f"w{i}x" for i in range(30)]
    tests = CodeTests(mode="call", probes=[f"uniq(*[{words!r}])"], reference=program)
    rewards = [(await grade(pool, tests, program, LIMITS)).reward for _ in range(6)]
    assert rewards == [1.0] * 6


async def test_broken_reference_gives_no_reward(pool: CountingPool) -> None:
    wrong_gold = "def double(xs):\n    return xs\n"
    recorded = CodeTests(
        mode="call", record=RecordSpec(program=wrong_gold + CHECK, entry="double", check="check(__record__)")
    )
    with pytest.raises(ReferenceFailed, match="AssertionError"):
        await materialize(pool, recorded, LIMITS)
    crashing = CodeTests(mode="call", probes=["double(*[None])"], reference=GOLD)
    result = await grade(pool, crashing, GOLD, LIMITS)
    assert result.reward is None and result.status == "no_reference" and "TypeError" in result.error
