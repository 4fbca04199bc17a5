"""Fixtures of the SWE tests: a real Docker sandbox pool, tasks built once per session from two
real PyPI sdists, and official-layout images of five SWE-bench Lite instances from three
repositories built by `codeworld swe build-image` (downloads cached under the repository's
gitignored .cache/swe; images built once per machine and reused while their recipe holds)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from envs.data import data_root
from envs.swe.build.tasks import BuildConfig, build_tasks
from envs.swe.env import SWEParams, task_image, task_pool_options
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
    pool = await shared_pool("docker", DEFAULT_IMAGE, 2, lease=True)  # held: never closed to make room
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
    summary = run_cli(
        "swe", "build-tasks", "--package", "inflection==0.5.1", "--n", "2", "--out", str(out), "--cache", str(CACHE)
    ).summary
    assert summary["built"] == 2 and summary["out"] == str(out)
    return load_swe_tasks(out)


@pytest.fixture(scope="session")
def built_tasks(toolz_tasks: list[SWETask], inflection_tasks: list[SWETask]) -> list[SWETask]:
    """All five built tasks, from two packages."""
    return toolz_tasks + inflection_tasks


LITE = data_root() / "swebench_lite"
FLASK_2_0 = ["Werkzeug==2.3.7", "Jinja2==3.0.1", "itsdangerous==2.1.2", "click==8.0.1", "MarkupSafe==2.1.3"]
FLASK_2_2 = ["Werkzeug==2.3.7", "Jinja2==3.1.2", "itsdangerous==2.1.2", "click==8.1.3", "MarkupSafe==2.1.3"]
OFFICIAL: dict[str, tuple[str, str, list[str]]] = {
    "marshmallow-code__marshmallow-1359": ("dev.json", "marshmallow==3.0.0", ["pytz==2024.1", "simplejson==3.19.2"]),
    "pydicom__pydicom-1256": ("dev.json", "pydicom==2.1.0", []),
    "pydicom__pydicom-1694": ("dev.json", "pydicom==2.3.0", []),
    "pallets__flask-4992": ("test.json", "flask==2.2.3", FLASK_2_2),
    "pallets__flask-4045": ("test.json", "flask==2.0.0", FLASK_2_0),
}
"""SWE-bench Lite instances whose repositories' sdists of the exact version carry the files both
their patches touch, with the pins SWE-bench's specs give their test environments (MarkupSafe
2.1.3: the first with wheels for the image's Python 3.11). The dependencies' versions are those
SWE-bench's specs name, so PASS_TO_PASS holds as it does in the official images."""
OFFICIAL_PARAMS = SWEParams(pull_images=False, pool_size=2)
"""The SWE settings the official-layout tests run with: local images only (nothing is pulled)."""


@pytest.fixture(scope="session")
def official_tasks() -> dict[str, SWETask]:
    """The OFFICIAL instances, as SWE-bench Lite publishes them."""
    rows = {t.instance_id: t for name in ("dev.json", "test.json") for t in load_swe_tasks(LITE / name)}
    return {instance: rows[instance] for instance in OFFICIAL}


@pytest.fixture(scope="session")
def official_images(official_tasks: dict[str, SWETask]) -> dict[str, str]:
    """Instance -> its official-layout image, built by `codeworld swe build-image` (cached)."""
    images = {}
    for instance, (data, package, deps) in OFFICIAL.items():
        args = [
            "swe",
            "build-image",
            "--data",
            str(LITE / data),
            "--instance",
            instance,
            "--package",
            package,
            "--cache",
            str(CACHE),
        ]
        summary = run_cli(*args, *[a for dep in deps for a in ("--dep", dep)]).summary
        assert summary["tag"] == task_image(official_tasks[instance], OFFICIAL_PARAMS)
        images[instance] = summary["tag"]
    return images


async def official_pool(task: SWETask) -> SandboxPool:
    """This loop's shared pool for an official-layout task, as its episodes get it."""
    profile, images = task_pool_options(task, OFFICIAL_PARAMS)
    return await shared_pool("docker", task_image(task, OFFICIAL_PARAMS), 2, None, profile, images)
