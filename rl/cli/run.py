"""Top-level run commands: `codeworld train` and `codeworld sft`."""

import asyncio
import json
import sys
from pathlib import Path

import typer


def _fail(message: str) -> None:
    typer.echo(f"codeworld: {message}", err=True)
    raise typer.Exit(2)


def _resume_target(resume: bool, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`--resume` alone resumes from the run directory's latest checkpoint; `--resume PATH` from
    that checkpoint directory (PATH is the one argument after CONFIG without `=`)."""
    paths = [o for o in overrides if "=" not in o]
    if not resume:
        return None, overrides
    if len(paths) > 1:
        _fail(f"--resume takes one checkpoint directory, not {len(paths)}: {paths}.")
    return (paths[0] if paths else "latest"), [o for o in overrides if "=" in o]


def train(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    overrides: list[str] = typer.Argument(None, help="dotted.key=value overrides."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resource plan only."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Resume from the latest checkpoint of run.dir, or from the checkpoint directory given as `--resume PATH`.",
    ),
) -> None:
    """Run asynchronous RL as configured."""
    from rl.config import ConfigError, load_config
    from rl.faults import RESUMABLE_EXIT, StopResumable

    target, overrides = _resume_target(resume, overrides or [])
    try:
        cfg = load_config(config, overrides)
        if dry_run:
            from rl.placement import dry_run as plan_text

            typer.echo(plan_text(cfg))
            return
        from rl.orchestrator import run_training

        summary = asyncio.run(run_training(cfg, target))
    except (ConfigError, FileNotFoundError, KeyError) as err:
        _fail(str(err).strip('"'))
    except (KeyboardInterrupt, asyncio.CancelledError):
        typer.echo("codeworld: interrupted; everything the run started has been stopped.", err=True)
        raise typer.Exit(130)
    except StopResumable as err:
        typer.echo(f"codeworld: {err}. Resume it with: {_resume_command(config, overrides)}", err=True)
        raise typer.Exit(RESUMABLE_EXIT)
    typer.echo(json.dumps(summary.model_dump(mode="json"), indent=2))
    if summary.stopped is not None:
        typer.echo(
            f"codeworld: {summary.stopped}; checkpointed. Resume it with: {_resume_command(config, overrides)}",
            err=True,
        )
        return
    from rl.api.server import watch_command

    board = cfg.logging.dashboard
    typer.echo(f"codeworld: watch this run: {watch_command(cfg.run.dir, board.host, board.port)}", err=True)


def _resume_command(config: Path, overrides: list[str]) -> str:
    import shlex

    return shlex.join(["codeworld", "train", str(config), *overrides, "--resume"])


def sft(
    config: Path = typer.Argument(..., help="SFT config (YAML)."),
    model: Path = typer.Option(..., help="Hugging Face checkpoint to start from."),
    out: Path = typer.Option(..., help="Where to write the trained checkpoint."),
    overrides: list[str] = typer.Argument(None, help="dotted.key=value overrides."),
) -> None:
    """Supervised warm start on tasks with known answers."""
    import yaml
    from pydantic import ValidationError

    from rl.config import ConfigError, apply_override
    from rl.sft import SftConfig, run_sft

    try:
        if not config.is_file():
            _fail(f"config {str(config)!r} does not exist.")
        tree = yaml.safe_load(config.read_text())
        for o in overrides or []:
            apply_override(tree, o)
        cfg = SftConfig.model_validate(tree)
    except ValidationError as err:
        _fail("invalid SFT config: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()))
    except ConfigError as err:
        _fail(str(err))
    result = run_sft(cfg, model, out, log=lambda m: print(m, file=sys.stderr, flush=True))
    typer.echo(json.dumps({"out": str(out), **result}))


def register(app: typer.Typer) -> None:
    """Add the run commands to the top-level app."""
    app.command("train")(train)
    app.command("sft")(sft)
