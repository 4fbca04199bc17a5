"""`python -m rl.cli` runs the `codeworld` command."""

from rl.cli import app

app()
