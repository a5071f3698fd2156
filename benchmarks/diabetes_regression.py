"""Regression on the shared backbone against gradient boosting: scikit-learn's diabetes table (442 patients, 10
numeric features, a disease-progression score one year on; it ships inside scikit-learn's wheel, no download).

One fixed split for every seed (seed 0: 20% test, then 20% of the rest val, the rest train), written as a CSV
with a `split` column, so that both models see the same rows. Tessera runs as a user runs it, in a temp folder:
a params.yaml with `model.tabular.kind: regression`, then `tessera prepare`, `tessera train` (the checkpoint
chosen on val by R²) and `tessera evaluate` on the test split; its R² and MAE are metrics/eval.json's. The
baseline, `HistGradientBoostingRegressor(random_state=seed)`, fits on the train rows and is scored on test.
The seeds change Tessera's initialisation and batch order (gradient boosting is deterministic on 265 rows).

    python benchmarks/diabetes_regression.py [--seeds 3] [--epochs 80] [--out benchmarks/diabetes_regression.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_diabetes
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.metrics import mean_absolute_error, r2_score
from sklearn.model_selection import train_test_split


def split_rows(n: int) -> np.ndarray:
    """'train' / 'val' / 'test' per row: 64 / 16 / 20, the same for every seed."""
    rest, test = train_test_split(np.arange(n), test_size=0.2, random_state=0)
    train, val = train_test_split(rest, test_size=0.2, random_state=0)
    split = np.empty(n, dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    return split


def write_csv(path: Path, X: np.ndarray, y: np.ndarray, names: list[str], split: np.ndarray) -> None:
    lines = [",".join(names + ["progression", "split"])]
    lines += [",".join([*(repr(float(v)) for v in row), repr(float(t)), s]) for row, t, s in zip(X, y, split)]
    path.write_text("\n".join(lines) + "\n")


def tessera(work: Path, seed: int, epochs: int) -> dict:
    """prepare, train and evaluate through the CLI in `work` -> metrics/eval.json's figures on the test split."""
    params = {
        "model": {"size": "debug", "embed_dim": 64, "depth": 3, "num_heads": 4, "drop_rate": 0.1,
                  "tabular": {"label": "progression", "kind": "regression"}},
        "prepare": {"root": str(work), "sources": {"tabular": {"format": "table", "train": "diabetes.csv"}}},
        "train": {"tasks": ["tabular"], "epochs": epochs, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4,
                  "warmup_steps": 20, "eval_every": 20, "patience": 1000, "seed": seed, "num_workers": 0},
        "evaluate": {"split": "test"},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "train", "evaluate"):
        subprocess.run([sys.executable, "-m", "tessera.core.entry.cli", stage], cwd=work, check=True,
                       stdout=subprocess.DEVNULL)
    return json.loads((work / "metrics/eval.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/diabetes_regression.json"))
    args = parser.parse_args()
    data = load_diabetes()
    X, y = data.data, data.target
    split = split_rows(len(y))
    train, test = split == "train", split == "test"
    rows = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            write_csv(work / "diabetes.csv", X, y, list(data.feature_names), split)
            start = time.perf_counter()
            ours = tessera(work, seed, args.epochs)
            seconds = time.perf_counter() - start
        gb = HistGradientBoostingRegressor(random_state=seed).fit(X[train], y[train])
        pred = gb.predict(X[test])
        row = {"seed": seed, "tessera_r2": ours["tabular.r2"], "tessera_mae": ours["tabular.mae"],
               "hgb_r2": float(r2_score(y[test], pred)), "hgb_mae": float(mean_absolute_error(y[test], pred)),
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {k: {"mean": statistics.mean(r[k] for r in rows), "std": statistics.pstdev(r[k] for r in rows),
                   "min": min(r[k] for r in rows), "max": max(r[k] for r in rows)}
               for k in ("tessera_r2", "tessera_mae", "hgb_r2", "hgb_mae")}
    result = {"rows": len(y), "features": X.shape[1], "split": {s: int((split == s).sum()) for s in ("train", "val", "test")},
              "epochs": args.epochs, "seeds": rows, **summary}
    for k, v in summary.items():
        print(f"{k}: {v['mean']:.4f} +- {v['std']:.4f} (min {v['min']:.4f}, max {v['max']:.4f})", flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
