"""Does fusion matter on the default records? Fused vs each input alone vs late fusion, and a missing input.

    nice -n 10 python benchmarks/fusion.py [--seeds 0 1 2] [--epochs 16] [--remove image caption speech] [--out runs/fusion]

On the default dataset's records (core/data/digits.py: a 2 x 2 grid of digit scans, its caption, the caption spoken;
each input may hide one digit, the target is the digits' sum), per seed, with params.yaml's model and training
settings and the project's own prepare / train / evaluate code, every model trained the same number of steps:

- fused: the records source `scenes` in train.tasks (its train.modality_dropout from params.yaml);
- each input alone: a records source with that one column declared (`scenes_image`, ...);
- late fusion: the held-out records' log-probabilities of the three single-input classifiers, summed;
- missing input: for each input of `--remove` (default: every input), the fused model with it absent from every
  other held-out record, against the best model that never had that input (the fused pair of the other two inputs,
  `scenes_no_<input>`, or either one alone);
- retrieval by sample: params.yaml's contrastive task `image_caption` (a grid and its own caption) trained alone,
  recall@1 and median rank both ways over every held-out record, beside chance (1 / their number).

Prints each figure per seed and their min / mean / spread (max - min) as JSON, and writes it to --out/fusion.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console

from tessera.core.config import GenerateParams, parse_params
from tessera.core.data.batching import to_device
from tessera.core.data.digits import generate
from tessera.core.data.records import RecordsSplit
from tessera.core.stages.evaluate import evaluate_model
from tessera.core.stages.prepare import prepare_data
from tessera.core.stages.train import train_model
from tessera.core.tasks.datasets import collate_task
from tessera.core.tasks.multitask import load_trained

ROOT = Path(__file__).resolve().parents[1]
INPUTS = {"image": "image", "caption": "text", "speech": "audio"}
PAIR = "image_caption"  # params.yaml's contrastive task by sample: a grid and its own caption
QUIET = Console(file=io.StringIO())


def sources(raw: Path, removes: list[str], inputs: dict) -> dict:
    """The fused source, one per input alone, and (of three inputs or more) the others without each of `removes`,
    all over the same tables."""
    table = {"format": "records", "train": str(raw / "records/train.csv"), "test": str(raw / "records/test.csv"),
             "target": "label"}
    out = {"scenes": {**table, "columns": inputs}}
    out.update({f"scenes_{name}": {**table, "columns": {name: kind}} for name, kind in inputs.items()})
    if len(inputs) > 2:
        out.update({f"scenes_no_{gone}": {**table, "columns": {n: k for n, k in inputs.items() if n != gone}}
                    for gone in removes})
    return out


def params_for(base: dict, raw: Path, out: Path, removes: list[str], task: str | None = None, seed: int = 0, epochs=None,
               inputs: dict = INPUTS):
    """params.yaml with the records sources, training `task` alone (seed `seed`), every output under `out`."""
    train = {**base["train"], "tasks": [task] if task else ["scenes"], "align": [], "seed": seed,
             "out": str(out / f"{task}-{seed}"), "metrics": str(out / f"{task}-{seed}.json"),
             "modality_dropout": {task: {k: v for k, v in base["train"].get("modality_dropout", {}).get("scenes", {}).items()
                                         if k in inputs}} if task == "scenes" else {}}
    if epochs is not None:
        train["epochs"] = epochs
    mapping = {}
    if task == PAIR:  # the tasks mapping says it: train.tasks cannot
        mapping = {PAIR: {"kind": "contrastive", "inputs": ["scenes.image", "scenes.caption"]}}
        del train["tasks"], train["align"]
    srcs = sources(raw, removes, inputs)
    own = {f"{s}.{name}": v for s, src in srcs.items() for name in src["columns"]  # scenes' inputs' own settings, for
           for ref, v in base["model"].get("inputs", {}).items() if ref == f"scenes.{name}"}  # the same input anywhere
    return parse_params({**base, "tasks": mapping, "model": {**base["model"], "inputs": own}, "prepare": {**base["prepare"], "root": str(raw), "out": str(out / "prepared"),
                                             "metrics": str(out / "prepare.json"), "sources": srcs},
                         "train": train, "evaluate": {**base["evaluate"], "out": str(out / f"{task}-{seed}-reports"),
                                                      "metrics": str(out / f"{task}-{seed}-eval.json")}})


@torch.no_grad()
def log_probs(folder: str, prepared: Path, task: str, absent: dict[str, torch.Tensor] | None = None):
    """The trained model's log-probabilities over the held-out records [N, C], its classes and the labels [N] (as
    class names); `absent`: input -> [N] bool, records that lack it."""
    model = load_trained(folder).eval()
    split = RecordsSplit(prepared / task, "test")
    out = []
    for start in range(0, len(split), 256):
        idx = torch.arange(start, min(start + 256, len(split)))
        inputs, _ = to_device(collate_task(task, None, split.gather(idx), model.inputs(task)), "cpu")  # pixels as floats
        for name, gone in (absent or {}).items():
            inputs["present"][:, split.inputs.index(name)] &= ~gone[idx]
        out.append(torch.log_softmax(model.task_model(task)(**inputs)["pred_logits"].float(), -1))
    classes = model.classes[task]
    return torch.cat(out), classes, [classes[i] for i in split.labels()]


def accuracy(lp: torch.Tensor, classes: list[str], labels: list[str]) -> float:
    return sum(classes[i] == y for i, y in zip(lp.argmax(-1).tolist(), labels)) / len(labels)


def run_seed(base: dict, raw: Path, out: Path, removes: list[str], seed: int, epochs, inputs: dict = INPUTS) -> dict:
    prepared = out / "prepared"
    figures, lps = {}, {}
    for task in sources(raw, removes, inputs):
        p = params_for(base, raw, out, removes, task, seed, epochs, inputs)
        t0 = time.time()
        summary = train_model(p, QUIET)
        lps[task] = log_probs(p.train.out, prepared, task)
        figures[task] = accuracy(*lps[task])
        figures[f"{task}.steps"], figures[f"{task}.seconds"] = summary["steps"], round(time.time() - t0, 1)
        if task == "scenes":  # the project's own evaluation agrees with the accuracy computed here
            evaluated = evaluate_model(p, QUIET)["scenes.accuracy"]
            assert abs(evaluated - figures[task]) < 1e-6, (evaluated, figures[task])
        print(seed, task, figures[task], summary["steps"], "steps", flush=True)
    classes, labels = lps["scenes"][1], lps["scenes"][2]
    singles = [lps[f"scenes_{n}"] for n in inputs]
    assert all(s[1] == classes and s[2] == labels for s in singles), "per-input models disagree on classes or records"
    figures["late_fusion"] = accuracy(sum(s[0] for s in singles), classes, labels)
    figures["best_single"] = max(figures[f"scenes_{n}"] for n in inputs)
    n = len(labels)
    half = torch.arange(n) % 2 == torch.tensor(seed % 2)  # every other record, alternating with the seed
    p = params_for(base, raw, out, removes, "scenes", seed, epochs, inputs)
    for gone in removes:
        figures[f"fused_{gone}_absent_from_half"] = accuracy(*log_probs(p.train.out, prepared, "scenes", {gone: half}))
        figures[f"best_without_{gone}"] = max([figures.get(f"scenes_no_{gone}", 0.0)]
                                              + [figures[f"scenes_{k}"] for k in inputs if k != gone])
    figures["test_records"] = n
    if "caption" in inputs:
        figures.update(retrieval(params_for(base, raw, out, removes, PAIR, seed, epochs, inputs)))
        print(seed, PAIR, {k: v for k, v in figures.items() if k.startswith(PAIR)}, flush=True)
    return figures


def retrieval(p) -> dict:
    """The contrastive task by sample trained alone: recall@1 and median rank both ways over the held-out records
    (the gallery), as evaluation reports them, and chance (1 / gallery)."""
    train_model(p, QUIET)
    metrics = evaluate_model(p, QUIET)
    keys = [f"{PAIR}.{a}_to_{b}_{m}" for a, b in (("image", "caption"), ("caption", "image")) for m in ("r1", "median_rank")]
    gallery = len(RecordsSplit(Path(p.prepare.out) / "scenes", "test"))
    return {**{k: metrics[k] for k in keys}, f"{PAIR}.chance_r1": 1 / gallery}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=float, default=None, help="default: params.yaml's train.epochs")
    ap.add_argument("--remove", choices=list(INPUTS), nargs="+", default=list(INPUTS))
    ap.add_argument("--raw", default="data/raw", help="the default dataset (generated here when it has no records)")
    ap.add_argument("--out", default="runs/fusion")
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw, out = Path(args.raw).resolve(), Path(args.out).resolve()
    if not (raw / "records" / "train.csv").exists():
        generate(GenerateParams(**{**base.get("generate", {}), "out": str(raw)}))
    t0 = time.time()
    prepare_data(params_for(base, raw, out, args.remove), QUIET)
    prepare_s = round(time.time() - t0, 1)
    per_seed = {seed: run_seed(base, raw, out, args.remove, seed, args.epochs) for seed in args.seeds}
    summarise(per_seed, args, prepare_s, out / "fusion.json")


def summarise(per_seed: dict, args, prepare_s: float, path: Path) -> None:
    """min / mean / spread of each figure over the seeds, and the margins the README's targets name, to `path`."""
    keys = [k for k in per_seed[args.seeds[0]] if not k.endswith((".seconds", ".steps")) and k != "test_records"]
    stats = {k: {"min": min(f[k] for f in per_seed.values()), "mean": sum(f[k] for f in per_seed.values()) / len(per_seed),
                 "spread": max(f[k] for f in per_seed.values()) - min(f[k] for f in per_seed.values())} for k in keys}
    margins = {"fused - best_single": [f["scenes"] - f["best_single"] for f in per_seed.values()],
               "fused - late_fusion": [f["scenes"] - f["late_fusion"] for f in per_seed.values()],
               **{f"fused {gone} absent from half - best without it":
                  [f[f"fused_{gone}_absent_from_half"] - f[f"best_without_{gone}"] for f in per_seed.values()]
                  for gone in args.remove}}
    result = {"command": f"python {sys.argv[0]} " + " ".join(f"--{k} {v if not isinstance(v, list) else ' '.join(map(str, v))}"
                                                                     for k, v in vars(args).items()),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.node()}, "
              f"{torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}",
              "prepare_seconds": prepare_s, "per_seed": per_seed, "stats": stats,
              "margins": {k: {"min": min(v), "values": v} for k, v in margins.items()}}
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("stats", "margins")}, indent=1))


if __name__ == "__main__":
    main()
