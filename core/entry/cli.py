"""`tessera`: the one command. Each subcommand parses params.yaml once and calls plain functions.

A `UserError` (bad input or configuration) is printed as its message alone, exit status 2: no traceback. A stage
stopped by Ctrl-C or SIGTERM says so in one line, exit status 130 or 143.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tessera.core.config import load_params
from tessera.core.errors import UserError
from tessera.core.runtime.launch import Stopped, stop_on_signals
from tessera.core.stagetable import STAGES, Stage, stage_named

app = typer.Typer(help="Tessera: one transformer backbone for text, images, detection and audio.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="the params.yaml to read")


@app.callback()
def _group():
    """Subcommands below; each reads params.yaml."""


@app.command("params")
def params_(
    section: str = typer.Argument("", help="only the keys under this one, e.g. train or model.audio"),
    markdown: bool = typer.Option(False, "--markdown", help="a Markdown table instead of the terminal's"),
):
    """Every params.yaml key with its type, default and meaning, from the config models (core/config.py)."""
    from tessera.core.config import describe_params

    rows = [r for r in describe_params() if r["key"] == section or r["key"].startswith(section)]
    if not rows:
        raise UserError(f"no params.yaml key starts with {section!r}; `tessera params` lists them all")
    if markdown:
        print("| key | type | default | meaning |\n|---|---|---|---|")
        for r in rows:
            default = f"`{r['default']}`" if r["default"] else ""
            print(f"| `{r['key']}` | {r['type']} | {default} | {r['meaning']} |")
        return
    table = Table(box=None, show_edge=False)
    for col in ("key", "type", "default", "meaning"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["key"], r["type"], r["default"], r["meaning"])
    console.print(table)


@app.command()
def info(params: Path = ParamsOpt):
    """Show each task model for the configured size: parameters, tokens per sample, forward GFLOPs per sample."""
    from tessera.core.entry.flops import describe_tasks

    cfg = load_params(params).model
    b = cfg.backbone()
    table = Table(title=f"model.size={cfg.size}: D={b.embed_dim}, depth={b.depth}, heads={b.num_heads}")
    for col in ("task", "input", "tokens", "params (M)", "GFLOPs / sample"):
        table.add_column(col, justify="left" if col in ("task", "input") else "right")
    for row in describe_tasks(cfg):
        table.add_row(row["task"], row["input"], str(row["tokens"]), f"{row['params'] / 1e6:.2f}", f"{row['gflops']:.3f}")
    console.print(table)


def require_server() -> None:
    from tessera.flows.artifacts import tracked

    if not tracked():
        raise UserError("no Prefect server configured: start one with `prefect server start` and set "
                        "PREFECT_API_URL=http://127.0.0.1:4200/api (docs/orchestration.md)")


data_app = typer.Typer(help="The embedded default dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")
GROUPS = {"data": data_app}


def add_stage_command(stage: Stage) -> None:
    """`tessera <stage>`: runs the stage's Prefect flow (flows/stages.py), tracked when a Prefect server is
    configured; `--params` and the stage's options are the flow's keyword arguments."""
    def command(**kwargs):
        from tessera.flows.stages import flow_of, run_stage  # late: `--help` and `params` skip Prefect and the stages

        stop_on_signals()
        run_stage(flow_of(stage), **{k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()})

    options = [inspect.Parameter("params", inspect.Parameter.KEYWORD_ONLY, default=ParamsOpt, annotation=Path)
               ] if stage.section else []
    options += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(o.default, help=o.help),
                                  annotation=o.type if o.default is not None else o.type | None) for o in stage.options]
    command.__signature__ = inspect.Signature(options)  # what typer reads the options from
    *group, name = stage.words
    (GROUPS[group[0]] if group else app).command(name, help=stage.help)(command)


for declared in STAGES:
    if declared.cli:
        add_stage_command(declared)


@app.command(help=stage_named("sweep").help)
def sweep(
    params: Path = ParamsOpt,
    promote: bool = typer.Option(False, "--promote", help="then apply the best trial (`dvc exp apply`) and `dvc repro` "
                                                        "what is stale (or set sweep.promote)"),
):
    import os

    from tessera.core.sweep.plan import plan_sweep
    from tessera.core.sweep.workspace import check_repository
    from tessera.flows.artifacts import tracked
    from tessera.flows.sweep import sweep as sweep_flow

    if params.resolve() != (Path.cwd() / "params.yaml").resolve():
        raise UserError(f"{params}: tessera sweep reads the params.yaml of the repository it runs in (each trial is "
                        "`dvc exp run`, whose stages read params.yaml): run it there, without --params")
    plan_sweep(params)  # a mistake in the section or the repository stops here, before Prefect starts
    check_repository(Path.cwd())
    if not tracked():  # Prefect's temporary server: offline, so no telemetry (its heartbeat also locks the database)
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    sweep_flow(params=str(params), promote=promote)


@app.command()
def schedule(params: Path = ParamsOpt):
    """Serve a deployment of every flow, scheduled as orchestrate.schedules says, until interrupted.
    Needs a Prefect server: PREFECT_API_URL=http://127.0.0.1:4200/api after `prefect server start`."""
    from tessera.flows.schedule import schedule

    require_server()
    schedule(str(params))


@app.command()
def deploy(params: Path = ParamsOpt, pool: str = typer.Option(..., help="the Prefect work pool whose workers run them")):
    """Register a deployment of every flow on a Prefect work pool (`prefect work-pool create`), scheduled as
    orchestrate.schedules says; `prefect worker start --pool POOL` runs them, in this directory for a process pool."""
    from tessera.flows.schedule import deploy as register

    require_server()
    for name in register(str(params), pool):
        console.print(f"deployed {name} to work pool {pool}")


@app.command()
def predict(
    model: Path = typer.Argument(..., help="an exported task folder, e.g. models/export/image"),
    files: list[Path] = typer.Argument(..., help="files, or folders to search for files of the model's modality; "
                                       "for a fused task, tables of records (CSV, TSV, JSONL, Parquet)"),
    json_out: bool = typer.Option(False, "--json", help="one JSON object per input instead of a table"),
    top_k: int = typer.Option(3, help="classes listed per input"),
    threshold: float = typer.Option(0.5, help="detection: lowest score of a box to list"),
):
    """Run an exported model on image, audio or text files, or a fused task's on tables of records (one prediction
    per row; an empty or unreadable cell leaves that input absent, with a warning). Exit status 1 if any input (a
    fused task's: any row) could not be read."""
    import json

    from tessera.core.entry.predict import Predictor

    predictor = Predictor(model)
    failed = 0
    err = Console(stderr=True, soft_wrap=True)
    for record in predictor.predict(files, top_k, threshold):
        if "error" in record:
            failed += 1
            err.print(f"[bold red]error:[/] {record['source']}: {record['error']}", highlight=False)
            continue
        for warning in record.get("warnings", []):  # a fused task's cell that could not be read: its input absent
            err.print(f"[bold yellow]warning:[/] {record['source']}: {warning}; predicted without it", highlight=False)
        if json_out:
            print(json.dumps(record), flush=True)
        elif "boxes" in record:
            boxes = "; ".join(f"{b['label']} {b['score']:.2f} at [{', '.join(f'{v:.1f}' for v in b['box'])}]"
                              for b in record["boxes"]) or "no boxes"
            console.print(f"{record['source']}: {boxes}", highlight=False)
        elif "embedding" in record:
            console.print(f"{record['source']}: embedding of {len(record['embedding'])} values", highlight=False)
        else:
            top = ", ".join(f"{t['label']} {t['score']:.3f}" for t in record["top"])
            console.print(f"{record['source']}: [bold]{record['label']}[/] ({top})", highlight=False)
    raise typer.Exit(1 if failed else 0)


@app.command()
def explain(
    model: Path = typer.Argument(..., help="an exported task folder, e.g. models/export/image"),
    files: list[Path] = typer.Argument(..., help="files, or folders to search for files of the model's modality; "
                                       "for a fused task, tables of records (CSV, TSV, JSONL, Parquet)"),
    out: Path = typer.Option(Path("explanations"), "--out", help="where the PNGs go (a fused task's with a .json each)"),
    method: str = typer.Option("grad", help="grad (class-specific, gradient-weighted attention) or rollout"),
):
    """Explain an exported model's predictions: one PNG per input with the map of what it rests on, the
    prediction and its score; a fused task's per row of its tables, each input's map side by side titled with its
    share of the relevance, the shares in a .json beside it. Exit status 1 if any input (a fused task's: any row)
    could not be read."""
    from tessera.core.entry.explain import explain_files
    from tessera.core.tasks.explain import METHODS

    if method not in METHODS:
        raise UserError(f"--method {method}: use one of {', '.join(METHODS)}")
    written, errors, warnings = explain_files(model, files, out, method)
    err = Console(stderr=True, soft_wrap=True)
    for e in errors:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
    for w in warnings:  # a fused task's cell that could not be read: its input absent
        err.print(f"[bold yellow]warning:[/] {w}; explained without it", highlight=False)
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    raise typer.Exit(1 if errors else 0)


@app.command()
def serve(
    folder: Path = typer.Argument(Path("models/export"), help="the exported models (`tessera export`, or a folder "
                                  "`dvc artifacts get` wrote)"),
    host: str = typer.Option(None, help="address to listen on (default serve.host)"),
    port: int = typer.Option(None, help="port (default serve.port)"),
    artifact: str = typer.Option(None, help="download this DVC artifact version into FOLDER first and serve it: "
                                 "NAME@VERSION, e.g. tessera-models@v1.0.0 (NAME alone: its latest version)"),
    repo: str = typer.Option(".", help="the DVC repository (path or git URL) --artifact comes from"),
    params: Path = ParamsOpt,
):
    """Serve every exported task over HTTP: batched predictions, /health, /ready, /info, /metrics and a page at /."""
    from tessera.core.config import ServeConfig
    from tessera.core.serve.app import serve as run

    cfg = load_params(params).serve if params.exists() else ServeConfig()  # a fetched export may come without one
    run(folder, cfg.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None}), artifact, repo)


@app.command("bench-export")
def bench_export(
    folder: Path = typer.Argument(Path("models/export"), help="the exported models"),
    steps: int = typer.Option(20, help="timed calls; the median is reported"),
):
    """ONNX Runtime against eager PyTorch on the CPU, per exported task, at batch 1 and 16."""
    import torch

    from tessera.core.entry.bench import bench_export as run

    rows = run(str(folder), steps=steps)
    table = Table(title=f"exported models on cpu x {torch.get_num_threads()} threads: ms per batch (median of {steps})")
    for col in ("task", "batch", "eager ms", "onnxruntime ms", "speedup"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in rows:
        table.add_row(r["task"], str(r["batch"]), f"{r['eager_ms']:.2f}", f"{r['ort_ms']:.2f}", f"{r['speedup']:.2f}x")
    console.print(table)


@app.command()
def bench(
    size: str = typer.Option("tiny", help="debug | tiny | small | base (timm's vit_<size>_patch16_224 as reference)"),
    batch: int = typer.Option(8, help="images per step"),
    img_size: int = typer.Option(224),
    patch: int = typer.Option(16),
    steps: int = typer.Option(10, help="timed steps; the median is reported"),
    warmup: int = typer.Option(3),
    compile: bool = typer.Option(False, help="torch.compile both models"),
):
    """Our ViT against timm's, side by side on this machine's device: img/s, ratio, MFU, peak memory."""
    from tessera.core.entry.bench import bench as run

    rows = run(size, img_size, patch, batch, steps, warmup, compile)
    table = Table(title=f"{rows[0]['device']}, peak {rows[0]['peak_tflops']:.2f} TFLOP/s (matmul), "
                        f"ViT-{size} {img_size}px batch {batch}")
    for col in ("model", "train img/s", "ratio", "train MFU", "infer img/s", "ratio ", "infer MFU", "peak GiB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        table.add_row(r["model"], f"{r['train_img_s']:.1f}", f"{r['train_ratio']:.3f}", f"{r['train_mfu']:.3f}",
                      f"{r['infer_img_s']:.1f}", f"{r['infer_ratio']:.3f}", f"{r['infer_mfu']:.3f}", mem)
    console.print(table)


def main() -> None:
    try:
        app()
    except UserError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except Stopped as e:
        Console(stderr=True, soft_wrap=True).print(f"stopped by {e.signal.name}", highlight=False)
        sys.exit(e.code)


if __name__ == "__main__":
    main()
