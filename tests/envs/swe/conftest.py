"""Fixtures of the SWE tests: a real Docker sandbox pool, and tasks built once per session from
two real PyPI sdists (downloads cached under the repository's gitignored .cache/swe)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from envs.swe.build.tasks import BuildConfig, build_tasks
from envs.swe.pools import close_shared_pools, shared_pool
from envs.swe.task import SWETask, load_swe_tasks
from workers.sandbox import DEFAULT_IMAGE, SandboxPool

REPO = Path(__file__).resolve().parents[3]
CACHE = REPO / ".cache" / "swe"
CODEWORLD = [str(Path(sys.executable).parent / "codeworld")]


class CliRun:
    """One `codeworld` run: its process, and the JSON summary its stdout ends with."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.proc = proc
        lines = proc.stdout.strip().splitlines()
        self.summary = json.loads(lines[-1]) if lines else None


def run_cli(*args: str, check: bool = True) -> CliRun:
    """Run `codeworld ARGS` as a user would."""
    proc = subprocess.run([*CODEWORLD, *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"codeworld {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return CliRun(proc)


@pytest.fixture(scope="session")
def swe_cli():
    """`swe_cli(*args, check=True)` runs the codeworld command line."""
    return run_cli


@pytest.fixture(scope="session")
def swe_cache() -> Path:
    """The download cache the SWE tests share (gitignored)."""
    return CACHE


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def swe_pool() -> AsyncIterator[SandboxPool]:
    """The shared SWE pool of the session's loop (the one `SWEEnv` episodes use too)."""
    pool = await shared_pool("docker", DEFAULT_IMAGE, 2)
    yield pool
    await close_shared_pools()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def toolz_task_file(swe_pool: SandboxPool, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task file of three tasks built in-process from toolz 1.2.0."""
    out = tmp_path_factory.mktemp("toolz") / "toolz.jsonl"
    built = await build_tasks(BuildConfig(package="toolz==1.2.0", n=3, out=out, cache=CACHE), swe_pool)
    assert len(built) == 3
    return out


@pytest.fixture(scope="session")
def toolz_tasks(toolz_task_file: Path) -> list[SWETask]:
    """The toolz tasks, read back from the written task file."""
    return load_swe_tasks(toolz_task_file)


@pytest.fixture(scope="session")
def inflection_tasks(tmp_path_factory: pytest.TempPathFactory) -> list[SWETask]:
    """Two tasks built from inflection 0.5.1 by the `codeworld swe build-tasks` command."""
    out = tmp_path_factory.mktemp("inflection") / "inflection.jsonl"
    summary = run_cli("swe", "build-tasks", "--package", "inflection==0.5.1", "--n", "2",
                      "--out", str(out), "--cache", str(CACHE)).summary
    assert summary["built"] == 2 and summary["out"] == str(out)
    return load_swe_tasks(out)


@pytest.fixture(scope="session")
def built_tasks(toolz_tasks: list[SWETask], inflection_tasks: list[SWETask]) -> list[SWETask]:
    """All five built tasks, from two packages."""
    return toolz_tasks + inflection_tasks
