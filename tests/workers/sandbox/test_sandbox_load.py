"""200 concurrent run() calls on this machine: zero sandbox-attributable failures, bounded queueing."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest
from sandbox_testkit import TEST_LIMITS

from workers.sandbox import ExecRequest, SandboxPool, Status

pytestmark = pytest.mark.asyncio(loop_scope="session")

CALLS = 200


async def _timed(pool: SandboxPool, i: int) -> tuple[float, object]:
    started = time.perf_counter()
    result = await pool.run(ExecRequest(command=["python3", "-c", f"print({i} * 2)"], timeout_s=30))
    return time.perf_counter() - started, result


@pytest.mark.parametrize("backend", ["docker", "local"])
async def test_200_concurrent_runs(backend: str) -> None:
    async with SandboxPool(backend=backend, size=4, limits=TEST_LIMITS) as pool:
        started = time.perf_counter()
        timed = await asyncio.gather(*(_timed(pool, i) for i in range(CALLS)))
        elapsed = time.perf_counter() - started
        latencies = sorted(t for t, _ in timed)
        statuses = [r.status for _, r in timed]
        assert statuses == [Status.OK] * CALLS, [r for _, r in timed if r.status is not Status.OK][:3]
        assert [r.stdout for _, r in timed] == [f"{i * 2}\n".encode() for i in range(CALLS)]
        stats = pool.stats()
        assert stats.sandbox_errors == 0 and stats.max_waiting <= CALLS and stats.waiting == 0
        p50, p99 = latencies[CALLS // 2], latencies[int(CALLS * 0.99) - 1]
        print(
            f"\n{backend}: {CALLS} concurrent runs on 4 sandboxes in {elapsed:.2f} s "
            f"({CALLS / elapsed:.0f}/s); latency p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, "
            f"mean {statistics.mean(latencies) * 1e3:.0f} ms; most waiting {stats.max_waiting}"
        )


async def test_queue_bound_refuses_beyond_max_waiting() -> None:
    async with SandboxPool(backend="local", size=1, limits=TEST_LIMITS, max_waiting=5) as pool:
        results = await asyncio.gather(*(pool.run(ExecRequest(command=["sleep", "0.2"])) for _ in range(10)))
        refused = [r for r in results if r.status is Status.SANDBOX_ERROR]
        assert len(refused) == 4 and all("more than 5 callers" in r.error for r in refused)
        assert [r.status for r in results].count(Status.OK) == 6


async def test_close_ends_running_and_waiting_calls_as_sandbox_errors() -> None:
    pool = SandboxPool(backend="local", size=1, limits=TEST_LIMITS)
    await pool.start()
    calls = [asyncio.ensure_future(pool.run(ExecRequest(command=["sleep", "30"], timeout_s=60))) for _ in range(3)]
    await asyncio.sleep(0.5)
    started = time.perf_counter()
    await pool.close()
    results = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert [r.status for r in results] == [Status.SANDBOX_ERROR] * 3
    assert time.perf_counter() - started < 10
