"""The `pipeline` flow: every stage DVC finds stale, in dvc.yaml's order, each through `dvc repro --single-item`
(so DVC records what ran and caches its outputs, and the stage's own flow runs as its command). With nothing
stale it does no work and says "up to date"."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from prefect import flow, task

from tessera.core.config import load_params
from tessera.flows.artifacts import in_run, publish_metrics, run_console


def stale(stage: str, repo: str) -> bool:
    """DVC's view: a changed dependency, parameter, command or output of `stage` (its upstream not included)."""
    from dvc.repo import Repo

    with Repo(repo) as r:
        return bool(r.status(targets=[stage]))


@task(name="dvc-repro")
def repro(stage: str, repo: str) -> None:
    console = run_console()
    proc = subprocess.Popen(["dvc", "repro", "--single-item", stage], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        console.print(line.rstrip(), highlight=False, markup=False)
    if proc.wait():
        raise RuntimeError(f"`dvc repro --single-item {stage}` exited with status {proc.returncode}; see the log above")


@flow(name="pipeline")
def pipeline(repo: str = ".") -> list[str]:
    """Returns the stages that ran, [] when everything was up to date."""
    stages = list(yaml.safe_load((Path(repo) / "dvc.yaml").read_text())["stages"])
    ran = []
    for stage in stages:  # dvc.yaml lists them upstream first; a rerun makes its downstream stale for the next check
        if stale(stage, repo):
            repro(stage, repo)
            ran.append(stage)
    summary = f"ran {', '.join(ran)}" if ran else "up to date: no stage has changed since its last run"
    run_console().print(summary)
    if in_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(f"# Pipeline\n\n{summary}.\n", key="pipeline-summary")
        metrics = Path(repo) / load_params(Path(repo) / "params.yaml").evaluate.metrics
        if metrics.is_file():
            publish_metrics("pipeline", json.loads(metrics.read_text()), "held-out metrics of the current model")
    return ran
