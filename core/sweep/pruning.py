"""A sweep trial's pruning, as a training callback. Training knows nothing of sweeps: the sweep launches each
trial's `dvc exp run` with `trial_env`, which names this module's `from_env` in TESSERA_CALLBACKS (training loads
the callbacks named there, core/runtime/callbacks.py) and says which trial it is in TESSERA_SWEEP_TRIAL (read only
here). `dvc exp run` and torchrun pass both down to every rank. At each validation rank 0 reports to the study's
journal and asks the sweep's pruner; training shares its answer with every rank, so all stop at the same step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna

from tessera.core.config import SweepConfig
from tessera.core.errors import UserError
from tessera.core.runtime.callbacks import ENV as CALLBACKS, Callback, RunInfo
from tessera.core.sweep.study import intermediate, live_trial, load_study, open_journal

SPEC = "TESSERA_SWEEP_TRIAL"


def trial_env(journal: Path, cfg: SweepConfig, number: int) -> dict[str, str]:
    """The environment variables that make a training process trial `number` of the study in `journal`: this
    callback added to any the user names, and the trial's spec (the journal, the trial's number, the sweep section:
    the study and its pruner are the sweep's, whatever the params file training reads says)."""
    ours = f"{__name__}:from_env"
    return {CALLBACKS: ",".join(c for c in (os.environ.get(CALLBACKS, ""), ours) if c),
            SPEC: json.dumps({"journal": str(journal.resolve()), "trial": number, "sweep": cfg.model_dump()})}


class Pruning(Callback):
    """Reports each validation to trial `number` of the study in `journal` and returns True when the pruner stops
    it. `key` (part of training's run signature) names the trial: a trial resumes only its own checkpoints, never
    those of the run its workspace was made from."""

    def __init__(self, journal: Path, cfg: SweepConfig, number: int):
        self.journal, self.cfg, self.number = journal, cfg, number
        self.key = f"sweep {cfg.name} trial {number} ({journal})"
        self.trial: optuna.Trial | None = None  # rank 0's, from on_start

    def on_start(self, info: RunInfo) -> None:
        """Rank 0 (`info.is_main`) opens the trial in the journal; other ranks only hear its answers."""
        if info.is_main:
            storage = open_journal(self.journal)
            self.trial = live_trial(storage, load_study(storage, self.cfg), self.number)

    def on_validation(self, step: int, val: dict[str, float]) -> bool:
        """`val`: the validation metrics at `step`, with "headline". True (on rank 0; training stops every rank when
        one says so): the pruner stops this trial now."""
        if self.trial is None:
            return False
        self.trial.report(intermediate(self.trial.study, self.cfg, val), step)
        if not self.trial.should_prune():
            return False
        self.trial.set_user_attr("pruned_at", step)
        print(f"pruned at step {step}: the sweep's {self.cfg.pruner.kind} pruner stopped this trial", flush=True)
        return True


def from_env(params) -> Pruning:
    """The callback training builds from TESSERA_CALLBACKS (`factory(params)`); the trial is TESSERA_SWEEP_TRIAL's,
    and `params` is not read."""
    spec = os.environ.get(SPEC)
    if not spec:
        raise UserError(f"{CALLBACKS} names {__name__}:from_env, which only a sweep's trial can use ({SPEC} is not "
                        f"set): `tessera sweep` sets both; remove it from {CALLBACKS}")
    spec = json.loads(spec)
    return Pruning(Path(spec["journal"]), SweepConfig.model_validate(spec["sweep"]), spec["trial"])
