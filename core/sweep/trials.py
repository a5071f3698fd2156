"""Running a sweep's trials: each asked trial is `dvc exp run -S <its values> <target>` in a workspace of its own
(core/sweep/workspace.py), with its training pruned through the callback core/sweep/pruning.py installs; the
experiment's ref is then pushed to the repository, where `dvc exp show` lists it and `dvc exp apply` brings it back.
`resume` readies a study that an earlier run left: interrupted trials queued again, the baseline queued first.

Files: sweeps/<name>/logs/<trial>.log (each trial's output), sweeps/<name>/work/<trial>/ (its workspace while it
runs)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState
from rich.console import Console

from tessera.core.errors import UserError
from tessera.core.sweep.plan import Plan, flat_metrics
from tessera.core.sweep.pruning import trial_env
from tessera.core.sweep.study import grid, intermediate, journal_path, live_trial, study_folder, suggest
from tessera.core.sweep.workspace import TrialProcesses, git, workspace


def dvc_value(value) -> str:
    """A value as `dvc exp run -S` parses it (Hydra's override grammar)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):  # quoted, so that "cls" stays a string and "1e-3" is not read as a number
        # Hydra unescapes only backslashes before a quote: escape the quotes, and double the backslashes that
        # precede a quote or the closing one
        text = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)
        text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
        return f'"{text}"'
    return repr(value)


def overrides(values: dict) -> list[str]:
    """`-S` arguments; `++` sets a key whether params.yaml has it or not (train.weights.image in `weights: {}`)."""
    return [f"++{k}={dvc_value(v)}" for k, v in values.items()]


def logged_curve(dvclive: Path) -> dict[int, dict]:
    """{step: {metric: value}} of the validations DVCLive logged under `dvclive` (plots/metrics/val/*.tsv): the
    curve of a run that DVC reused instead of training again (a baseline trial)."""
    curve: dict[int, dict] = {}
    for tsv in sorted((dvclive / "plots/metrics/val").rglob("*.tsv")):
        name = str(tsv.relative_to(dvclive / "plots/metrics/val").with_suffix(""))
        with open(tsv, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                curve.setdefault(int(row["step"]), {})[name] = float(row[name.rsplit("/", 1)[-1]])
    return curve


def run_trial(plan: Plan, repo: Path, study: optuna.Study, trial: optuna.Trial, processes: TrialProcesses,
              console: Console) -> dict:
    """Runs one asked trial to its end and returns what to tell Optuna: {"value"} or {"state": "pruned"|"failed"}
    with the trial's user attributes set (experiment, seconds, objective, metrics, error); {"state":
    "interrupted"} when the sweep is stopping (tell nothing: the trial stays running, and a rerun runs it again)."""
    cfg = plan.cfg
    values = suggest(trial, cfg.space)
    name = f"{cfg.name}-{trial.number}"
    trial.set_user_attr("experiment", name)
    folder = study_folder(repo, cfg)
    log = folder / "logs" / f"{trial.number}.log"
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    console.print(f"trial {trial.number} ({name}) started: {shown or 'params.yaml as it is'}")
    start = time.time()
    threads = max(1, (os.cpu_count() or 1) // cfg.parallel)  # trials at once share the cores
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           **trial_env(journal_path(repo, cfg), cfg, trial.number)}
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--name", name,
           *[a for o in overrides(values) for a in ("-S", o)], plan.target]
    with workspace(repo, folder / "work" / str(trial.number)) as ws:
        code = processes.run(cmd, ws, env, log)
        seconds = round(time.time() - start, 1)
        trial.set_user_attr("seconds", seconds)
        if processes.stopping.is_set():
            return {"state": "interrupted"}
        if code != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            trial.set_user_attr("error", "\n".join(tail))
            console.print(f"trial {trial.number} failed (`dvc exp run` exited with {code}); its log: {log}\n  "
                          + "\n  ".join(tail[-5:]))
            return {"state": "failed"}
        metrics = flat_metrics(json.loads((ws / plan.metrics).read_text()), plan.target)
        value = float(metrics[cfg.objective])
        trial.set_user_attr("objective", value)
        trial.set_user_attr("metrics", metrics)
        ref = next(r for r in git(ws, "for-each-ref", "--format=%(refname)", "refs/exps").split() if r.endswith("/" + name))
        git(ws, "push", "-q", "--force", str(repo), f"{ref}:{ref}")  # `dvc exp show` in the repository lists it
        # training (another process) wrote to the journal: read the trial afresh, not the asked object's copy
        told = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        if not told.intermediate_values:  # DVC reused an earlier run (the baseline): its logged curve, for the pruner
            for step, val in sorted(logged_curve(ws / plan.params.train.out / "dvclive").items()):
                if "headline" in val:
                    trial.report(intermediate(study, cfg, val), step)
    pruned = told.user_attrs.get("pruned_at")
    note = f", pruned at step {pruned}" if pruned is not None else ""
    console.print(f"trial {trial.number} ({name}) done in {seconds:.0f} s: {cfg.objective} = {value:.4f}{note}")
    return {"state": "pruned"} if pruned is not None else {"value": value}


def tell(study: optuna.Study, trial: optuna.Trial, outcome: dict) -> None:
    state = {"pruned": TrialState.PRUNED, "failed": TrialState.FAIL}.get(outcome.get("state"))
    study.tell(trial, outcome.get("value"), state=state)


def baseline_values(plan: Plan) -> dict:
    """Today's params.yaml value of each searched key it sets (and, for choices, one of them: else Optuna cannot
    record it, and the key is left out)."""
    today = {}
    for key, dim in plan.cfg.space.items():
        node = plan.raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and (dim.choices is None or node in dim.choices):
            today[key] = node
    return today


def requeue_interrupted(study: optuna.Study, storage: BaseStorage, console: Console) -> None:
    """Trials an interrupted run left running: marked failed ("interrupted") and queued again with their values."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        live_trial(storage, study, t.number).set_user_attr("interrupted", True)
        study.tell(t.number, state=TrialState.FAIL)
        fixed = t.user_attrs.get("fixed", list(t.params))
        study.enqueue_trial(t.params, user_attrs={"fixed": fixed, "rerun_of": t.number,
                                                  **({"baseline": True} if t.user_attrs.get("baseline") else {})})
        console.print(f"trial {t.number} was interrupted: queued again")


def resume(study: optuna.Study, storage: BaseStorage, plan: Plan, repo: Path, console: Console) -> int:
    """Readies the study for this run and returns how many trials to run now. Trials an interrupted run left
    running are queued again; the baseline (today's params.yaml) is queued as trial 0 of a new study. Finished
    trials are never run again. A study started with another objective or space is refused."""
    cfg = plan.cfg
    settings = {"objective": cfg.objective, "direction": cfg.direction,
                "space": {k: d.model_dump(exclude_defaults=True) for k, d in cfg.space.items()}}
    new = not study.get_trials(deepcopy=False)
    if not new and study.user_attrs.get("settings", settings) != settings:
        raise UserError(f"params.yaml: sweep {cfg.name} was started with {study.user_attrs['settings']}, and the sweep "
                        f"section now says {settings}: give sweep.name a new name to start another study (the journal "
                        f"{journal_path(Path('.'), cfg)} keeps this one), or put the section back")
    study.set_user_attr("settings", settings)
    shutil.rmtree(study_folder(repo, cfg) / "work", ignore_errors=True)  # an earlier run's, if it was killed
    if new and cfg.baseline:
        today = baseline_values(plan)
        study.enqueue_trial(today, user_attrs={"baseline": True, "fixed": list(today)})
    requeue_interrupted(study, storage, console)
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))]
    todo = max(0, cfg.trials - len(done))
    if cfg.sampler == "grid":
        points = math.prod(len(values) for values in grid(cfg.space).values())
        todo = min(todo, max(0, points + int(cfg.baseline) - len(done)))
    console.print(f"sweep {cfg.name}: {len(done)} of {cfg.trials} trials done, {todo} to run, {cfg.parallel} at once")
    return todo
