"""`codeworld swe ...` commands: build SWE tasks from PyPI sdists, point a SWE-bench instance at
an sdist or build an official-layout image for it, pull instance images onto a node, and grade
diffs (gold patches or model predictions) in sandboxes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="SWE tasks: build them from PyPI sdists, grade diffs.")

DEFAULT_IMAGE = "codeworld-sandbox:py311"


def _default_cache() -> Path:
    return Path(os.environ.get("CODEWORLD_CACHE", Path.home() / ".cache" / "codeworld")) / "swe"


def _fail(message: str) -> NoReturn:
    typer.echo(f"codeworld: {message}", err=True)
    raise typer.Exit(1)


@app.command("build-tasks")
def build_tasks_cmd(
    package: str = typer.Option(..., help="PyPI package as NAME==VERSION; its sdist must ship its tests."),
    n: int = typer.Option(5, min=1, help="How many tasks to build."),
    out: Optional[Path] = typer.Option(None, help="Task file (JSONL); default swe-tasks/NAME-VERSION.jsonl."),
    dep: list[str] = typer.Option([], help="A requirement the tests need (repeatable)."),
    seed: int = typer.Option(0, help="Seed of the mutation order."),
    max_failing: int = typer.Option(10, min=1, help="Skip mutants that break more tests than this."),
    max_attempts: int = typer.Option(200, min=1, help="Mutants to try at most."),
    backend: str = typer.Option("docker", help="Sandbox backend: docker or local."),
    image: str = typer.Option(DEFAULT_IMAGE, help="Sandbox image the tests run in."),
    workers: int = typer.Option(2, min=1, help="Mutants tested at once (sandboxes in the pool)."),
    cache: Path = typer.Option(_default_cache(), help="Download cache (sdists, wheels)."),
) -> None:
    """Build SWE tasks by injecting bugs into a PyPI package and keeping those its tests catch."""
    from envs.swe.build.pypi import parse_spec
    from envs.swe.build.tasks import BuildConfig, build_tasks

    try:
        name, version = parse_spec(package)
    except ValueError as err:
        _fail(str(err))
    out = out or Path("swe-tasks") / f"{name}-{version}.jsonl"
    cfg = BuildConfig(
        package=package,
        n=n,
        out=out.resolve(),
        cache=cache.resolve(),
        deps=dep,
        seed=seed,
        max_failing=max_failing,
        max_attempts=max_attempts,
        image=None if image == DEFAULT_IMAGE else image,
    )

    async def run() -> list[Any]:
        from workers.sandbox import SandboxPool

        async with SandboxPool(backend=backend, image=image, size=workers) as pool:  # type: ignore[arg-type]
            return await build_tasks(cfg, pool, workers=workers)

    try:
        tasks = asyncio.run(run())
    except (ValueError, RuntimeError) as err:
        _fail(str(err))
    typer.echo(
        json.dumps(
            {
                "package": package,
                "requested": n,
                "built": len(tasks),
                "out": str(out),
                "instance_ids": [t.instance_id for t in tasks],
            }
        )
    )
    if not tasks:
        _fail(f"no mutant of {package} made its tests fail within {max_attempts} attempts.")


@app.command("from-sdist")
def from_sdist_cmd(
    data: Path = typer.Option(..., help="SWE-bench instance file (JSON array or JSONL)."),
    instance: str = typer.Option(..., "--id", help="The instance_id to materialise."),
    package: str = typer.Option(..., help="The sdist standing in for the repository, NAME==VERSION."),
    dep: list[str] = typer.Option([], help="A requirement the tests need (repeatable)."),
    out: Path = typer.Option(..., help="Task file (JSONL) to write."),
    cache: Path = typer.Option(_default_cache(), help="Download cache (sdists, wheels)."),
) -> None:
    """Point a SWE-bench instance at a PyPI sdist (checked against its patches) so it runs here."""
    from envs.swe.build.swebench_sdist import from_sdist
    from envs.swe.task import load_swe_tasks, write_swe_tasks

    try:
        found = [t for t in load_swe_tasks(data) if t.instance_id == instance]
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if not found:
        _fail(f"{data} has no instance {instance!r}.")
    try:
        task = from_sdist(found[0], package, dep, cache.resolve(), out.resolve().parent)
    except (ValueError, RuntimeError) as err:
        _fail(str(err))
    write_swe_tasks([task], out.resolve())
    typer.echo(json.dumps({"instance_id": instance, "package": package, "out": str(out)}))


def _one_task(data: Path, instance: str, dataset: str) -> Any:
    from envs.swe.task import load_swe_tasks

    try:
        rows = load_swe_tasks(data, dataset)  # type: ignore[arg-type]
        found = [t for t in rows if t.instance_id == instance]
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if not found:
        _fail(f"{data} has no instance {instance!r}.")
    return found[0]


@app.command("build-image")
def build_image_cmd(
    data: Path = typer.Option(..., help="Task file with the instance (SWE-bench JSON array or JSONL)."),
    instance: str = typer.Option(..., help="The instance_id to build an image for."),
    package: Optional[str] = typer.Option(
        None,
        help="The sdist standing in for the repository, NAME==VERSION; default: the repository's name at its version.",
    ),
    dep: list[str] = typer.Option([], help="A requirement of the tests, from PyPI wheels (repeatable)."),
    tag: Optional[str] = typer.Option(None, help="Image name; default: the official one (--image-template)."),
    image_template: Optional[str] = typer.Option(
        None, help="Image names as a template, e.g. 'registry:5000/{name}' (see docs/swe.md)."
    ),
    dataset: str = typer.Option("auto", help="swe-bench, swe-gym, swe-smith or auto."),
    cache: Path = typer.Option(_default_cache(), help="Download cache (sdists, wheels, Debian packages)."),
) -> None:
    """Build an official-layout image (/testbed, the conda-style env) for one instance from an sdist."""
    from envs.swe.build.image import build_instance_image
    from envs.swe.official import image_for

    task = _one_task(data, instance, dataset)
    if not task.image_resident():
        _fail(f"{instance} brings its repository as a tarball; it needs no image of its own.")
    try:
        name = tag or image_for(task, image_template, "--image-template")
        built = build_instance_image(
            task,
            package or f"{task.repo.rsplit('/', 1)[-1]}=={task.version}",
            dep,
            cache.resolve(),
            name,
            echo=lambda line: typer.echo(line, err=True),
        )
    except (ValueError, RuntimeError) as err:
        _fail(str(err))
    typer.echo(json.dumps({"instance_id": instance, **built.model_dump()}))


@app.command("pull")
def pull_cmd(
    data: Path = typer.Option(..., help="Task file (SWE-bench, SWE-Gym or SWE-smith rows)."),
    instance: list[str] = typer.Option([], "--id", help="Only these instance ids (repeatable)."),
    image_template: Optional[str] = typer.Option(None, help="Image names as a template (see docs/swe.md)."),
    dataset: str = typer.Option("auto", help="swe-bench, swe-gym, swe-smith or auto."),
    budget_gb: Optional[float] = typer.Option(None, help="Disk this node's SWE images may take (LRU)."),
) -> None:
    """Pull the images of a task file's official-layout instances onto this node."""
    import docker

    from envs.swe.official import image_for
    from envs.swe.task import load_swe_tasks
    from workers.sandbox import ImagePolicy
    from workers.sandbox.images import ImageStore, ImageUnavailable

    try:
        rows = load_swe_tasks(data, dataset)  # type: ignore[arg-type]
        tasks = [t for t in rows if not instance or t.instance_id in instance]
        images = list(
            dict.fromkeys(image_for(t, image_template, "--image-template") for t in tasks if t.image_resident())
        )
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    policy = ImagePolicy(pull=True, manage=True, budget_gb=budget_gb)
    store = ImageStore(docker.from_env(timeout=1800), policy)
    counts = {"present": 0, "pulled": 0, "failed": 0}
    for image in images:
        had = bool(store.held([image]))
        try:
            store.ensure(image)
            counts["present" if had else "pulled"] += 1
        except ImageUnavailable as err:
            counts["failed"] += 1
            typer.echo(f"codeworld: {err}", err=True)
    typer.echo(json.dumps({"images": len(images), **counts}))
    if counts["failed"]:
        raise typer.Exit(1)


@app.command("grade")
def grade_cmd(
    data: Path = typer.Option(..., help="Task file: SWE-bench JSON/JSONL or built tasks."),
    predictions: Optional[Path] = typer.Option(None, help="JSONL of {instance_id, model_patch}."),
    gold: bool = typer.Option(False, "--gold", help="Grade each task's own gold patch."),
    instance: list[str] = typer.Option([], "--id", help="Only these instance ids (repeatable)."),
    backend: str = typer.Option("docker", help="Sandbox backend: docker or local."),
    image: str = typer.Option(DEFAULT_IMAGE, help="Image of tasks that bring a source tarball."),
    image_template: Optional[str] = typer.Option(None, help="Official-layout image names as a template."),
    dataset: str = typer.Option("auto", help="swe-bench, swe-gym, swe-smith or auto."),
    workers: int = typer.Option(2, min=1, help="Tasks graded at once."),
    out: Optional[Path] = typer.Option(None, help="Per-task results (JSONL)."),
) -> None:
    """Grade diffs against tasks' hidden tests; prints {"n", "passed", "failed", "errors"}."""
    from envs.swe.env import SWEParams
    from envs.swe.task import load_swe_tasks

    if gold == (predictions is not None):
        _fail("give exactly one of --predictions FILE and --gold.")
    try:
        params = SWEParams(
            backend=backend,
            image=image,
            pool_size=workers,  # type: ignore[arg-type]
            image_template=image_template,
            dataset=dataset,
        )  # type: ignore[arg-type]
        tasks = [t for t in load_swe_tasks(data, params.dataset) if not instance or t.instance_id in instance]
        diffs = {t.instance_id: t.patch for t in tasks} if gold else _read_predictions(predictions)
    except (ValueError, FileNotFoundError) as err:
        _fail(_first_error(err))
    if not tasks:
        _fail(f"{data} has none of the requested instances.")
    results = asyncio.run(_grade_all(tasks, diffs, params, workers))
    if out is not None:
        out.write_text("".join(json.dumps(r) + "\n" for r in results))
    rewards = [r["reward"] for r in results]
    typer.echo(
        json.dumps(
            {
                "n": len(results),
                "passed": rewards.count(1.0),
                "failed": rewards.count(0.0),
                "errors": rewards.count(None),
            }
        )
    )
    for r in results:
        if r["reward"] is None:
            typer.echo(f"{r['instance_id']}: no verdict: {r['error']}", err=True)


def _read_predictions(path: Path | None) -> dict[str, str]:
    from envs.data import read_records

    assert path is not None
    rows = read_records(path)
    try:
        return {str(r.get("instance_id", r.get("task_id"))): r.get("model_patch", r.get("output")) or "" for r in rows}
    except AttributeError:
        raise ValueError(f"{path}: every line must be a JSON object with instance_id and model_patch.") from None


def _first_error(err: Exception) -> str:
    """One sentence for a bad input: a settings error names the setting."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(err)


async def _grade_all(tasks: list[Any], diffs: dict[str, str], params: Any, workers: int) -> list[dict[str, Any]]:
    from envs.swe.env import task_image, task_pool_options, unavailable_message
    from envs.swe.pools import close_shared_pools, release_pool, shared_pool
    from reward.swe import GradeResult, grade_swe
    from workers.sandbox import SandboxUnavailable

    limit = asyncio.Semaphore(workers)

    async def one(task: Any) -> dict[str, Any]:
        async with limit:
            image_name = task_image(task, params)
            try:
                options = task_pool_options(task, params)
                pool = await shared_pool(params.backend, image_name, workers, None, *options, lease=True)
            except SandboxUnavailable as err:
                result = GradeResult(reward=None, error=unavailable_message(task, image_name, err))
            else:
                try:
                    result = await grade_swe(
                        task,
                        diffs.get(task.instance_id, ""),
                        pool,
                        timeout_s=params.test_timeout_s,
                        memory_mb=params.memory_mb,
                    )
                finally:
                    release_pool(pool)
        return {"instance_id": task.instance_id, **result.model_dump()}

    try:
        return await asyncio.gather(*(one(t) for t in tasks))
    finally:
        await close_shared_pools()
