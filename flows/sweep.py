"""The `sweep` flow: params.yaml's `sweep` section as Optuna trials, each a Prefect task that runs the pipeline as
a DVC experiment (core/sweep/). A Prefect global concurrency limit, `tessera-sweep-<name>-<repository>`
with `sweep.parallel` slots, bounds the trials running at once (the UI shows its slots); a trial asks Optuna for its
values only once it holds a slot, so that each proposal knows every result told before it. One sweep process runs
a study at a time (a lock file).

Stopping the flow (SIGTERM, Ctrl-C, a cancelled run) stops the running trials' processes and tells Optuna nothing
of them: they stay "running" in the journal, and the next run queues them again."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from tessera.core.sweep.plan import Plan, plan_sweep
from tessera.core.sweep.report import REPORT, write_results
from tessera.core.sweep.study import journal_path, load_study, open_journal
from tessera.core.sweep.trials import resume, run_trial, tell
from tessera.core.sweep.workspace import TrialProcesses, check_repository, exclusive, promote as promote_best
from tessera.flows.artifacts import in_run, inline_images, report_progress, run_console


def limit_name(plan: Plan, repo: Path) -> str:
    """Per study and repository: the server may serve several clones, each with a study of the same name."""
    return f"tessera-sweep-{plan.cfg.name}-{hashlib.sha256(str(repo).encode()).hexdigest()[:8]}"


def set_limit(name: str, slots: int) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, slots)


# NO_CACHE: every trial task has the same arguments, and Prefect would otherwise hand the second the first's result
@task(name="trial", cache_policy=NO_CACHE)
def trial(repo: str, plan: Plan, study, processes: TrialProcesses) -> dict:
    console = run_console()
    # strict: the limit must exist (set_limit made it); a lease that fails to renew must not cancel a finished trial
    with concurrency(limit_name(plan, Path(repo)), occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        asked = study.ask()
        try:
            outcome = run_trial(plan, Path(repo), study, asked, processes, console)
        except Exception as e:  # noqa: BLE001  (a broken trial is recorded and the sweep goes on)
            asked.set_user_attr("error", f"{type(e).__name__}: {e}")
            console.print(f"trial {asked.number} failed: {type(e).__name__}: {e}")
            outcome = {"state": "failed"}
        if outcome.get("state") != "interrupted":
            tell(study, asked, outcome)
        return {"trial": asked.number, **outcome}


@flow(name="sweep")
def sweep(params: str = "params.yaml", promote: bool = False, repo: str = ".") -> dict:
    """Runs the trials the study still lacks, writes the results (reports/sweep/, metrics/sweep.json) and, with
    `promote` or sweep.promote, applies the best trial to the workspace. Returns metrics/sweep.json's content."""
    console = run_console()
    root = Path(repo).resolve()
    plan = plan_sweep(root / params)
    check_repository(root)
    with exclusive(root, plan.cfg):
        storage = open_journal(journal_path(root, plan.cfg))
        study = load_study(storage, plan.cfg)
        todo = resume(study, storage, plan, root, console)
        set_limit(limit_name(plan, root), plan.cfg.parallel)
        processes = TrialProcesses()
        # as many threads as slots: a trial waits for a thread here rather than polling the server for a slot
        with ThreadPoolTaskRunner(max_workers=plan.cfg.parallel) as runner:
            futures = [runner.submit(trial, {"repo": str(root), "plan": plan, "study": study, "processes": processes})
                       for _ in range(todo)]
            try:
                for done, _ in enumerate(as_completed(futures), 1):
                    console.print(f"sweep {plan.cfg.name}: {done} of the {todo} trials of this run done")
                    report_progress("sweep-progress", 100.0 * done / todo, "trials of this run done")
            except BaseException:  # Prefect's TerminationSignal (SIGTERM), KeyboardInterrupt, a cancellation
                processes.stop()
                raise
    results = write_results(study, plan.cfg, root)
    summary = results["summary"]
    best = summary["best"]
    console.print(f"sweep {plan.cfg.name}: " + ", ".join(f"{n} {s}" for s, n in summary["trials"].items() if n) +
                  (f"; best trial {best['trial']} ({best['experiment']}): {plan.cfg.objective} = {best['value']:.4f}"
                   if best else "; no trial completed"))
    if in_run():
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_table_artifact(results["rows"], key="sweep-trials", description=f"every trial of sweep {plan.cfg.name}")
        report = root / REPORT / "sweep.md"
        create_markdown_artifact(inline_images(report.read_text(), report.parent), key="sweep-report",
                                 description="the objective over trials and each parameter's importance")
    if (promote or plan.cfg.promote) and best:
        promote_best(root, best["experiment"], console)
    return summary
