"""The `pipeline` flow: a task per stage, in dvc.yaml's order, each waiting for the one before. A stage DVC finds
stale runs through `dvc repro --single-item` (so DVC records what ran and caches its outputs), whose command runs the
stage's own flow as the child of the stage's task (PARENT_TASK_RUN, flows/stages.py): the UI draws each stage's flow
run, with its tasks, inside the pipeline's run. A stage DVC finds up to date is a task in the state "Skipped" (a kind
of Completed). With nothing stale it does no work and says "up to date"."""

from __future__ import annotations

import json
import os
import subprocess
from collections import deque
from pathlib import Path

import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.states import Completed

from tessera.core.config import load_params
from tessera.flows.artifacts import in_run, publish_metrics, run_console
from tessera.flows.stages import PARENT_TASK_RUN

SKIPPED = "Skipped"


def stale(stage: str, repo: str) -> bool:
    """DVC's view: a changed dependency, parameter, command or output of `stage` (its upstream not included)."""
    from dvc.repo import Repo

    with Repo(repo) as r:
        return bool(r.status(targets=[stage]))


def repro(stage: str, repo: str):
    """`dvc repro --single-item <stage>` if DVC finds it stale, its output in the run's log; else the Skipped state.
    Inside a task run, the stage's flow run becomes that task run's child."""
    if not stale(stage, repo):
        return Completed(name=SKIPPED, message=f"skipped: {stage} is up to date")
    console = run_console()
    env = dict(os.environ)
    if (context := TaskRunContext.get()) is not None:
        env[PARENT_TASK_RUN] = str(context.task_run.id)
    proc = subprocess.Popen(["dvc", "repro", "--single-item", stage], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    tail = deque(maxlen=3)  # what the stage said last: the failure's message, then DVC's
    for line in proc.stdout:
        console.print(line.rstrip(), highlight=False, markup=False)
        if line.strip():
            tail.append(line.strip())
    if proc.wait():
        raise RuntimeError(f"`dvc repro --single-item {stage}` exited with status {proc.returncode}: "
                           + " / ".join(tail))
    return Completed(message=f"{stage} ran")


@flow(name="pipeline")
def pipeline(repo: str = ".") -> list[str]:
    """Returns the stages that ran, [] when everything was up to date."""
    stages = list(yaml.safe_load((Path(repo) / "dvc.yaml").read_text())["stages"])
    stage_task = task(repro, name="stage", task_run_name="{stage}", cache_policy=NO_CACHE)
    ran, before = [], None
    for stage in stages:  # dvc.yaml lists them upstream first; a rerun makes its downstream stale for the next check
        state = stage_task(stage, repo, wait_for=[before] if before else None, return_state=True) if in_run() \
            else repro(stage, repo)  # untracked: a task would start a temporary server
        if state.is_failed():
            state.result()  # raises the stage's failure: the pipeline stops there, failed
        if state.name != SKIPPED:
            ran.append(stage)
        before = state
    summary = f"ran {', '.join(ran)}" if ran else "up to date: no stage has changed since its last run"
    run_console().print(summary)
    if in_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(f"# Pipeline\n\n{summary}.\n", key="pipeline-summary")
        metrics = Path(repo) / load_params(Path(repo) / "params.yaml").evaluate.metrics
        if metrics.is_file():
            publish_metrics("pipeline", json.loads(metrics.read_text()), "held-out metrics of the current model")
    return ran
