"""Deployments of every flow, scheduled as params.yaml's `orchestrate.schedules` says (the rest run when triggered
from the UI or `prefect deployment run`): `tessera schedule` serves them from its own process (Prefect's runner),
`tessera deploy --pool NAME` registers them on a work pool, whose workers (`prefect worker start --pool NAME`:
a process pool on a machine, or a Kubernetes or Docker pool with flows/cluster/) run them."""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.deployments.runner import EntrypointType

from tessera.core.config import load_params
from tessera.core.errors import UserError
from tessera.core.stagetable import STAGE_NAMES, STAGES
from tessera.flows.stages import flow_of


def deployments(params: str, pool: str | None = None):
    """One per flow of the table of stages; with `pool`, for that work pool, run in this working directory (a
    process pool's workers run them here; a container's image sets its own)."""
    p = load_params(params)
    unknown = [name for name in p.orchestrate.schedules if name not in STAGE_NAMES]
    if unknown:
        raise UserError(f"{params}: orchestrate.schedules.{unknown[0]}: not a flow; schedule one of "
                        f"{', '.join(STAGE_NAMES)}")
    pooled = {"work_pool_name": pool, "job_variables": {"working_dir": str(Path.cwd().resolve())}} if pool else {}
    for stage in STAGES:
        when = p.orchestrate.schedules.get(stage.name)
        timing = {} if when is None else {"cron": when.cron} if when.cron else {"interval": when.interval}
        yield flow_of(stage).to_deployment(
            name=stage.name, parameters={"params": params} if stage.section else {},
            concurrency_limit=1,  # a second run waits for the first: never two on one workspace
            # loaded by module (tessera.flows.stages), not by a file path resolved from the working directory, where a
            # `flows/` of the user's own may stand
            entrypoint_type=EntrypointType.MODULE_PATH, **timing, **pooled)


def schedule(params: str = "params.yaml") -> None:
    serve(*deployments(params))


def deploy(params: str, pool: str) -> list[str]:
    """Registers every deployment on work pool `pool`; returns their names (flow/deployment)."""
    return [f"{d.flow_name}/{d.name}" for d in deployments(params, pool) if d.apply()]
