"""`tessera`: the one command. Each subcommand parses params.yaml once and calls plain functions.

A `UserError` (bad input or configuration) is printed as its message alone, exit status 2: no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from core.config import load_params
from core.errors import UserError

app = typer.Typer(help="Tessera: one transformer backbone for text, images, detection and audio.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="the params.yaml to read")


@app.callback()
def _group():
    """Subcommands below; each reads params.yaml."""


@app.command()
def info(params: Path = ParamsOpt):
    """Show each task model for the configured size: parameters, tokens per sample, forward GFLOPs per sample."""
    from core.flops import describe_tasks

    cfg = load_params(params).model
    b = cfg.backbone()
    table = Table(title=f"model.size={cfg.size}: D={b.embed_dim}, depth={b.depth}, heads={b.num_heads}")
    for col in ("task", "input", "tokens", "params (M)", "GFLOPs / sample"):
        table.add_column(col, justify="left" if col in ("task", "input") else "right")
    for row in describe_tasks(cfg):
        table.add_row(row["task"], row["input"], str(row["tokens"]), f"{row['params'] / 1e6:.2f}", f"{row['gflops']:.3f}")
    console.print(table)


data_app = typer.Typer(help="The embedded default dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("generate")
def data_generate(params: Path = ParamsOpt):
    """Write the trimodal digits dataset (images, speech, sentences, detection canvases) to generate.out."""
    from core.digits import GenerateConfig, generate

    p = load_params(params).generate
    counts = generate(p.out, GenerateConfig(seed=p.seed))
    console.print(f"wrote {p.out}: " + ", ".join(f"{m} {c['train']}+{c['test']}" for m, c in counts.items()))


@app.command()
def prepare(params: Path = ParamsOpt):
    """Check every sample, quarantine bad ones, and write model-ready shards (cached by content hash)."""
    from core.prepare import prepare as run

    run(load_params(params), console)


def main() -> None:
    try:
        app()
    except UserError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
