"""`codeworld swe build-tasks`: SWE tasks from a PyPI sdist and its own test suite.

The original code is run once; then single-site AST mutations (see `mutate.py`) are tried in a
seeded order, each in a fresh sandbox, and a mutant becomes a task when it makes between one and
`max_failing` of the originally passing tests fail. The task's base is the mutant (the sdist
plus a host-side `setup_patch`), its gold `patch` the reverse, its FAIL_TO_PASS the tests the
mutant broke and its PASS_TO_PASS the other passing tests of the same files.
"""

from __future__ import annotations

import asyncio
import fnmatch
import shutil
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict
from swebench.harness.log_parsers import parse_log_pytest

from envs.swe.build.mutate import Mutation, sample_mutations
from envs.swe.build.pypi import fetch_deps, fetch_sdist, parse_spec, read_tree, sdist_prefix, sha256_file
from envs.swe.build.statement import write_statement
from envs.swe.diffs import file_diff
from envs.swe.task import SourceSpec, SWETask, write_swe_tasks
from envs.swe.workspace import PolicyFault, SandboxFailure, Workspace
from reward.swe import SessionPool
from workers.sandbox import SandboxError, Status

TEST_CMD = "python3 -m pytest -rA --tb=short -p no:cacheprovider"
_TEST_DIRS = frozenset({"test", "tests", "testing"})
_TEST_NAMES = ("test_*.py", "*_test.py", "tests.py", "test.py")
_NOT_SOURCE_DIRS = frozenset({"docs", "doc", "examples", "example", "benchmarks", "bench", "scripts"})
_CONFIG_FILES = ("conftest.py", "setup.cfg", "tox.ini", "pytest.ini", "pyproject.toml")


class BuildConfig(BaseModel):
    """What `build-tasks` builds, and where."""

    model_config = ConfigDict(extra="forbid")

    package: str
    """The PyPI package as NAME==VERSION."""
    n: int
    """How many tasks to build."""
    out: Path
    """The JSONL task file to write; the sdist (and dependencies) are copied beside it."""
    cache: Path
    """Download cache (sdists, dependency bundles), reused across runs."""
    deps: list[str] = []
    """Requirements the tests need (installed as wheels, shipped into the sandbox)."""
    seed: int = 0
    """Seed of the mutation order: the same seed builds the same tasks."""
    max_failing: int = 10
    """Mutants that break more tests than this are skipped (too broad to be a good bug)."""
    max_attempts: int = 200
    """Give up after trying this many mutants."""
    test_timeout_s: float = 300.0
    """Time limit of one test-suite run."""
    image: str | None = None
    """Sandbox image written into the tasks; None = the environment's default."""


class Layout(BaseModel):
    """Where an sdist keeps its code and its tests."""

    source_files: list[str]
    """Python files of the library (candidates for mutation)."""
    test_files: list[str]
    """Python test files."""
    trusted_files: list[str]
    """Test files and test configuration a model may not change."""
    pythonpath: list[str]
    """Folders to put on PYTHONPATH (`src` for a src layout)."""


def is_test_file(path: str) -> bool:
    """Whether `path` is a Python test file by pytest's usual conventions."""
    p = PurePosixPath(path)
    if p.suffix != ".py":
        return False
    return any(part in _TEST_DIRS for part in p.parts[:-1]) or any(fnmatch.fnmatch(p.name, t) for t in _TEST_NAMES)


def detect_layout(tree: dict[str, bytes], package: str) -> Layout:
    """The sdist's layout; ValueError naming the package when it ships no tests or no code."""
    tests = sorted(p for p in tree if is_test_file(p))
    source = sorted(
        p
        for p in tree
        if p.endswith(".py")
        and p not in tests
        and PurePosixPath(p).name not in ("setup.py", "conftest.py")
        and not (set(PurePosixPath(p).parts[:-1]) & _NOT_SOURCE_DIRS)
        and "egg-info" not in p
    )
    if not tests:
        raise ValueError(f"The sdist of {package} ships no test files (test_*.py or tests/), so no tasks can be built.")
    if not source:
        raise ValueError(f"The sdist of {package} has no Python source files to mutate.")
    config = [p for p in tree if PurePosixPath(p).name in _CONFIG_FILES]
    src_layout = any(p.startswith("src/") for p in source)
    return Layout(
        source_files=source,
        test_files=tests,
        trusted_files=sorted(set(tests) | set(config)),
        pythonpath=["src"] if src_layout else ["."],
    )


async def run_suite(task: SWETask, pool: SessionPool, timeout_s: float) -> tuple[dict[str, str], str, bool]:
    """Run the task's tests at its base in a fresh sandbox: (status map, test output, whether
    the run ended by itself rather than by a limit). A lost sandbox is retried once on a fresh
    one, since the build is long and a daemon hiccup should not end it."""
    for attempt in range(2):
        try:
            async with pool.session() as box:
                workspace = Workspace(box, task)
                await workspace.prepare()
                run = await workspace.run_tests(timeout_s)
            break
        except PolicyFault as err:  # the code under test killed the sandbox: not a clean run
            return {}, str(err), False
        except (SandboxFailure, SandboxError) as err:
            if attempt == 1:
                raise RuntimeError(f"The sandbox failed twice while testing {task.instance_id}: {err}") from err
    output = run.stdout.decode(errors="replace")
    return parse_log_pytest(output, None), output, run.status in (Status.OK, Status.RUNTIME_ERROR)


def _template(cfg: BuildConfig, sdist: Path, layout: Layout, deps: Path | None) -> SWETask:
    name, version = parse_spec(cfg.package)
    return SWETask(
        instance_id=f"{name}-{version}",
        repo=name,
        version=version,
        problem_statement="",
        base_commit=f"sha256:{sha256_file(sdist)}",
        FAIL_TO_PASS=[],
        PASS_TO_PASS=[],
        image=cfg.image,
        source=SourceSpec(
            tarball=str(sdist),
            prefix=sdist_prefix(sdist),
            pythonpath=layout.pythonpath,
            deps=str(deps) if deps else None,
        ),
        test_cmd=TEST_CMD,
        test_files=layout.test_files,
        trusted_files=layout.trusted_files,
    )


async def _try_mutant(
    index: int,
    mutation: Mutation,
    template: SWETask,
    base: dict[str, bytes],
    passing: list[str],
    cfg: BuildConfig,
    pool: SessionPool,
) -> SWETask | None:
    """The task made from `mutation`, or None when it breaks no test, too many, or hangs."""
    original = base[mutation.path]
    setup = file_diff(mutation.path, original, mutation.source.encode())
    assert template.source is not None
    task = template.model_copy(update={"source": template.source.model_copy(update={"setup_patch": setup})})
    status, log, clean = await run_suite(task, pool, cfg.test_timeout_s)
    failing = [t for t in passing if status.get(t) != "PASSED"]
    if not clean or not 1 <= len(failing) <= cfg.max_failing:
        return None
    files = sorted({t.split("::")[0] for t in failing})
    return task.model_copy(
        update={
            "instance_id": f"{template.instance_id}-m{index:04d}",
            "problem_statement": write_statement(template.repo, template.version, failing, log),
            "patch": file_diff(mutation.path, mutation.source.encode(), original),
            "FAIL_TO_PASS": failing,
            "PASS_TO_PASS": [t for t in passing if t not in failing and t.split("::")[0] in files],
            "test_files": files,
        }
    )


async def build_tasks(cfg: BuildConfig, pool: SessionPool, workers: int = 2) -> list[SWETask]:
    """Build up to `cfg.n` tasks and write them to `cfg.out`; returns them."""
    sources = cfg.out.parent / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    sdist = Path(shutil.copy2(fetch_sdist(cfg.package, cfg.cache), sources))
    deps = Path(shutil.copy2(fetch_deps(cfg.deps, cfg.cache), sources)) if cfg.deps else None
    base = read_tree(sdist, sdist_prefix(sdist))
    layout = detect_layout(base, cfg.package)
    template = _template(cfg, sdist, layout, deps)
    status, _, clean = await run_suite(template, pool, cfg.test_timeout_s)
    passing = [t for t, s in status.items() if s == "PASSED" and "::" in t]
    if not clean or not passing:
        raise RuntimeError(f"The test suite of {cfg.package} does not run in the sandbox (no passing test).")
    files = {p: base[p].decode() for p in layout.source_files}
    candidates = sample_mutations(files, cfg.seed)[: cfg.max_attempts]
    built: list[SWETask] = []
    for wave in range(0, len(candidates), workers):
        batch = list(enumerate(candidates))[wave : wave + workers]
        results = await asyncio.gather(*(_try_mutant(i, m, template, base, passing, cfg, pool) for i, m in batch))
        built += [t for t in results if t is not None]
        if len(built) >= cfg.n:
            break
    built = built[: cfg.n]
    write_swe_tasks(built, cfg.out)
    return built
