"""What pruning saves, and what a sweep finds: `tessera sweep` over the default pipeline's learning rate, warmup and
loss weights (params.yaml's sweep.space) with the median pruner, then the very same trials again without pruning
(a second study, each trial queued with the first one's values), on the default data. Prints the wall time of each
sweep and the best trial's validation and held-out (test) metrics next to today's defaults (trial 0).

    git clone . /tmp/bench && cd /tmp/bench && dvc repro prepare
    python benchmarks/sweep_cost.py --repo /tmp/bench [--trials 12] [--epochs 4]

It edits the clone's params.yaml (train.epochs, train.eval_every and the sweep section; not committed, which every
trial takes with it) and leaves there sweeps/, the experiments (`dvc exp show`), reports/sweep/ and
metrics/sweep.json of the second sweep.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

HEADLINE = ["val.headline", "test.image.accuracy", "test.audio.accuracy", "test.text.accuracy",
            "test.detection.map_50", "test.align.audio_to_image_r1"]


def sweep(repo: Path, params: dict, name: str, pruner: str) -> float:
    params["sweep"].update({"name": name, "pruner": {**params["sweep"]["pruner"], "kind": pruner}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.time()
    with open(repo / f"sweep-{name}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "tessera.core.entry.cli", "sweep"], cwd=repo, check=True, stdout=log,
                       stderr=subprocess.STDOUT)
    return time.time() - start


def study(repo: Path, name: str) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(repo / "sweeps" / name / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


def describe(s: optuna.Study, seconds: float) -> dict:
    trials = s.get_trials(deepcopy=False)
    best, base = s.best_trial, trials[0]
    return {"seconds": round(seconds), "complete": sum(t.state.name == "COMPLETE" for t in trials),
            "pruned": sum(t.state.name == "PRUNED" for t in trials),
            "trial_seconds": [t.user_attrs.get("seconds") for t in trials],
            "best": {"trial": best.number, "params": best.params, **{k: best.user_attrs["metrics"].get(k) for k in HEADLINE}},
            "baseline": {"trial": base.number, "state": base.state.name,
                         **{k: base.user_attrs.get("metrics", {}).get(k) for k in HEADLINE}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=float, default=4)
    args = parser.parse_args()
    repo = args.repo.resolve()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update({"epochs": args.epochs, "eval_every": 100})
    params["sweep"].update({"trials": args.trials, "parallel": 1, "objective": "val.headline",
                            "pruner": {"kind": "median", "startup_trials": 2, "warmup_steps": 200}})
    pruned_s = sweep(repo, params, "pruned", "median")
    pruned = study(repo, "pruned")
    # the same trials without pruning: a second study, each queued with the first one's values
    journal = repo / "sweeps/full/journal.log"
    journal.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    again = optuna.create_study(storage=storage, study_name="full", direction="maximize")
    for t in sorted(pruned.get_trials(deepcopy=False), key=lambda t: t.number):
        again.enqueue_trial(t.params, user_attrs={"fixed": list(t.params), **({"baseline": True} if t.number == 0 else {})})
    full_s = sweep(repo, params, "full", "none")
    result = {"trials": args.trials, "epochs": args.epochs, "pruned": describe(pruned, pruned_s),
              "full": describe(study(repo, "full"), full_s)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
