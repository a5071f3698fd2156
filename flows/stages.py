"""One Prefect flow per pipeline stage. Each calls the stage's plain function in core/stages/; the flow adds logs in
the Prefect UI, artifacts, and for training the launcher (core/runtime/launch.py) with its retries.

`tessera <stage>` and therefore every `dvc repro` stage command run these flows (`run_stage`). With PREFECT_API_URL
set, each is a tracked flow run on that server. With none set, the same flow function runs untracked: Prefect's
alternative, a temporary server per process, costs about 8 s per stage (docs/orchestration.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from tessera.core.config import load_params
from tessera.core.data.digits import generate_default_data
from tessera.core.runtime.launch import launch_training, torchrun_command
from tessera.core.stages.evaluate import evaluate_model
from tessera.core.stages.export import export_models
from tessera.core.stages.prepare import prepare_data
from tessera.core.stages.train import check_data, user_error_file
from tessera.flows.artifacts import (publish_evaluation, publish_export, publish_metrics, publish_quarantine, run_console,
                                     tracked, update_progress)


def run_stage(stage_flow, **kwargs):
    """Runs a stage flow: tracked on the configured Prefect server, else the same function untracked."""
    return stage_flow(**kwargs) if tracked() else stage_flow.fn(**kwargs)


@flow(name="generate")
def generate(params: str = "params.yaml") -> dict:
    counts = generate_default_data(load_params(params))
    run_console().print(", ".join(f"{m} {c['train']}+{c['test']}" for m, c in counts.items()) if counts else
                        "prepare.root holds other data: the default dataset is not in use, not generated")
    return counts


@flow(name="prepare")
def prepare(params: str = "params.yaml") -> dict:
    metas = prepare_data(load_params(params), run_console())
    counts = {m: meta["counts"] for m, meta in metas.items()}
    publish_metrics("prepare", {f"{m}.{s}.{k}": v for m, splits in counts.items() for s, c in splits.items()
                                for k, v in c.items()}, "samples in, prepared and quarantined per modality and split")
    publish_quarantine([q for meta in metas.values() for q in meta["quarantine"]])
    return counts


@flow(name="train")
def train(params: str = "params.yaml", nproc_per_node: int | None = None, nnodes: int = 1, node_rank: int = 0,
          rdzv_endpoint: str = "") -> dict:
    """torchrun in its own process group; a crash is retried `orchestrate.train_retries` times, each retry
    resuming from the last good checkpoint (core/stages/train.py does that by itself). params.yaml and the prepared
    data are checked here, before any launch; a user's mistake found inside training is reported once, never retried."""
    p = load_params(params)
    check_data(p)
    cmd = torchrun_command(params, nproc_per_node or p.orchestrate.nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    launch_training(cmd, p.orchestrate.train_retries, user_error_file(p), run_console(),
                    poll=lambda: update_progress(Path(p.train.out) / "progress.json"))
    if node_rank != 0:  # rank 0, on the first node, writes the model and the metrics
        return {}
    summary = json.loads(Path(p.train.metrics).read_text())
    publish_metrics("train", summary["test"], f"test metrics after {summary['steps']} steps, {summary['seconds']} s")
    return summary


@flow(name="evaluate")
def evaluate(params: str = "params.yaml") -> dict:
    p = load_params(params)
    metrics = evaluate_model(p, run_console())
    publish_metrics("evaluate", metrics, f"every task on the {p.evaluate.split} split")
    publish_evaluation(Path(p.evaluate.out) / "eval.md")
    return metrics


@flow(name="export")
def export(params: str = "params.yaml") -> dict:
    p = load_params(params)
    metrics = export_models(p, run_console())
    publish_metrics("export", metrics, "parity of every exported artifact with the eager model")
    publish_export(Path(p.export.out))
    return metrics
