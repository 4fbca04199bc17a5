"""`codeworld model ...`: build models locally."""

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="Build and inspect models.")


@app.command("init-tiny")
def init_tiny(
    out: Path = typer.Argument(..., help="Directory to write the Hugging Face checkpoint to."),
    hidden_size: int = typer.Option(128, help="Width of the residual stream."),
    num_layers: int = typer.Option(4, help="Decoder layers."),
    num_heads: int = typer.Option(4, help="Attention heads (head size = hidden/heads)."),
    num_kv_heads: int = typer.Option(2, help="Key/value heads."),
    intermediate_size: int = typer.Option(512, help="MLP width."),
    vocab_size: int = typer.Option(512, help="BPE vocabulary size."),
    seed: int = typer.Option(0, help="Initialisation seed."),
) -> None:
    """Build a randomly initialised Qwen2 model and a locally trained BPE tokenizer."""
    from rl.tiny_model import TinyModelSpec, init_tiny as build

    spec = TinyModelSpec(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        seed=seed,
    )
    n = build(out, spec)
    typer.echo(f"codeworld: wrote a {n / 1e6:.2f} M-parameter Qwen2 model and tokenizer to {out}")
