"""Deployments of every flow, scheduled as params.yaml's `orchestrate.schedules` says (the rest run when triggered
from the UI or `prefect deployment run`): `tessera schedule` serves them from its own process (Prefect's runner),
`tessera deploy --pool NAME` registers them on a work pool, whose workers (`prefect worker start --pool NAME`:
a process pool on a machine, or a Kubernetes or Docker pool with flows/cluster/) run them."""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.deployments.runner import EntrypointType

from tessera.core.config import load_params
from tessera.flows import stages
from tessera.flows.pipeline import pipeline
from tessera.flows.sweep import sweep

FLOWS = {"pipeline": pipeline, "generate": stages.generate, "prepare": stages.prepare, "train": stages.train,
         "evaluate": stages.evaluate, "export": stages.export, "sweep": sweep}


def deployments(params: str, pool: str | None = None):
    """One per flow; with `pool`, for that work pool, run in this working directory (a process pool's workers run
    them here; a container's image sets its own)."""
    p = load_params(params)
    pooled = {"work_pool_name": pool, "job_variables": {"working_dir": str(Path.cwd().resolve())}} if pool else {}
    for name, f in FLOWS.items():
        when = p.orchestrate.schedules.get(name)
        timing = {} if when is None else {"cron": when.cron} if when.cron else {"interval": when.interval}
        yield f.to_deployment(name=name, parameters={} if name == "pipeline" else {"params": params},
                              concurrency_limit=1,  # a second run waits for the first: never two on one workspace
                              # loaded by module (tessera.flows.stages), not by a file path resolved from the working
                              # directory, where a `flows/` of the user's own may stand
                              entrypoint_type=EntrypointType.MODULE_PATH, **timing, **pooled)


def schedule(params: str = "params.yaml") -> None:
    serve(*deployments(params))


def deploy(params: str, pool: str) -> list[str]:
    """Registers every deployment on work pool `pool`; returns their names (flow/deployment)."""
    return [f"{d.flow_name}/{d.name}" for d in deployments(params, pool) if d.apply()]
