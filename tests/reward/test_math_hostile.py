"""Hostile answers end within the verifier's deadline, give no reward instead of a wrong one, and
leave the process pool able to verify ordinary answers right after."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from reward.math import MathVerifier

DEADLINE_S = 5.0  # the production default of `MathVerifier`
SLACK_S = 2.5  # process spawn on first use and the pebble watchdog's polling

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    v = MathVerifier(workers=2, deadline_s=DEADLINE_S)
    v.verify_sync("\\boxed{1}", "1")  # start the workers outside the timed cases
    yield v
    v.close()


async def _timed(verifier: MathVerifier, prediction: str, gold: str):
    start = time.monotonic()
    verdict = await verifier.verify(prediction, gold)
    return verdict, time.monotonic() - start


async def _pool_still_works(verifier: MathVerifier) -> None:
    verdicts = await asyncio.gather(*(verifier.verify(f"so \\boxed{{{k}}}", str(k)) for k in range(6)))
    assert [v.reward for v in verdicts] == [1.0] * 6, [v.error for v in verdicts]
    assert (await verifier.verify("\\boxed{7}", "8")).reward == 0.0


@pytest.mark.parametrize(
    "prediction",
    [
        "\\boxed{10^{10^{10}}}",
        "\\boxed{9^{9^{9^{9}}}}",
        "\\boxed{" + "(" * 900 + "1" + ")" * 900 + "}",
    ],
)
async def test_explosive_expressions_hit_the_deadline(verifier: MathVerifier, prediction: str) -> None:
    verdict, elapsed = await _timed(verifier, prediction, "3")
    assert elapsed < DEADLINE_S + SLACK_S
    # math-verify's own internal timeout may answer first (a wrong answer: 0); otherwise the
    # process deadline kills the worker (no reward: None). Never a hang, never credit.
    assert verdict.reward is None and "deadline" in verdict.error or verdict.reward == 0.0
    await _pool_still_works(verifier)


async def test_huge_power_equal_to_gold_is_not_a_hang(verifier: MathVerifier) -> None:
    verdict, elapsed = await _timed(verifier, "\\boxed{10^{10^{10}}}", "10^{10^{10}}")
    assert elapsed < DEADLINE_S + SLACK_S
    assert verdict.reward in (1.0, None)  # equal strings may verify, or hit the deadline


@pytest.mark.parametrize(
    "prediction",
    [
        "\\boxed{" + "{" * 1_500_000 + "}" * 1_500_000 + "}",  # 3 MB of balanced braces
        "\\boxed{" + "{" * 3_000_000,  # 3 MB never closed
        "x" * 2_000_000 + "\\boxed{" + "1" * 100_000 + "}",  # huge number, huge prose
    ],
)
async def test_megabytes_of_braces_end_in_time(verifier: MathVerifier, prediction: str) -> None:
    verdict, elapsed = await _timed(verifier, prediction, "1")
    assert elapsed < DEADLINE_S + SLACK_S
    assert verdict.reward == 0.0  # rejected on the host (over-long or no final answer)
    await _pool_still_works(verifier)


async def test_hostile_and_normal_answers_in_flight_together(verifier: MathVerifier) -> None:
    hostile = [verifier.verify("\\boxed{10^{10^{10}}}", "2") for _ in range(3)]
    normal = [verifier.verify(f"\\boxed{{{k}}}", str(k)) for k in range(4)]
    start = time.monotonic()
    verdicts = await asyncio.gather(*hostile, *normal)
    assert all(v.reward in (None, 0.0) for v in verdicts[:3])
    assert [v.reward for v in verdicts[3:]] == [1.0] * 4
    assert time.monotonic() - start < 2 * DEADLINE_S + SLACK_S  # 3 hostile on 2 workers: 2 rounds
