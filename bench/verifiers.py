"""Verifier throughput: graded samples per second for math answers, function-call code,
stdin/stdout code and SWE diffs, and the share of grading wall time spent inside the sandbox.

Every family is timed through its environment (`step`), as the RL loop calls it, and against a
baseline measured in the same run: math against math-verify called in this process one answer
at a time (no pool, no deadline); code against the same harness and host-side comparison run as
a plain subprocess on the host (no isolation). SWE has no unsandboxed baseline (its tests need a
container); its line reports the sandbox share only.

    .venv/bin/python bench/verifiers.py [--n 200] [--swe-tasks swe-tasks/toolz-1.2.0.jsonl]

Prints one JSON line per family: samples, samples_per_s, sandbox_share, baseline, ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.base import Action, Task  # noqa: E402
from envs.registry import get_env  # noqa: E402
from envs.swe.pools import close_shared_pools, shared_pool  # noqa: E402
from reward.code import CodeTests, ExecLimits  # noqa: E402
from reward.code_run import grade  # noqa: E402
from workers.sandbox import ExecRequest, ExecResult, Status  # noqa: E402

DOCKER = {"sandbox": {"backend": "docker", "size": 2}}
CONCURRENCY = 2  # one grading per core: more only queues for the pool
STDIO_PROGRAM = "import sys\nprint(len(sys.stdin.read().split()))\n"


class HostRunner:
    """Baseline: runs an ExecRequest as a plain subprocess in a temporary folder on the host."""

    async def run(self, request: ExecRequest) -> ExecResult:
        with tempfile.TemporaryDirectory() as work:
            for name, data in request.files.items():
                Path(work, name).write_bytes(data)
            start = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                *request.command,
                cwd=work,
                env={**os.environ, **request.env},
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(request.stdin), request.timeout_s)
            except TimeoutError:
                proc.kill()
                return ExecResult(status=Status.TIMEOUT, wall_s=time.perf_counter() - start)
            status = Status.OK if proc.returncode == 0 else Status.RUNTIME_ERROR
            return ExecResult(
                status=status, exit_code=proc.returncode, stdout=out, stderr=err, wall_s=time.perf_counter() - start
            )


async def _gated(jobs, concurrency: int) -> tuple[list, float]:
    """Run coroutine factories `concurrency` at a time; returns results and wall seconds."""
    gate = asyncio.Semaphore(concurrency)

    async def one(job):
        async with gate:
            return await job()

    start = time.perf_counter()
    results = await asyncio.gather(*(one(j) for j in jobs))
    return results, time.perf_counter() - start


async def _episodes(name: str, params: dict, pairs: list[tuple[Task, str]], concurrency: int):
    """Grade (task, reply) pairs through the environment; returns (results, wall, per-episode s)."""
    cls = get_env(name)
    p = cls.Params.model_validate(params)

    def job(task: Task, reply: str):
        async def run():
            env = cls(p)
            await env.reset(task)
            start = time.perf_counter()
            result = await env.step(Action(text=reply, token_ids=[]))
            return result, time.perf_counter() - start

        return run

    timed, wall = await _gated([job(t, r) for t, r in pairs], concurrency)
    return [r for r, _ in timed], wall, sum(s for _, s in timed)


def _line(family: str, results, wall: float, busy: float, baseline: str, base_rate: float | None) -> dict:
    rate = len(results) / wall
    sandbox = sum(r.info.get("sandbox_s") or 0.0 for r in results)
    return {
        "family": family,
        "samples": len(results),
        "samples_per_s": round(rate, 2),
        "dropped": sum(r.reward is None for r in results),
        "sandbox_share": round(sandbox / busy, 3) if busy else 0.0,
        "baseline": baseline,
        "baseline_samples_per_s": round(base_rate, 2) if base_rate else None,
        "ratio": round(rate / base_rate, 3) if base_rate else None,
    }


def _math_baseline(pairs: list[tuple[Task, str]]) -> float:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    from reward.math import extract_boxed

    start = time.perf_counter()
    for task, reply in pairs:
        gold = parse(f"$\\boxed{{{task.hidden['answer']}}}$")
        pred = parse(
            f"$\\boxed{{{extract_boxed(reply)}}}$",
            fallback_mode="no_fallback",
            extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        )
        verify(gold, pred)
    return len(pairs) / (time.perf_counter() - start)


async def bench_math(n: int) -> dict:
    """MATH-500 and GSM8K gold answers (half of them replaced by a wrong one)."""
    cls = get_env("math")
    from envs.data import data_root

    tasks = [
        *cls.load_tasks(cls.Params(limit=n // 2), None, "test"),
        *cls.load_tasks(cls.Params(limit=n - n // 2), data_root() / "gsm8k" / "test.jsonl", "test"),
    ]
    pairs = [(t, f"\\boxed{{{t.hidden['answer'] if i % 2 else 7}}}") for i, t in enumerate(tasks)]
    results, wall, busy = await _episodes("math", {}, pairs, len(pairs))
    return _line("math", results, wall, 0.0, "math-verify in-process, sequential", _math_baseline(pairs))


async def _code_baseline(pairs: list[tuple[Task, str]], build) -> float:
    limits, runner = ExecLimits(), HostRunner()

    def job(task: Task, reply: str):
        tests = CodeTests.model_validate(task.hidden["tests"])
        return lambda: grade(runner, tests, build(task, reply), limits)

    results, wall = await _gated([job(t, r) for t, r in pairs], CONCURRENCY)
    return len(results) / wall


async def bench_call(n: int) -> dict:
    """MBPP gold solutions (function-call tests, literal expected values)."""
    from envs.code import build_program

    cls = get_env("mbpp")
    tasks = cls.load_tasks(cls.Params.model_validate({**DOCKER, "limit": n}), None, "test")
    pairs = [(t, f"```python\n{t.hidden['gold']}\n```") for t in tasks]
    results, wall, busy = await _episodes("mbpp", DOCKER, pairs, CONCURRENCY)
    base = await _code_baseline(pairs, lambda t, r: build_program(t.hidden["prefix"], r))
    return _line("call", results, wall, busy, "same harness as a host subprocess", base)


async def bench_stdio(n: int) -> dict:
    """The APPS subset's stdin/stdout problems (all their hidden tests), one fixed program."""
    from envs.code import build_program

    cls = get_env("apps")
    tasks = [
        t
        for t in cls.load_tasks(cls.Params.model_validate(DOCKER), None, "test")
        if t.hidden["tests"]["mode"] == "stdio"
    ][:n]
    pairs = [(t, f"```python\n{STDIO_PROGRAM}```") for t in tasks]
    results, wall, busy = await _episodes("apps", DOCKER, pairs, CONCURRENCY)
    base = await _code_baseline(pairs, lambda t, r: build_program(t.hidden["prefix"], r))
    line = _line("stdio", results, wall, busy, "same harness as a host subprocess", base)
    line["tests_per_s"] = round(sum(r.info["total"] for r in results) / wall, 1)
    return line


async def bench_swe(tasks_file: Path | None) -> dict:
    """SWE grading hook: each task's gold patch through `reward.swe.grade_swe` (the SWE
    engineer's grader) in a fresh sandbox, on tasks from `codeworld swe build-tasks`."""
    if tasks_file is None:
        return {"family": "swe", "skipped": "pass --swe-tasks FILE (built by `codeworld swe build-tasks`)"}
    from envs.swe.env import SWEParams, task_image
    from envs.swe.task import load_swe_tasks
    from reward.swe import grade_swe

    tasks, params = load_swe_tasks(tasks_file), SWEParams()

    def job(task):
        async def run():
            pool = await shared_pool(params.backend, task_image(task, params), params.pool_size)
            return await grade_swe(task, task.patch, pool)

        return run

    results, wall = await _gated([job(t) for t in tasks], CONCURRENCY)
    total = sum(r.total_s for r in results)
    return {
        "family": "swe",
        "samples": len(results),
        "samples_per_s": round(len(results) / wall, 3),
        "resolved": sum(r.reward == 1.0 for r in results),
        "dropped": sum(r.reward is None for r in results),
        "sandbox_share": round(sum(r.sandbox_s for r in results) / total, 3) if total else 0.0,
        "baseline": None,
        "ratio": None,
    }


async def _warm_up() -> None:
    """Start the math verifier's processes and the sandbox pool outside the timed sections."""
    from reward.math import shared_verifier
    from workers.sandbox import DEFAULT_IMAGE

    await shared_verifier().verify("\\boxed{1}", "1")
    await shared_pool("docker", DEFAULT_IMAGE, DOCKER["sandbox"]["size"])


async def main(args: argparse.Namespace) -> None:
    try:
        await _warm_up()
        for bench in (bench_math(args.n), bench_call(args.n), bench_stdio(args.n), bench_swe(args.swe_tasks)):
            print(json.dumps({**await bench, "cores": os.cpu_count()}), flush=True)
    finally:
        await close_shared_pools()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n",
        type=int,
        default=200,
        help="Samples per family (stdio: at most the APPS subset's 49 stdin/stdout problems).",
    )
    parser.add_argument("--swe-tasks", type=Path, default=None, help="SWE task file for the SWE line.")
    asyncio.run(main(parser.parse_args()))
