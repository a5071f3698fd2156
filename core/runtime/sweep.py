"""What a sweep shares with the training it runs: the Optuna study (file-backed journal, sampler, pruner, search
space) and the pruning hook training calls at every validation. The sweep itself (workspaces, DVC experiments,
results) is core/stages/sweep.py; its Prefect flow is flows/sweep.py.

A trial's training learns that it is one from the environment (TESSERA_TRIAL: the journal, the trial's id and the
sweep section, which `dvc exp run` and torchrun pass down), reports its validation to the journal and stops when the
pruner says so. The journal is a file with a lock: the sweep, its parallel trials and any other process on the
same study read and write it safely, and an interrupted sweep resumes from it.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch.distributed as dist
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from tessera.core.config import SearchDim, SweepConfig

ENV = "TESSERA_TRIAL"

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines, one per trial


def study_folder(repo: Path, cfg: SweepConfig) -> Path:
    """sweeps/<name>/: the study's journal.log and lock, logs/<trial>.log, and work/<trial>/ while a trial runs."""
    return repo / "sweeps" / cfg.name


def journal_path(repo: Path, cfg: SweepConfig) -> Path:
    return study_folder(repo, cfg) / "journal.log"


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    p = cfg.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    if p.kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.warmup_steps or "auto", reduction_factor=3)
    return optuna.pruners.NopPruner()


def grid(space: dict[str, SearchDim]) -> dict[str, list]:
    """Every value of each key, for the grid sampler (the config checks each has choices or a step)."""
    def values(d: SearchDim) -> list:
        if d.choices is not None:
            return list(d.choices)
        step = d.step or 1
        n = int((d.high - d.low) / step + 1e-9) + 1
        return [d.low + i * step if d.is_int else round(d.low + i * step, 12) for i in range(n)]
    return {k: values(d) for k, d in space.items()}


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its end-of-grid `study.stop()`, which only `study.optimize` can take (ask/tell
    raises, and a resumed sweep would fail as it marks an interrupted trial): the sweep counts its trials itself."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(cfg: SweepConfig, seed: int) -> optuna.samplers.BaseSampler:
    if cfg.sampler == "grid":  # its seed shuffles the grid's numbering, which a resumed study must keep
        return GridSampler(grid(cfg.space), seed=cfg.seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials running in parallel count as bad guesses, so parallel asks spread out
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def load_study(journal: Path, cfg: SweepConfig) -> optuna.Study:
    """The study of `cfg.name` in its journal, created on first use. Its sampler is seeded with sweep.seed plus
    the trials the study holds, so that a resumed sweep does not draw its first run's values again (the grid
    sampler excepted); one study object serves every trial of a run (one sampler, one random stream)."""
    journal.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(storage=storage, study_name=cfg.name, direction=cfg.direction, load_if_exists=True,
                                pruner=make_pruner(cfg))
    study.sampler = make_sampler(cfg, cfg.seed + len(study.get_trials(deepcopy=False)))
    return study


def suggest(trial: optuna.Trial, space: dict[str, SearchDim]) -> dict:
    """The trial's value of every key in `space`. An enqueued trial (the baseline, or the rerun of an interrupted
    one) lists the keys it fixes in its user attribute "fixed" and gets only those: the others keep what
    params.yaml says."""
    fixed = trial.user_attrs.get("fixed")
    values = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Fixed parameter")  # today's value may lie outside the searched range
        for key, d in space.items():
            if fixed is not None and key not in fixed:
                continue
            if d.choices is not None:
                values[key] = trial.suggest_categorical(key, d.choices)
            elif d.is_int:
                values[key] = trial.suggest_int(key, d.low, d.high, step=d.step or 1, log=d.log)
            else:
                values[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
    return values


def intermediate(study: optuna.Study, cfg: SweepConfig, val: dict) -> float:
    """What a trial reports at a validation (`val`: training's validation metrics with "headline"): the objective's
    own metric where validation has it, else (an objective of the held-out report alone) the headline, negated
    when the objective is minimised, so that the pruner compares in the study's direction."""
    key = cfg.objective.removeprefix("val.")
    if key in val:
        return float(val[key])
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return float(val["headline"] if maximize else -val["headline"])


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


@dataclass
class Pruning:
    """Inside a trial's training: reports each validation to the study and says when the pruner stops the trial.
    Only rank 0 talks to the journal; every rank gets its answer, so all stop at the same step."""

    trial: optuna.Trial | None  # on rank 0
    cfg: SweepConfig

    @classmethod
    def from_env(cls, rank: int) -> Pruning | None:
        """From TESSERA_TRIAL ({"journal", "trial_id", "sweep": the sweep section}), which the sweep sets: the
        study and its pruner are the sweep's, whatever the params file training reads says."""
        spec = os.environ.get(ENV)
        if not spec:
            return None
        spec = json.loads(spec)
        cfg = SweepConfig.model_validate(spec["sweep"])
        trial = optuna.Trial(load_study(Path(spec["journal"]), cfg), spec["trial_id"]) if rank == 0 else None
        return cls(trial, cfg)

    def should_stop(self, step: int, val: dict) -> bool:
        """`val`: the validation metrics at `step`, with "headline"."""
        stop = False
        if self.trial is not None:
            self.trial.report(intermediate(self.trial.study, self.cfg, val), step)
            stop = self.trial.should_prune()
            if stop:
                self.trial.set_user_attr("pruned_at", step)
        if dist.is_available() and dist.is_initialized():
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = flag[0]
        return stop
