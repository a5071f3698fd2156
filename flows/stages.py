"""One Prefect flow per pipeline stage, made from the table of stages (core/stagetable.py): each loads params.yaml,
calls the stage's plain function and publishes what it made (below). Training has a flow of its own: the launcher
(core/runtime/launch.py) with its retries, under torchrun.

`tessera <stage>` and therefore every `dvc repro` stage command run these flows (`run_stage`). With PREFECT_API_URL
set, each is a tracked flow run on that server, each unit of work of its stage a task (`as_task`); started by the
pipeline (flows/pipeline.py), whose stage task names itself in PARENT_TASK_RUN, the run is that task's child, and the
UI draws it inside the pipeline's run. With no server set, the same flow function runs untracked: Prefect's
alternative, a temporary server per process, costs about 8 s per stage (docs/orchestration.md).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from pkgutil import resolve_name
from uuid import UUID

from prefect import Flow, flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow

from tessera.core.config import Params, load_params
from tessera.core.errors import UserError
from tessera.core.runtime.launch import launch_training, torchrun_command
from tessera.core.stages.train import check_data, user_error_file
from tessera.core.stagetable import STAGES, Stage
from tessera.flows.artifacts import (in_run, publish_evaluation, publish_export, publish_metrics, publish_quarantine,
                                     run_console, tracked, update_progress)


PARENT_TASK_RUN = "TESSERA_PARENT_TASK_RUN"
"""The environment variable naming the task run (the pipeline's, for this stage) whose child a stage's flow run is"""


class UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs the exception of a failed task or flow run with its traceback, in the terminal and the UI; a
    user's mistake (core/errors.py) is its message alone there too, as in the line `tessera` ends with."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = record.exc_text = None
        return True


WITHOUT_TRACEBACK = UserErrorsWithoutTraceback()


def run_stage(stage_flow: Flow, **kwargs):
    """Runs a stage flow: tracked on the configured Prefect server (the child of the task run PARENT_TASK_RUN
    names, if any), else the same function untracked."""
    if not tracked():
        return stage_flow.fn(**kwargs)
    for logger in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(logger).addFilter(WITHOUT_TRACEBACK)  # the same filter once, however often it runs
    parent = os.environ.get(PARENT_TASK_RUN)
    if not parent:
        return stage_flow(**kwargs)
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(stage_flow, parameters=stage_flow.serialize_parameters(kwargs),
                                          parent_task_run_id=UUID(parent))
    return run_flow(stage_flow, flow_run=flow_run, parameters=kwargs)


def as_task(name: str, fn, *args):
    """A stage's unit of work (core/units.py) as a Prefect task named `name`: its run shows in the stage's flow run,
    red with the exception's message where it failed. The arguments stay in the closure: Prefect neither hashes
    nor walks them (a model, a dataset), and nothing is cached. Outside a flow run (untracked), a plain call."""
    if not in_run():
        return fn(*args)

    def unit():
        return fn(*args)
    return task(unit, name=name, task_run_name=name, cache_policy=NO_CACHE)()


def flow_of(stage: Stage) -> Flow:
    """The stage's flow: its own (`stage.flow`), else the one made here from its function, both found by name."""
    return resolve_name(stage.flow or f"{__name__}:{stage.name}")


def stage_flow(stage: Stage) -> Flow:
    """The flow of a stage declared by its plain function: params.yaml in, the function's dict out, published. The
    function is imported when the flow runs, not when it is made: every `tessera <stage>` imports this module, and
    the stages' own imports (generate's scikit-learn, evaluate's drawings) cost the others ~1.5 s of CPU."""
    def run_and_publish(params: str = "params.yaml") -> dict:
        p = load_params(params)
        result = resolve_name(stage.run)(p, run_console(), as_task)
        if stage.publish:
            resolve_name(stage.publish)(p, result)
        return result

    # a deployment loads its flow by module path, `tessera.flows.stages.<name>`: the function takes the stage's name
    run_and_publish.__name__ = run_and_publish.__qualname__ = stage.name
    return flow(run_and_publish, name=stage.name, description=stage.help)


def publish_prepared(p: Params, metas: dict) -> None:
    counts = {m: meta["counts"] for m, meta in metas.items()}
    publish_metrics("prepare", {f"{m}.{s}.{k}": v for m, splits in counts.items() for s, c in splits.items()
                                for k, v in c.items()}, "samples in, prepared and quarantined per modality and split")
    publish_quarantine([q for meta in metas.values() for q in meta["quarantine"]])


def publish_pretrained(p: Params, summary: dict) -> None:
    if summary["enabled"]:
        publish_metrics("pretrain", {**{k: summary[k] for k in ("steps", "seconds", "loss_first", "loss_last")},
                                     **{f"{t}.unlabelled": n for t, n in summary["unlabelled"].items()}},
                        "masked-prediction loss over the first and the last 20 steps; unlabelled samples per task")


def publish_evaluated(p: Params, metrics: dict) -> None:
    publish_metrics("evaluate", metrics, f"every task on the {p.evaluate.split} split")
    publish_evaluation(Path(p.evaluate.out) / "eval.md")


def publish_exported(p: Params, metrics: dict) -> None:
    publish_metrics("export", metrics, "parity of every exported artifact with the eager model")
    publish_export(Path(p.export.out))


@flow(name="train")
def train(params: str = "params.yaml", nproc_per_node: int | None = None, nnodes: int = 1, node_rank: int = 0,
          rdzv_endpoint: str = "") -> dict:
    """torchrun in its own process group; a crash is retried `orchestrate.train_retries` times, each retry
    resuming from the last good checkpoint (core/stages/train.py does that by itself). params.yaml and the prepared
    data are checked here, before any launch; a user's mistake found inside training is reported once, never retried."""
    p = load_params(params)
    check_data(p)
    cmd = torchrun_command(params, nproc_per_node or p.orchestrate.nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    as_task("torchrun", lambda: launch_training(cmd, p.orchestrate.train_retries, user_error_file(p), run_console(),
                                                poll=lambda: update_progress(Path(p.train.out))))
    if node_rank != 0:  # rank 0, on the first node, writes the model and the metrics
        return {}
    summary = json.loads(Path(p.train.metrics).read_text())
    publish_metrics("train", summary["test"], f"test metrics after {summary['steps']} steps, {summary['seconds']} s")
    return summary


# after the publishers above, which the stages name; each flow becomes this module's attribute of its stage's name
globals().update({s.name: stage_flow(s) for s in STAGES if s.run})
