"""Tabular data on the shared backbone against gradient boosting, on tables that ship inside scikit-learn's wheel.

For each table and seed: a stratified 60 / 20 / 20 split (train / val / test), written as a CSV with a `split`
column, so that Tessera and scikit-learn's HistGradientBoostingClassifier see the same rows; `tessera prepare`
and training (the tabular task alone, model.size debug, in this process) choose the checkpoint on val and report
test accuracy; the baseline fits on train and is scored on test.

    python benchmarks/tabular.py [--seeds 5] [--epochs 60] [--out benchmarks/tabular.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import train_test_split

from tessera.core.config import parse_params
from tessera.core.stages.prepare import prepare_data
from tessera.core.stages.train import train_model

TABLES = {"breast_cancer": load_breast_cancer, "wine": load_wine}


def split_rows(y: np.ndarray, seed: int) -> np.ndarray:
    """'train' / 'val' / 'test' per row: 60 / 20 / 20, stratified by class."""
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=y[rest], random_state=seed)
    split = np.empty(len(y), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    return split


def write_csv(path: Path, X: np.ndarray, y: np.ndarray, names: list[str], split: np.ndarray) -> None:
    columns = [n.replace(" ", "_") for n in names]
    lines = [",".join(columns + ["label", "split"])]
    lines += [",".join([*(repr(float(v)) for v in row), str(int(label)), s]) for row, label, s in zip(X, y, split)]
    path.write_text("\n".join(lines) + "\n")


def tessera_accuracy(csv: Path, work: Path, seed: int, epochs: int) -> float:
    params = parse_params({
        "model": {"size": "debug", "embed_dim": 64, "depth": 3, "num_heads": 4, "drop_rate": 0.1},
        "prepare": {"root": str(work), "out": str(work / "prepared"), "metrics": str(work / "prepare.json"),
                    "sources": {"tabular": {"format": "table", "train": str(csv)}}},
        "train": {"tasks": ["tabular"], "epochs": epochs, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4,
                  "warmup_steps": 20, "eval_every": 20, "patience": 1000, "seed": seed, "num_workers": 0,
                  "out": str(work / "train"), "metrics": str(work / "train.json")},
    })
    prepare_data(params)
    return train_model(params)["test"]["tabular.accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/tabular.json"))
    args = parser.parse_args()
    results = {}
    for name, load in TABLES.items():
        data = load()
        X, y = data.data, data.target
        rows = []
        for seed in range(args.seeds):
            split = split_rows(y, seed)
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                write_csv(work / "table.csv", X, y, list(data.feature_names), split)
                start = time.perf_counter()
                ours = tessera_accuracy(work / "table.csv", work, seed, args.epochs)
                seconds = time.perf_counter() - start
            gb = HistGradientBoostingClassifier(random_state=seed).fit(X[split == "train"], y[split == "train"])
            baseline = float((gb.predict(X[split == "test"]) == y[split == "test"]).mean())
            rows.append({"seed": seed, "tessera": ours, "hist_gradient_boosting": baseline, "seconds": round(seconds, 1)})
            print(f"{name} seed {seed}: tessera {ours:.4f}, HistGradientBoosting {baseline:.4f} ({seconds:.0f} s)", flush=True)
        summary = {k: {"mean": statistics.mean(r[k] for r in rows), "std": statistics.pstdev(r[k] for r in rows),
                       "min": min(r[k] for r in rows)} for k in ("tessera", "hist_gradient_boosting")}
        results[name] = {"rows": len(y), "features": X.shape[1], "classes": len(set(y)), "seeds": rows, **summary}
        print(f"{name}: tessera {summary['tessera']['mean']:.4f} +- {summary['tessera']['std']:.4f}, "
              f"HistGradientBoosting {summary['hist_gradient_boosting']['mean']:.4f} +- "
              f"{summary['hist_gradient_boosting']['std']:.4f}", flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
