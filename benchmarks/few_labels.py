"""Few labels: pretrained against from scratch against a classical baseline, as the share of training labels falls.

Two datasets that ship inside scikit-learn's wheel (no download): the handwritten digits (1,797 8 x 8 scans, 10
classes; written as PNGs, an `imagefolder` source) and breast cancer Wisconsin (569 rows, 30 numeric features, 2
classes; written as CSV, a `table` source). Each is split once, stratified 80 / 20 with random_state 0, so every
arm, fraction and seed is scored on the same test rows. For each label fraction (5%, 20%, 100% of the training
split; stratified, at least one per class, drawn by the seed) the kept rows are written as the source's `train`
and the others, without labels, as its `unlabelled` (a flat folder of PNGs; a CSV without the label column).
A tenth of the labelled rows is validation (digits: prepare.val_fraction's hash; the table: a `split` column,
stratified, at least one row), which training needs; validation runs once, at the last step, so the final
weights are the ones tested and a handful of validation samples picks nothing.

Three arms per (dataset, fraction, seed), the first two through the project's own stages on params files written
here (`tessera prepare` once, counted in neither; then `tessera train`, or `tessera pretrain` then `tessera train`;
the CPU seconds of a stage are those of its processes and their children, benchmarks/polarity_pretrain.py's
`stage`):
  (a) from scratch: train on the labelled rows for --steps supervised steps;
  (b) pretrained: pretrain (masked prediction, labels unused) for --pretrain-steps on the labelled training
      inputs and the unlabelled ones, then train from its weights (pretrain.enabled) for the same --steps;
  (c) classical, on exactly the rows (a) and (b) train on (read back from the prepared shards): an RBF SVC on the
      raw pixels for digits (scikit-learn's own digits example), StandardScaler + LogisticRegression for the
      table (at a few dozen rows gradient boosting's leaves of 20 rows barely split).
The model is params.yaml's (D=128, 4 blocks, 4 heads, CLS pooling; 16 px digits in 4 px patches), and so is
pretraining (mask ratio 0.6, teacher decay 0.9998); B=64 and lr 1e-3 in both stages, warmup 30 steps. Held-out
test accuracy (`tessera train`'s test pass of the final weights, which `tessera evaluate` would report) per arm,
fraction and seed, and its min / mean / spread over the seeds, go to --out/few_labels.json, the learning curves
(accuracy against labels kept) to --out/few_labels.png, and a table to stdout.

    python benchmarks/few_labels.py [--seeds 0 1 2] [--steps 300] [--pretrain-steps 200]
        [--datasets digits breast_cancer] [--fractions 0.05 0.2 1] [--teacher-decay 0.9998] [--pool cls]
        [--out benchmarks] [--work /tmp/few_labels]

Cost (2026-12-04, the 2-core machine, load 4-7, at `nice -n 10`): one (dataset, fraction, seed) took 100-152 CPU s
(prepare 7, (a) 28-54, (b) 58-92 of which pretraining 24-37; the table's 20% and 100% train on batches of 64
where its 5% has 20 rows), 713 CPU s and 14 wall minutes for one seed of all six, so the default three seeds are
about 36 CPU minutes (`--steps 200 --pretrain-steps 150` would bring them near 25; not measured).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from polarity_pretrain import stage

FRACTIONS = (0.05, 0.2, 1.0)
ARMS = ("scratch", "pretrained", "classical")


def keep_labels(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which rows [N] (bool) keep their label: `fraction` of each class (rounded, at least one), drawn by `seed`,
    so the kept rows are stratified and every class is seen."""
    rng = np.random.default_rng(seed)
    kept = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        kept[rng.choice(rows, size=max(1, round(fraction * len(rows))), replace=False)] = True
    return kept


def val_rows(y: np.ndarray, seed: int, share: float = 0.1) -> np.ndarray:
    """Which of the labelled rows [N] (bool) are validation: `share` of them, stratified where every class has
    two, at least one."""
    n_val = max(1, round(share * len(y)))
    if n_val >= len(y):
        raise ValueError(f"{len(y)} labelled rows leave none to train on after validation")
    _, counts = np.unique(y, return_counts=True)
    strata = y if counts.min() >= 2 and n_val >= len(counts) else None
    _, val = train_test_split(np.arange(len(y)), test_size=n_val, stratify=strata, random_state=seed)
    is_val = np.zeros(len(y), dtype=bool)
    is_val[val] = True
    return is_val


def digits():
    d = load_digits()
    return d.images, d.target, None


def breast_cancer():
    d = load_breast_cancer()
    return d.data, d.target, [n.replace(" ", "_") for n in d.feature_names]


def write_images(raw: Path, X: np.ndarray, y: np.ndarray, columns: None, train: np.ndarray, kept: np.ndarray,
                 test: np.ndarray, seed: int) -> tuple[dict, dict[str, int]]:
    """raw/images/{train/<class>, unlabelled, test/<class>}/<row>.png (0-16 -> 0-255 grey) -> the source and each
    labelled training file's name (relative to raw, as the shards list it) -> its row."""
    scans = (X * (255 / 16)).round().astype(np.uint8)  # [N, 8, 8]
    names = {}
    for i in train[kept]:
        names[f"images/train/{y[i]}/{i:04d}.png"] = int(i)
    files = {**names, **{f"images/unlabelled/{i:04d}.png": i for i in train[~kept]},
             **{f"images/test/{y[i]}/{i:04d}.png": i for i in test}}
    for name, i in files.items():
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scans[i]).save(raw / name)
    src = {"format": "imagefolder", "train": str(raw / "images/train"), "test": str(raw / "images/test")}
    if (~kept).any():
        src["unlabelled"] = str(raw / "images/unlabelled")
    return src, names


def write_table(raw: Path, X: np.ndarray, y: np.ndarray, columns: list[str], train: np.ndarray, kept: np.ndarray,
                test: np.ndarray, seed: int) -> tuple[dict, dict[str, int]]:
    """raw/table/{train.csv (features, label, split: train or val), unlabelled.csv (features), test.csv (features,
    label)} -> the source and each labelled training row's name ("table/train.csv:<line>") -> its row."""
    (raw / "table").mkdir(parents=True, exist_ok=True)
    values = lambda i: [repr(float(v)) for v in X[i]]  # noqa: E731
    labelled = train[kept]
    is_val = val_rows(y[labelled], seed)
    lines = [",".join(columns + ["label", "split"])]
    names = {}
    for i, v in zip(labelled, is_val):
        lines.append(",".join([*values(i), str(int(y[i])), "val" if v else "train"]))
        if not v:
            names[f"table/train.csv:{len(lines)}"] = int(i)
    (raw / "table/train.csv").write_text("\n".join(lines) + "\n")
    (raw / "table/test.csv").write_text("\n".join([",".join(columns + ["label"])] +
                                                  [",".join([*values(i), str(int(y[i]))]) for i in test]) + "\n")
    src = {"format": "table", "train": str(raw / "table/train.csv"), "test": str(raw / "table/test.csv")}
    if (~kept).any():
        (raw / "table/unlabelled.csv").write_text("\n".join([",".join(columns)] +
                                                            [",".join(values(i)) for i in train[~kept]]) + "\n")
        src["unlabelled"] = str(raw / "table/unlabelled.csv")
    return src, names


# dataset -> (loader, modality, writer, classical baseline on raw features [N, F])
DATASETS = {
    "digits": (digits, "image", write_images, lambda: SVC()),
    "breast_cancer": (breast_cancer, "tabular", write_table,
                      lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))),
}


def params_for(args, work: Path, modality: str, source: dict, arm: str, seed: int, n_train: int = 0) -> dict:
    """One params file: the dataset's task alone, params.yaml's model; each arm writes its own models/ and metrics/,
    both read the same prepared data. Validation once, at the last of --steps steps (eval_every = the steps)."""
    batches = max(1, n_train // min(args.batch_size, max(1, n_train)))  # TaskStream's batches per epoch
    return {
        "tasks": {modality: {"inputs": [modality]}},
        "model": {"size": "debug", "embed_dim": args.dim, "depth": args.depth, "num_heads": args.heads,
                  "pool": args.pool, "image": {"img_size": 16, "patch_size": 4}},
        "prepare": {"root": str(work / "raw"), "out": str(work / "prepared"), "metrics": str(work / "prepare.json"),
                    "val_fraction": 0.1, "sources": {modality: source}},
        "pretrain": {"enabled": arm == "pretrained", "steps": args.pretrain_steps, "lr": args.lr,
                     "teacher_decay": args.teacher_decay,
                     "out": str(work / arm / "pretrain"), "metrics": str(work / arm / "pretrain.json")},
        "train": {"epochs": args.steps / batches, "batch_size": args.batch_size, "lr": args.lr,
                  "warmup_steps": args.warmup, "eval_every": args.steps, "patience": 1000, "seed": seed,
                  "out": str(work / arm / "train"), "metrics": str(work / arm / "train.json")},
    }


def trained_rows(prepared: Path, names: dict[str, int]) -> list[int]:
    """The rows the prepared `train` split holds (each shard's sidecar lists its samples' sources), in names' terms:
    what (a) and (b) train on, so that (c) fits on the same labels."""
    meta = json.loads((prepared / "meta.json").read_text())
    listed = [s for f in meta["splits"]["train"] for s in json.loads((prepared / (f + ".json")).read_text())]
    return [names[s] for s in listed]


def run_one(args, name: str, fraction: float, seed: int) -> dict:
    """(a), (b) and (c) on one label fraction and seed -> their test accuracies, steps and CPU seconds."""
    load, modality, write, classical = DATASETS[name]
    X, y, columns = load()
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    kept = keep_labels(y[train], fraction, seed)
    work = args.work.resolve() / name / f"{fraction:g}" / f"seed{seed}"
    raw = work / "raw"
    source, names = write(raw, X, y, columns, train, kept, test, seed)
    prep = stage("prepare", params_for(args, work, modality, source, "scratch", seed), work / "prepare.yaml")
    counts = json.loads((work / "prepared" / modality / "meta.json").read_text())["counts"]
    rows = trained_rows(work / "prepared" / modality, names)

    out = {"labelled": int(kept.sum()), "train": counts["train"]["prepared"], "val": counts["val"]["prepared"],
           "unlabelled": counts.get("unlabelled", {}).get("prepared", 0), "test": counts["test"]["prepared"],
           "prepare_cpu_s": round(prep, 1)}
    scratch = params_for(args, work, modality, source, "scratch", seed, out["train"])
    out["scratch_cpu_s"] = round(stage("train", scratch, work / "scratch.yaml"), 1)
    pretrained = params_for(args, work, modality, source, "pretrained", seed, out["train"])
    out["pretrain_cpu_s"] = round(stage("pretrain", pretrained, work / "pretrained.yaml"), 1)
    out["pretrained_cpu_s"] = round(out["pretrain_cpu_s"] + stage("train", pretrained, work / "pretrained.yaml"), 1)
    for arm in ("scratch", "pretrained"):
        m = json.loads((work / arm / "train.json").read_text())
        out[arm], out[f"{arm}_steps"] = m["test"][f"{modality}.accuracy"], m["steps"]
    pj = json.loads((work / "pretrained/pretrain/pretrain.json").read_text())
    out["pretrain_loss"] = [pj.get("loss_first"), pj.get("loss_last")]

    flat = X.reshape(len(X), -1)
    model = classical().fit(flat[rows], y[rows])
    out["classical"] = float((model.predict(flat[test]) == y[test]).mean())
    return out


def summarise(results: dict) -> dict:
    """dataset -> fraction -> arm (and pretrained - scratch) -> min / mean / spread over the seeds."""
    stats = {}
    for name, by_fraction in results.items():
        for fraction, by_seed in by_fraction.items():
            runs = list(by_seed.values())
            figures = {arm: [r[arm] for r in runs] for arm in ARMS}
            figures["pretrained - scratch"] = [r["pretrained"] - r["scratch"] for r in runs]
            stats.setdefault(name, {})[fraction] = {
                k: {"min": min(v), "mean": sum(v) / len(v), "spread": max(v) - min(v)} for k, v in figures.items()}
    return stats


def table(results: dict, stats: dict) -> str:
    """The markdown table RESULTS.md shows: one row per dataset and fraction, mean (min, spread) per arm."""
    lines = ["| dataset | labels kept | train / val / unlabelled | (a) from scratch | (b) pretrained | (c) classical "
             "| (b) - (a) | CPU s (a) / (b) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    cell = lambda s: f"{s['mean']:.3f} ({s['min']:.3f}, {s['spread']:.3f})"  # noqa: E731
    for name, by_fraction in stats.items():
        for fraction, s in by_fraction.items():
            runs = list(results[name][fraction].values())
            r = runs[0]
            cpu = lambda k: sum(x[k] for x in runs) / len(runs)  # noqa: E731
            lines.append(f"| {name} | {float(fraction):.0%} | {r['train']} / {r['val']} / {r['unlabelled']} "
                         f"| {cell(s['scratch'])} | {cell(s['pretrained'])} | {cell(s['classical'])} "
                         f"| {s['pretrained - scratch']['mean']:+.3f} | {cpu('scratch_cpu_s'):.0f} / "
                         f"{cpu('pretrained_cpu_s'):.0f} |")
    return "\n".join(lines)


def plot(stats: dict, path: Path) -> None:
    """Learning curves: test accuracy against the labels kept, one panel per dataset, the mean of each arm over the
    seeds with its min-max band (matplotlib's Figure, no pyplot: no backend chosen for the process)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.5 * len(stats), 3.6), layout="constrained")
    for ax, (name, by_fraction) in zip(fig.subplots(1, len(stats), squeeze=False)[0], stats.items()):
        x = [100 * float(f) for f in by_fraction]
        for arm in ARMS:
            s = [by_fraction[f][arm] for f in by_fraction]
            ax.plot(x, [v["mean"] for v in s], marker="o", label=arm)
            ax.fill_between(x, [v["min"] for v in s], [v["min"] + v["spread"] for v in s], alpha=0.2)
        ax.set(xscale="log", xticks=x, xticklabels=[f"{v:g}%" for v in x], xlabel="training labels kept",
               ylabel="test accuracy", title=name)
        ax.legend()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    ap.add_argument("--steps", type=int, default=300, help="supervised steps, (a) and (b) alike")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--teacher-decay", type=float, default=0.9998, help="params.yaml's pretrain.teacher_decay")
    ap.add_argument("--pool", choices=["cls", "mean"], default="cls", help="how the head pools the tokens")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/few_labels"))
    args = ap.parse_args()
    start = time.time()
    results = {}
    for name in args.datasets:
        for fraction in args.fractions:
            for seed in args.seeds:
                t = time.time()
                r = run_one(args, name, fraction, seed)
                results.setdefault(name, {}).setdefault(f"{fraction:g}", {})[seed] = r
                print(f"{name} {fraction:.0%} seed {seed} ({time.time() - t:.0f} s): scratch {r['scratch']:.4f}, "
                      f"pretrained {r['pretrained']:.4f}, classical {r['classical']:.4f}; {json.dumps(r)}", flush=True)
    stats = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "few_labels.json").write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "wall_s": round(time.time() - start), "stats": stats, "results": results}, indent=1))
    plot(stats, args.out / "few_labels.png")
    print(table(results, stats))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
