"""`codeworld envs ...` commands: list and show the registered environments, validate a dataset's
own gold answers through an environment's verifier, and grade a file of model outputs.

`validate` and `grade` print one JSON line: {"env", "n", "passed", "failed", "errors"}. A sample
passes with reward 1, fails with a lower reward, and is an error when no reward could be given
(sandbox or verifier failure, no gold answer, unknown task id). `--out` writes one JSON line per
sample with the details.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="List, inspect, validate and grade with environments.")


def _fail(message: str) -> None:
    """Report a user error as one plain line on stderr and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _env_class(name: str):
    from envs.registry import get_env

    try:
        return get_env(name)
    except KeyError as exc:
        _fail(str(exc.args[0]))


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


@app.command("list")
def list_cmd() -> None:
    """Print every registered environment: name, defining module, one-line description."""
    from envs.registry import list_envs

    for name, cls in list_envs().items():
        typer.echo(f"{name:<14} {cls.__module__:<18} {_first_line(cls.__doc__)}")


def _field_docs(model: type) -> dict[str, str]:
    """Attribute docstrings (the string under each field) of a pydantic model and its bases."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(model.__mro__):
        try:
            tree = ast.parse(inspect.getsource(klass).lstrip())
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for field, doc in zip(body, body[1:]):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
            ):
                docs[field.target.id] = " ".join(str(doc.value.value).split())
    return docs


@app.command("show")
def show_cmd(name: str = typer.Argument(..., help="Registered environment name.")) -> None:
    """Print an environment's description and its parameters with defaults."""
    cls = _env_class(name)
    typer.echo(f"{name}  ({cls.__module__}.{cls.__qualname__}, max_turns={cls.max_turns})")
    typer.echo((cls.__doc__ or "").strip())
    docs = _field_docs(cls.Params)
    typer.echo("\nparams:")
    for field, info in cls.Params.model_fields.items():
        default = info.default_factory() if info.default_factory else info.default
        if hasattr(default, "model_dump"):
            default = default.model_dump()
        typer.echo(f"  {field} = {json.dumps(default, default=str)}")
        if docs.get(field):
            typer.echo(f"      {docs[field]}")


def _make_params(cls, params_json: str | None):
    from pydantic import ValidationError

    try:
        raw = json.loads(params_json) if params_json else {}
        return cls.Params.model_validate(raw)
    except json.JSONDecodeError as exc:
        _fail(f"--params is not valid JSON ({exc.msg}).")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "(top level)"
        _fail(f"--params field {where} is not valid for {cls.name}: {first['msg']}.")


def _load(cls, params, data: Path | None) -> list:
    try:
        return list(cls.load_tasks(params, data, "test"))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        _fail(str(exc))


async def _episode(cls, params, task, output: str | None) -> dict[str, Any]:
    """Run one episode on `task` with a fixed reply (repeated each turn of a multi-turn env)."""
    from envs.base import Action

    env = cls(params)
    try:
        await env.reset(task)
        if output is None:
            getter = getattr(env, "gold_output", None)
            output = await getter(task) if getter else None
        if output is None:
            return {"task_id": task.id, "reward": None, "error": "no gold output for this task"}
        for _ in range(max(1, cls.max_turns)):
            result = await env.step(Action(text=output, token_ids=[]))
            if result.done:
                break
        return {
            "task_id": task.id,
            "reward": result.reward,
            "info": result.info,
            "error": None if result.reward is not None else "no reward (verifier failure)",
        }
    except Exception as exc:  # one broken sample must not end the whole run: counted as an error
        return {"task_id": task.id, "reward": None, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        await env.close()


async def _run_all(cls, params, jobs: list[tuple[Any, str | None]], concurrency: int) -> list[dict]:
    import asyncio

    from envs.swe.pools import close_shared_pools

    gate = asyncio.Semaphore(concurrency)

    async def one(task, output):
        async with gate:
            return await _episode(cls, params, task, output)

    try:
        return list(await asyncio.gather(*(one(t, o) for t, o in jobs)))
    finally:
        await close_shared_pools()


def _summarise(name: str, rows: list[dict], out: Path | None) -> None:
    counts = {
        "env": name,
        "n": len(rows),
        "passed": sum(r["reward"] == 1.0 for r in rows),
        "failed": sum(r["reward"] is not None and r["reward"] < 1.0 for r in rows),
        "errors": sum(r["reward"] is None for r in rows),
    }
    if out is not None:
        with out.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
    typer.echo(json.dumps(counts))


DATA = typer.Option(None, "--data", help="Dataset file (default: the env's file under the data root).")
PARAMS = typer.Option(None, "--params", help='Env params as JSON, e.g. \'{"reward_mode": "fraction"}\'.')
OUT = typer.Option(None, "--out", help="Write per-sample results here (JSONL).")
LIMIT = typer.Option(None, "--limit", min=1, help="Only the first N tasks.")
CONCURRENCY = typer.Option(4, "--concurrency", min=1, help="Episodes graded at once.")


@app.command("validate")
def validate_cmd(
    name: str = typer.Argument(..., help="Registered environment name."),
    data: Optional[Path] = DATA,
    params: Optional[str] = PARAMS,
    out: Optional[Path] = OUT,
    limit: Optional[int] = LIMIT,
    concurrency: int = CONCURRENCY,
) -> None:
    """Grade the dataset's own gold answers/solutions with the environment's verifier."""
    import asyncio

    cls = _env_class(name)
    env_params = _make_params(cls, params)
    tasks = _load(cls, env_params, data)[:limit]
    rows = asyncio.run(_run_all(cls, env_params, [(t, None) for t in tasks], concurrency))
    _summarise(name, rows, out)


def _read_predictions(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        _fail(f"Predictions file {path} does not exist.")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "task_id" not in row or not isinstance(row.get("output"), str):
            _fail(f"Predictions file {path} line {n} is not a JSON object with a task_id and a string output.")
        rows.append(row)
    return rows


@app.command("grade")
def grade_cmd(
    name: str = typer.Argument(..., help="Registered environment name."),
    predictions: Path = typer.Option(..., "--predictions", help="JSONL of task_id, output."),
    data: Optional[Path] = DATA,
    params: Optional[str] = PARAMS,
    out: Optional[Path] = OUT,
    concurrency: int = CONCURRENCY,
) -> None:
    """Grade model outputs (JSONL of `task_id`, `output`) with the environment's verifier."""
    import asyncio

    cls = _env_class(name)
    env_params = _make_params(cls, params)
    preds = _read_predictions(predictions)
    tasks = {t.id: t for t in _load(cls, env_params, data)}
    known = [(tasks[p["task_id"]], p["output"]) for p in preds if p["task_id"] in tasks]
    rows = asyncio.run(_run_all(cls, env_params, known, concurrency))
    rows += [
        {"task_id": p["task_id"], "reward": None, "error": "unknown task_id"}
        for p in preds
        if p["task_id"] not in tasks
    ]
    _summarise(name, rows, out)
