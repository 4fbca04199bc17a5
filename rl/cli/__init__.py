"""The `codeworld` command line. Each command group lives in its own module here and is composed
below; heavy imports happen inside the commands so that `codeworld --help` stays fast."""

import typer

from rl.cli import dashboard, envs, model, run, sandbox, swe

app = typer.Typer(no_args_is_help=True, add_completion=False, help="codeworld: async RL for code and reasoning LLMs.")
app.add_typer(model.app, name="model")
app.add_typer(sandbox.app, name="sandbox")
app.add_typer(envs.app, name="envs")
app.add_typer(swe.app, name="swe")
run.register(app)
dashboard.register(app)
