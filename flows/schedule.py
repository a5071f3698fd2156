"""`tessera schedule`: serves a deployment of every flow from this process (Prefect's runner), scheduled as
params.yaml's `orchestrate.schedules` says; the rest run when triggered from the UI or `prefect deployment run`."""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import EntrypointType

from tessera.core.config import load_params
from tessera.flows import stages
from tessera.flows.pipeline import pipeline

FLOWS = {"pipeline": pipeline, "generate": stages.generate, "prepare": stages.prepare, "train": stages.train,
         "evaluate": stages.evaluate, "export": stages.export}


def deployments(params: str):
    p = load_params(params)
    for name, f in FLOWS.items():
        when = p.orchestrate.schedules.get(name)
        timing = {} if when is None else {"cron": when.cron} if when.cron else {"interval": when.interval}
        yield f.to_deployment(name=name, parameters={} if name == "pipeline" else {"params": params},
                              concurrency_limit=1,  # a second run waits for the first: never two on one workspace
                              # loaded by module (tessera.flows.stages), not by a file path resolved from the working
                              # directory, where a `flows/` of the user's own may stand
                              entrypoint_type=EntrypointType.MODULE_PATH, **timing)


def schedule(params: str = "params.yaml") -> None:
    serve(*deployments(params))
