"""`tessera sweep`: hyperparameter search over params.yaml, every trial a DVC experiment. The Prefect flow
(flows/sweep.py) asks Optuna for trials and runs them; this module holds the plain steps:

    plan_sweep      params.yaml's `sweep` section checked whole before any trial: every searched key is a key of
                    params.yaml and each bound is valid there, the objective is a metric some stage writes
    run_trial       one trial in a workspace of its own (a `git clone --shared` of the repository at HEAD, with the
                    workspace's uncommitted changes, sharing its DVC cache): `dvc exp run -S ...` up to the stage
                    that writes the objective, then the experiment's ref pushed to the repository, where
                    `dvc exp show` lists it and `dvc exp apply` brings it back. Workspaces of their own, not
                    `dvc exp run -j` or `--temp` in one repository: parallel runs there race on its lock and index
    write_results   the trials table, the objective over trials and each parameter's importance as DVC plots and a
                    picture (reports/sweep/), and the best trial in metrics/sweep.json
    promote         `dvc exp apply` of the best trial, then `dvc repro` of what is stale

Files: sweeps/<name>/journal.log (the Optuna study: a rerun resumes it), sweeps/<name>/logs/<trial>.log (each
trial's output), sweeps/<name>/work/<trial>/ (a trial's workspace while it runs).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState
from rich.console import Console

from tessera.core.config import Params, SweepConfig, load_params, parse_params
from tessera.core.data.files import atomic_write_text
from tessera.core.errors import UserError
from tessera.core.runtime.launch import die_with_parent, run_group, stop_group
from tessera.core.runtime.sweep import ENV, grid, intermediate, journal_path, logged_curve, study_folder, suggest
from tessera.core.stages.report import save_figure
from tessera.core.tasks.metrics import reported_metrics

import matplotlib.pyplot as plt  # noqa: E402  (after report, which picks the Agg backend)

REPORT = Path("reports/sweep")
METRICS = Path("metrics/sweep.json")


@dataclass
class Plan:
    """What a trial runs and reads: `dvc exp run <target>`, then the JSON at `metrics` in the trial's workspace,
    flattened (`flat_metrics`), where the objective is a key."""

    params: Params
    raw: dict
    target: str
    metrics: Path

    @property
    def cfg(self) -> SweepConfig:
        return self.params.sweep


def with_value(raw: dict, key: str, value) -> dict:
    """A copy of the raw params with `key` (dotted) set to `value`; a missing section or entry is created."""
    out = json.loads(json.dumps(raw or {}))
    node, parts = out, key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"params.yaml: sweep.space.{key}: {'.'.join(parts[:i + 1])} holds a value, not a section "
                            "of keys; name a key of params.yaml (`tessera params` lists them)")
    node[parts[-1]] = value
    return out


def plan_sweep(path: Path) -> Plan:
    """The sweep section of params.yaml at `path`, checked before any trial runs (a UserError names the key)."""
    params = load_params(path)
    raw = yaml.safe_load(path.read_text()) or {}
    cfg = params.sweep
    if not cfg.space:
        raise UserError(f"{path}: sweep.space is empty: name the params.yaml keys to search and their ranges, e.g.\n"
                        "  sweep:\n    space:\n      train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}")
    for key, dim in cfg.space.items():
        if key.split(".")[0] == "sweep":
            raise UserError(f"{path}: sweep.space.{key}: a sweep cannot search its own settings")
        probes = dim.choices if dim.choices is not None else [dim.low, dim.high]
        if dim.choices is None and not dim.is_int:  # a point between: a fraction where the key takes integers
            probes = [*probes, dim.low + (dim.high - dim.low) * 0.37]
        for value in probes:
            try:
                parse_params(with_value(raw, key, value), f"{path} with {key}={value!r}")
            except UserError as e:
                raise UserError(f"{path}: sweep.space.{key} cannot be applied:\n{e}") from None
    tasks, align = list(params.train.tasks), tuple(params.train.align) or None
    if cfg.objective.startswith("val."):
        target, metrics, key = "train", Path(params.train.metrics), cfg.objective.removeprefix("val.")
        known = reported_metrics(tasks, align, held_out=False) | {"headline"}
    else:
        target, metrics, key = "evaluate", Path(params.evaluate.metrics), cfg.objective
        known = reported_metrics(tasks, align, held_out=True)
    if key not in known:
        where = "training's validation (val.<key>)" if target == "train" else "metrics/eval.json"
        names = sorted(("val." if target == "train" else "") + k for k in known)
        raise UserError(f"{path}: sweep.objective: {cfg.objective!r} is not a metric that {where} holds for "
                        f"train.tasks {tasks} and train.align {list(align or [])}; choose one of: {', '.join(names)}")
    return Plan(params, raw, target, metrics)


def flat_metrics(data: dict, target: str) -> dict:
    """A stage's metrics JSON as {key: number}: metrics/eval.json as it is; training's as val.<key> and test.<key>
    (the best checkpoint on the validation and the held-out split)."""
    if target == "train":
        data = {f"{split}.{k}": v for split in ("val", "test") for k, v in data.get(split, {}).items()}
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"`git {' '.join(args)}` in {cwd} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout.strip()


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f"`dvc {' '.join(args)}` in {cwd} failed: {(result.stdout + result.stderr)[-2000:]}")
    return result


def check_repository(repo: Path) -> None:
    """What every trial needs of the repository: a commit to branch experiments from, and DVC."""
    if subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=repo, capture_output=True).returncode:
        raise UserError(f"{repo}: tessera sweep needs a git repository with a commit (each trial is a DVC experiment "
                        "of HEAD): `git init`, then commit the project")
    if not (repo / ".dvc").is_dir():
        raise UserError(f"{repo}: tessera sweep needs DVC here (each trial is a DVC experiment): `dvc init`, commit")


@contextlib.contextmanager
def exclusive(repo: Path, cfg: SweepConfig):
    """One sweep process per study at a time: a second would take the first one's running trials for
    interrupted ones."""
    folder = study_folder(repo, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"sweep {cfg.name} is already running in {repo} (its lock: {folder / 'lock'}); wait for "
                            "it, stop it, or give sweep.name another name") from None
        yield


@functools.cache
def cache_dir(repo: Path) -> str:
    """The repository's DVC cache, which every trial's workspace shares (asked once per run: a DVC process)."""
    return dvc(repo, "cache", "dir").stdout.strip()


@contextlib.contextmanager
def workspace(repo: Path, ws: Path):
    """A workspace for one trial, removed however the trial ends (its experiment is then in the repository, its
    output in the log): the repository at HEAD plus its uncommitted changes (what `dvc exp run` in the
    repository would run), its DVC cache shared, and the data checked out by links (a trial reads it, never writes
    it). A trial with today's params (the baseline) is then up to date: DVC records the workspace's own run as its
    result, as `dvc repro` would, and trains nothing."""
    try:
        ws.parent.mkdir(parents=True, exist_ok=True)
        git(repo, "clone", "-q", "--shared", "--no-checkout", str(repo), str(ws))
        git(ws, "checkout", "-q", "--detach", git(repo, "rev-parse", "HEAD"))
        changed = git(repo, "diff", "--name-only", "--no-renames", "HEAD").splitlines()
        untracked = git(repo, "ls-files", "--others", "--exclude-standard").splitlines()
        for name in changed + untracked:
            if name == str(METRICS):  # an earlier sweep's result is no input of a trial
                continue
            source, dest = repo / name, ws / name
            if source.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest)
            elif not source.exists():
                dest.unlink(missing_ok=True)
        dvc(ws, "cache", "dir", "--local", cache_dir(repo))
        dvc(ws, "config", "--local", "cache.type", "hardlink,symlink,copy")
        dvc(ws, "checkout", "--quiet", check=False)  # what the cache lacks, the trial's stages make
        yield ws
    finally:
        shutil.rmtree(ws, ignore_errors=True)


class Trials:
    """One sweep run's `dvc exp run` processes, each in a process group of its own: a stopped sweep (SIGTERM,
    Ctrl-C, a cancelled flow run) stops every group and tells Optuna nothing, so that a rerun runs them again.
    A sweep killed outright (SIGKILL) sends each `dvc exp run` SIGTERM (the parent-death signal), but the
    training DVC had started may run on to its end."""

    def __init__(self):
        self.running: set[subprocess.Popen] = set()
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def run(self, cmd: list[str], cwd: Path, env: dict, log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out, self.lock:
            if self.stopping.is_set():
                return -1
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent if sys.platform == "linux" else None)
            self.running.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.running.discard(proc)

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            procs = list(self.running)
        for proc in procs:
            stop_group(proc)


def run_trial(plan: Plan, repo: Path, study, trial, trials: Trials, console: Console) -> dict:
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
           ENV: json.dumps({"journal": str(journal_path(repo, cfg).resolve()), "trial_id": trial._trial_id,
                            "sweep": cfg.model_dump()})}
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--name", name,
           *[a for o in overrides(values) for a in ("-S", o)], plan.target]
    with workspace(repo, folder / "work" / str(trial.number)) as ws:
        code = trials.run(cmd, ws, env, log)
        seconds = round(time.time() - start, 1)
        trial.set_user_attr("seconds", seconds)
        if trials.stopping.is_set():
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


def tell(study, trial, outcome: dict) -> None:
    state = {"pruned": TrialState.PRUNED, "failed": TrialState.FAIL}.get(outcome.get("state"))
    study.tell(trial, outcome.get("value"), state=state)


def resume(study, plan: Plan, repo: Path, console: Console) -> int:
    """Readies the study for this run and returns how many trials to run now. Trials an interrupted run left
    running are marked failed ("interrupted") and queued again with their values; the baseline (today's
    params.yaml) is queued as trial 0 of a new study. Finished trials are never run again."""
    cfg = plan.cfg
    trials = study.get_trials(deepcopy=False)
    settings = {"objective": cfg.objective, "direction": cfg.direction,
                "space": {k: d.model_dump(exclude_defaults=True) for k, d in cfg.space.items()}}
    if trials and study.user_attrs.get("settings", settings) != settings:
        raise UserError(f"params.yaml: sweep {cfg.name} was started with {study.user_attrs['settings']}, and the sweep "
                        f"section now says {settings}: give sweep.name a new name to start another study (the journal "
                        f"{journal_path(Path('.'), cfg)} keeps this one), or put the section back")
    study.set_user_attr("settings", settings)
    shutil.rmtree(study_folder(repo, cfg) / "work", ignore_errors=True)  # an earlier run's, if it was killed
    if not trials and cfg.baseline:
        today = {}
        for key in cfg.space:
            node = plan.raw
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            choices = cfg.space[key].choices
            if node is not None and (choices is None or node in choices):  # else Optuna cannot record it: left out
                today[key] = node
        study.enqueue_trial(today, user_attrs={"baseline": True, "fixed": list(today)})
    for t in trials:
        if t.state == TrialState.RUNNING:
            optuna.Trial(study, t._trial_id).set_user_attr("interrupted", True)
            study.tell(t.number, state=TrialState.FAIL)
            fixed = t.user_attrs.get("fixed", list(t.params))
            study.enqueue_trial(t.params, user_attrs={"fixed": fixed, "rerun_of": t.number,
                                                      **({"baseline": True} if t.user_attrs.get("baseline") else {})})
            console.print(f"trial {t.number} was interrupted: queued again")
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))]
    todo = max(0, cfg.trials - len(done))
    if cfg.sampler == "grid":
        points = math.prod(len(values) for values in grid(cfg.space).values())
        todo = min(todo, max(0, points + int(cfg.baseline) - len(done)))
    console.print(f"sweep {cfg.name}: {len(done)} of {cfg.trials} trials done, {todo} to run, {cfg.parallel} at once")
    return todo


def state_name(t) -> str:
    if t.user_attrs.get("interrupted"):
        return "interrupted"
    return {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
            "WAITING": "waiting"}[t.state.name]


def importance(study) -> dict[str, float]:
    """Each parameter's share of the objective's variance over complete trials (Optuna's default evaluator);
    empty while fewer than two complete trials differ."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):
        return {}


def write_results(study, plan: Plan, repo: Path) -> dict:
    """reports/sweep/trials.csv (one row per trial; DVC plots the objective over trials), importance.json,
    sweep.png, sweep.md, and metrics/sweep.json (the best trial: experiment, params, metrics). Returns the rows,
    the importances and the summary."""
    cfg = plan.cfg
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    keys = list(cfg.space)
    rows = []
    for t in trials:
        objective = t.user_attrs.get("objective")
        rows.append({"trial": t.number, "state": state_name(t), "objective": objective,
                     "pruned_at": t.user_attrs.get("pruned_at"), "seconds": t.user_attrs.get("seconds"),
                     "experiment": t.user_attrs.get("experiment"),
                     **{k: t.params.get(k, "(params.yaml)") for k in keys},
                     "baseline": bool(t.user_attrs.get("baseline"))})
    weights = importance(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    baseline = next((t for t in trials if t.user_attrs.get("baseline") and t.state == TrialState.COMPLETE), None)
    summary = {
        "objective": cfg.objective, "direction": cfg.direction,
        "trials": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "interrupted")},
        "seconds": round(sum(r["seconds"] or 0 for r in rows), 1),
        "best": None if best is None else {"trial": best.number, "experiment": best.user_attrs.get("experiment"),
                                           "value": best.value, "params": best.params,
                                           "metrics": best.user_attrs.get("metrics", {})},
        "baseline": None if baseline is None else {"trial": baseline.number, "value": baseline.value},
        "importance": weights,
    }
    out = repo / REPORT
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "trials.csv", buf.getvalue())
    atomic_write_text(out / "importance.json", json.dumps([{"param": k, "importance": v} for k, v in weights.items()]))
    save_figure(sweep_figure(rows, weights, cfg), out / "sweep.png")
    atomic_write_text(out / "sweep.md", markdown(rows, weights, summary, cfg))
    (repo / METRICS).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(repo / METRICS, json.dumps(summary, indent=1))
    return {"rows": rows, "importance": weights, "summary": summary}


def sweep_figure(rows: list[dict], weights: dict, cfg: SweepConfig):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    better = max if cfg.direction == "maximize" else min
    best, xs, ys = None, [], []
    for state, marker, color in (("complete", "o", "C0"), ("pruned", "x", "C1"), ("failed", "s", "C3")):
        pts = [(r["trial"], r["objective"]) for r in rows if r["state"] == state and r["objective"] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=state)
    for r in rows:
        if r["state"] == "complete" and r["objective"] is not None:
            best = r["objective"] if best is None else better(best, r["objective"])
            xs.append(r["trial"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C2", label="best so far")
    for r in rows:
        if r["baseline"] and r["objective"] is not None:
            ax.axhline(r["objective"], color="grey", linestyle="--", label="baseline (params.yaml)")
    ax.set(xlabel="trial", ylabel=cfg.objective, title=f"sweep {cfg.name}: {cfg.objective} ({cfg.direction})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    names = list(weights)[::-1]
    bx.barh(names, [weights[n] for n in names], color="C0")
    bx.set(xlabel="importance (share of the objective's variance)", title="parameter importance")
    if not names:
        bx.text(0.5, 0.5, "needs two complete trials that differ", ha="center", va="center", transform=bx.transAxes)
    return fig


def fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], weights: dict, summary: dict, cfg: SweepConfig) -> str:
    best, base = summary["best"], summary["baseline"]
    lines = [f"# Sweep {cfg.name}", "",
             f"Objective: {cfg.objective} ({cfg.direction}). Trials: " +
             ", ".join(f"{n} {s}" for s, n in summary["trials"].items() if n) + f"; {summary['seconds']:.0f} s of trials.", ""]
    if best:
        lines += [f"Best: trial {best['trial']} (`dvc exp apply {best['experiment']}`), {cfg.objective} = "
                  f"{best['value']:.4f}" + (f", against {base['value']:.4f} for the baseline (trial {base['trial']})"
                                             if base else "") + ".", ""]
    header = ["trial", "state", "objective", "pruned_at", "seconds", "experiment", *cfg.space]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(r[h]) + (" (baseline)" if h == "trial" and r["baseline"] else "") for h in header) + " |"
              for r in rows]
    if weights:
        lines += ["", "| parameter | importance |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in weights.items()]
    lines += ["", "![the objective over trials and each parameter's importance](sweep.png)", ""]
    return "\n".join(lines)


def promote(repo: Path, experiment: str, console: Console) -> None:
    """The best trial into the workspace (`dvc exp apply`: its params, dvc.lock and outputs), then `dvc repro` of
    what is stale (the stages the trial did not run), so that `dvc repro` reproduces the promoted model."""
    console.print(f"promoting {experiment}: dvc exp apply, then dvc repro")
    dvc(repo, "exp", "apply", experiment)
    code = run_group([sys.executable, "-m", "dvc", "repro"], console, cwd=repo)
    if code:
        raise RuntimeError(f"`dvc repro` after applying {experiment} exited with status {code}; see above")
