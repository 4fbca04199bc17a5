"""`codeworld envs ...` commands."""

import typer

app = typer.Typer(no_args_is_help=True, help="envs commands.")
