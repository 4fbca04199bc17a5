"""SWE sandboxes in the official layout, all measured in this one run on this machine, on the
instance images `codeworld swe build-image` makes (the SWE tests build five; build others first):

  (a) container start: a new hardened container in the official layout's profile, /testbed
      filled from the image and the agent ready (what a pool does off the latency path), against
      the baseline of a cold `docker run --rm IMAGE true` of the same image;
  (b) episode start from the warm pool: a session, the repository prepared and snapshotted
      (what `SWEEnv.reset` waits for);
  (c) grading: `grade_swe` of each instance's gold patch in a fresh sandbox of the warm pool
      (SWE-bench's evaluation script, swebench's report);
  (d) concurrent episodes held: --episodes sessions of one image open at once, each prepared,
      all answering a shell command; with the memory their containers use.

    python bench/swe.py [--starts 20] [--grades 3] [--episodes 16] [--instance ID ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
import uuid

import docker

from envs.data import data_root
from envs.swe.env import SWEParams, task_image, task_pool_options
from envs.swe.pools import SWE_WORK_MB
from envs.swe.task import SWETask, load_swe_tasks
from envs.swe.workspace import Workspace
from reward.swe import grade_swe
from workers.sandbox import SandboxLimits, SandboxPool
from workers.sandbox.docker_backend import DockerBackend
from workers.sandbox.owner import Owner

INSTANCES = [
    "marshmallow-code__marshmallow-1359",
    "pydicom__pydicom-1256",
    "pydicom__pydicom-1694",
    "pallets__flask-4992",
    "pallets__flask-4045",
]
PARAMS = SWEParams(pull_images=False)
LIMITS = SandboxLimits(work_mb=SWE_WORK_MB, pids=512)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def line(name: str, seconds: list[float]) -> str:
    return (
        f"{name:<52} p50 {pct(seconds, 0.5) * 1e3:8.0f} ms   p99 {pct(seconds, 0.99) * 1e3:8.0f} ms"
        f"   (n={len(seconds)})"
    )


def tasks(ids: list[str]) -> list[SWETask]:
    rows = {
        t.instance_id: t
        for name in ("dev.json", "test.json")
        for t in load_swe_tasks(data_root() / "swebench_lite" / name)
    }
    return [rows[i] for i in ids]


async def container_starts(task: SWETask, n: int) -> tuple[list[float], list[float]]:
    """(a): new containers of the official profile, and the cold `docker run` baseline."""
    image = task_image(task, PARAMS)
    profile, images = task_pool_options(task, PARAMS)
    backend = DockerBackend(image, LIMITS, Owner.current(uuid.uuid4().hex[:12]), profile=profile, images=images)
    await backend.start()
    starts = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            box = await backend.create()
            starts.append(time.perf_counter() - t)
            await box.destroy()
    finally:
        await backend.close()
    client = docker.from_env()
    cold = []
    for _ in range(n):
        t = time.perf_counter()
        client.containers.run(image, ["true"], remove=True, network_mode="none")
        cold.append(time.perf_counter() - t)
    client.close()
    return starts, cold


def new_pool(task: SWETask, size: int) -> SandboxPool:
    profile, images = task_pool_options(task, PARAMS)
    return SandboxPool(
        "docker", image=task_image(task, PARAMS), size=size, limits=LIMITS, profile=profile, images=images
    )


async def episode_starts(task: SWETask, n: int) -> list[float]:
    """(b): session + prepare + snapshot on a warm pool of two."""
    out = []
    async with new_pool(task, 2) as pool:
        for _ in range(n):
            t = time.perf_counter()
            async with pool.session() as box:
                workspace = Workspace(box, task, PARAMS.memory_mb)
                await workspace.prepare()
                await workspace.snapshot()
                out.append(time.perf_counter() - t)
    return out


async def gradings(all_tasks: list[SWETask], repeats: int) -> tuple[list[float], int]:
    """(c): the gold patch of every instance, `repeats` times, on warm pools of two."""
    seconds, resolved = [], 0
    for task in all_tasks:
        async with new_pool(task, 2) as pool:
            for _ in range(repeats):
                result = await grade_swe(task, task.patch, pool)
                seconds.append(result.total_s)
                resolved += result.resolved
    return seconds, resolved


async def concurrent_episodes(task: SWETask, n: int) -> tuple[int, float, float]:
    """(d): n prepared sessions held at once; (answering, seconds to open them all, MB in all)."""
    async with new_pool(task, n) as pool, contextlib.AsyncExitStack() as stack:
        t = time.perf_counter()
        boxes = await asyncio.gather(*(stack.enter_async_context(pool.session()) for _ in range(n)))
        workspaces = [Workspace(box, task, PARAMS.memory_mb) for box in boxes]
        await asyncio.gather(*(w.prepare() for w in workspaces))
        await asyncio.gather(*(w.snapshot() for w in workspaces))
        opened = time.perf_counter() - t
        outs = await asyncio.gather(*(w.shell("pwd && git status --short | wc -l", 60) for w in workspaces))
        answering = sum(o.exit_code == 0 and o.text.startswith("/testbed") for o in outs)
        client = docker.from_env()
        mine = client.containers.list(filters={"label": f"codeworld.owner.pool={pool.owner.pool}"})
        memory = sum(c.stats(stream=False)["memory_stats"].get("usage", 0) for c in mine) / 1e6
        client.close()
    return answering, opened, memory


async def main(args: argparse.Namespace) -> None:
    chosen = tasks(args.instance)
    first = chosen[0]
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"machine: {os.cpu_count()} cores, {gib:.0f} GiB; instances: {', '.join(t.instance_id for t in chosen)}")
    starts, cold = await container_starts(first, args.starts)
    print(line(f"(a) container start, official profile ({first.repo})", starts))
    print(line("    baseline: cold docker run --rm IMAGE true", cold))
    warm = await episode_starts(first, args.starts)
    print(line("(b) episode start from the warm pool", warm))
    grades, resolved = await gradings(chosen, args.grades)
    print(line(f"(c) grading, gold patches ({resolved}/{len(grades)} resolved)", grades))
    answering, opened, memory = await concurrent_episodes(first, args.episodes)
    print(
        f"(d) concurrent episodes held: {answering} of {args.episodes} answering, opened in {opened:.1f} s, "
        f"{memory:.0f} MB in all ({memory / max(answering, 1):.0f} MB each)"
    )
    print(
        f"container start p50 {pct(starts, 0.5) * 1e3:.0f} ms / p99 {pct(starts, 0.99) * 1e3:.0f} ms; "
        f"episode start from the warm pool {pct(starts, 0.5) / pct(warm, 0.5):.1f}x faster than a new "
        "container; "
        f"grading p50 {pct(grades, 0.5):.1f} s / p99 {pct(grades, 0.99):.1f} s; "
        f"concurrent episodes held: {answering}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=20, help="container and episode starts to time")
    parser.add_argument("--grades", type=int, default=3, help="gradings of each instance's gold patch")
    parser.add_argument("--episodes", type=int, default=16, help="episodes to hold at once")
    parser.add_argument("--instance", nargs="+", default=INSTANCES, help="instances (their images must exist)")
    asyncio.run(main(parser.parse_args()))
