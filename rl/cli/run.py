"""Top-level run commands: `codeworld train` and `codeworld sft`."""

import typer


def register(app: typer.Typer) -> None:
    """Add the run commands to the top-level app."""
