"""The Optuna study of a sweep: its journal (a file with a lock, so that the sweep, its parallel trials' training
and any other process read and write it safely, and an interrupted sweep resumes from it), sampler, pruner, the
values a trial suggests, and what a trial reports at a validation. Optuna's public API only: a process that did
not ask a trial finds it by its number (`live_trial`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from tessera.core.config import SearchDim, SweepConfig


def study_folder(repo: Path, cfg: SweepConfig) -> Path:
    """sweeps/<name>/: the study's journal.log and lock, logs/<trial>.log, and work/<trial>/ while a trial runs."""
    return repo / "sweeps" / cfg.name


def journal_path(repo: Path, cfg: SweepConfig) -> Path:
    return study_folder(repo, cfg) / "journal.log"


def open_journal(journal: Path) -> JournalStorage:
    journal.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(journal)))


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


def load_study(storage: JournalStorage, cfg: SweepConfig) -> optuna.Study:
    """The study of `cfg.name` in the journal, created on first use. Its sampler is seeded with sweep.seed plus
    the trials the study holds, so that a resumed sweep does not draw its first run's values again (the grid
    sampler excepted); one study object serves every trial of a run (one sampler, one random stream)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines, one per trial
    study = optuna.create_study(storage=storage, study_name=cfg.name, direction=cfg.direction, load_if_exists=True,
                                pruner=make_pruner(cfg))
    study.sampler = make_sampler(cfg, cfg.seed + len(study.get_trials(deepcopy=False)))
    return study


def live_trial(storage: JournalStorage, study: optuna.Study, number: int) -> optuna.Trial:
    """Trial `number` of `study` as an object that reports and sets attributes, in any process: the storage maps
    (study name, trial number) to the trial's id."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


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
