"""Polarity at equal CPU time: (a) fine-tune alone (train from scratch on cv000-cv799 with labels) against (b) pretrain
on the same training texts (labels unused), then fine-tune; held-out accuracy on cv800-cv999. Both arms run the
project's own stages (`tessera prepare`, `tessera pretrain`, `tessera train` on params files of one jsonl text
source); the CPU time of each arm is the user + system time of its stage processes and their children (torchrun's
worker included), so a busy machine does not count against either. Prepare runs once for both and counts in neither.

Steps are set from --budget-cpu-seconds: a calibration measures the CPU seconds of one supervised and one pretraining
step on this model in this process; arm (a) trains budget / supervised-step steps (less its processes' start-up);
arm (b) pretrains for --pretrain-share of it, then fine-tunes for what arm (a) actually used less what pretraining
actually used. The table shows the measured CPU seconds of each.

Usage: python benchmarks/polarity_pretrain.py DIR --budget-cpu-seconds 270 [--pretrain-share 0.5] [--seed 0]
  [--max-len 256] [--work /tmp/polarity_pretrain]   (DIR holds review_polarity.tar.gz or its txt_sentoken/)"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import tarfile
import time
from pathlib import Path

import yaml


def child_cpu() -> float:
    """CPU seconds (user + system) of every waited-for child process so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def reviews(src: Path, work: Path) -> Path:
    """txt_sentoken/ (unpacked from src's tarball into work/ if need be)."""
    if (src / "txt_sentoken").is_dir():
        return src / "txt_sentoken"
    if not (work / "txt_sentoken").is_dir():
        with tarfile.open(src / "review_polarity.tar.gz") as tar:
            tar.extractall(work, filter="data")
    return work / "txt_sentoken"


def write_jsonl(root: Path, raw: Path) -> None:
    """raw/train.jsonl (cv000-cv799, 1,600 reviews) and raw/test.jsonl (cv800-cv999, 400): {text, label}; a review
    is one text, its sentences joined by spaces."""
    raw.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "test": []}
    for lab in ("neg", "pos"):
        for p in sorted((root / lab).glob("cv*.txt")):
            n = int(re.match(r"cv(\d+)", p.name).group(1))
            rows["train" if n < 800 else "test"].append({"text": " ".join(p.read_text().split()), "label": lab})
    for split, rs in rows.items():
        (raw / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))


def params_for(args, work: Path, arm: str, pretrain_steps: int = 0, epochs: float = 1.0) -> dict:
    """One params file: the text task alone on polarity, a small backbone; each arm writes its own models/ and
    metrics/, both read the same prepared data."""
    return {
        "model": {"size": "debug", "embed_dim": args.dim, "depth": args.depth, "num_heads": args.heads,
                  "pool": "mean", "text": {"vocab_size": args.vocab, "max_len": args.max_len}},
        "prepare": {"root": str(work / "raw"), "out": str(work / "prepared"), "metrics": str(work / "prepare.json"),
                    "sources": {"text": {"format": "jsonl", "train": str(work / "raw/train.jsonl"),
                                         "test": str(work / "raw/test.jsonl")}}},
        "pretrain": {"enabled": pretrain_steps > 0, "steps": max(1, pretrain_steps), "mask_ratio": args.mask_ratio,
                     "teacher_decay": args.teacher_decay,
                     "lr": args.lr, "out": str(work / arm / "pretrain"), "metrics": str(work / arm / "pretrain.json")},
        "train": {"tasks": ["text"], "align": [], "epochs": epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "warmup_steps": args.warmup, "eval_every": args.eval_every, "patience": 1000, "seed": args.seed,
                  "out": str(work / arm / "train"), "metrics": str(work / arm / "train.json")},
        "evaluate": {"out": str(work / arm / "reports"), "metrics": str(work / arm / "eval.json")},
    }


def stage(name: str, params: dict, path: Path) -> float:
    """Runs `tessera <name> -p path` and returns its CPU seconds (its children's included)."""
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    before = child_cpu()
    subprocess.run(["tessera", name, "-p", str(path)], check=True, stdout=subprocess.DEVNULL)
    return child_cpu() - before


def calibrate(params: dict, n: int = 6) -> tuple[float, float]:
    """CPU seconds of one supervised and one pretraining step (B = batch_size, texts of max_len tokens) on the
    model the stages build, measured here over n steps after a warm-up step."""
    import torch
    from tessera.core.config import parse_params
    from tessera.core.nn.pretrain import MaskedPrediction, sample_seeds
    from tessera.core.tasks.multitask import build_model
    p = parse_params(params, "calibration")
    model = build_model(p.model, Path(p.prepare.out), ["text"], None, p.train.modality_dropout)
    B, L, V = p.train.batch_size, p.model.text.max_len, p.model.text.vocab_size
    ids = torch.randint(1, V, (B, L))
    inputs, y = {"input_ids": ids, "pad_mask": torch.zeros(B, L, dtype=torch.bool)}, torch.randint(0, 2, (B,))
    opt = torch.optim.AdamW(model.parameters())
    obj = MaskedPrediction(model.adapters, model.backbone, p.pretrain.mask_ratio, p.pretrain.teacher_decay,
                           p.pretrain.decoder_depth)
    popt = torch.optim.AdamW([q for q in obj.parameters() if q.requires_grad])
    seeds = sample_seeds(0, 0, torch.arange(B))

    def sup():
        model.train()
        model("text", inputs, y)["loss"].backward(); opt.step(); opt.zero_grad()

    def pre():
        obj.train()
        obj("text", inputs, seeds)["loss"].backward(); popt.step(); popt.zero_grad(); obj.update_teacher()

    costs = []
    for f in (sup, pre):
        f()
        t = time.process_time()
        for _ in range(n):
            f()
        costs.append((time.process_time() - t) / n)
    return costs[0], costs[1]


def target_spread(params: dict, work: Path) -> float:
    """Mean cosine between the pretrained teacher's targets [N, D] of the real tokens of 64 validation reviews: near 0
    at initialisation, near 1 when the objective has collapsed (every token's target alike, a loss of about 0)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from tessera.core.config import parse_params
    from tessera.core.nn.pretrain import MaskedPrediction
    from tessera.core.tasks.datasets import collate_task, load_task_data
    from tessera.core.tasks.multitask import build_model
    p = parse_params(params, "spread")
    model = build_model(p.model, Path(p.prepare.out), ["text"], None, p.train.modality_dropout)
    obj = MaskedPrediction(model.adapters, model.backbone, p.pretrain.mask_ratio, p.pretrain.teacher_decay,
                           p.pretrain.decoder_depth)
    obj.load_state_dict(load_file(sorted((work / "b/pretrain/checkpoints").glob("step-*"))[-1] / "model.safetensors"))
    val = load_task_data(Path(p.prepare.out), ["text"], None, 0)["text"].val
    inputs, _ = collate_task("text", None, val.gather(torch.arange(min(64, len(val)))), model.inputs("text"))
    target, pad = obj.targets("text", inputs)
    x = F.normalize(target[~pad][:2000], dim=-1)
    return (x @ x.T).mean().item()


def accuracy(work: Path, arm: str) -> tuple[float, float, int, int]:
    m = json.loads((work / arm / "train.json").read_text())
    return m["test"]["text.accuracy"], m["val"]["text.accuracy"], m["steps"], m["best_step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--budget-cpu-seconds", type=float, required=True, help="per arm, CPU seconds (user + system)")
    ap.add_argument("--pretrain-share", type=float, default=0.5, help="of arm (b)'s budget, for pretraining")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=256, help="tokens kept of each review (its first ones)")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument("--teacher-decay", type=float, default=0.9998,
                    help="0.996 (the earlier default) collapsed here (targets of every token alike, loss 1.00 -> 0.03)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=45)
    ap.add_argument("--startup-cpu-seconds", type=float, default=25.0,
                    help="estimated CPU of a train process besides its steps (imports, validation, test)")
    ap.add_argument("--reuse-a", type=Path, default=None,
                    help="a work folder of an earlier run with these settings: its arm (a) is taken, not rerun")
    ap.add_argument("--work", type=Path, default=Path("/tmp/polarity_pretrain"))
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    write_jsonl(reviews(args.data.resolve(), work), work / "raw")
    prep = stage("prepare", params_for(args, work, "a"), work / "prepare.yaml")
    meta = json.loads((work / "prepared/text/meta.json").read_text())
    print(f"prepared in {prep:.0f} CPU s: {json.dumps(meta['counts'])}", flush=True)
    sup, pre = calibrate(params_for(args, work, "a"))
    per_epoch = meta["counts"]["train"]["prepared"] // args.batch_size  # TaskStream drops the last partial batch
    print(f"calibration: supervised step {sup:.3f} CPU s, pretraining step {pre:.3f} CPU s "
          f"(ratio {pre / sup:.2f}); {per_epoch} batches of {args.batch_size} per epoch", flush=True)

    steps_a = max(1, int((args.budget_cpu_seconds - args.startup_cpu_seconds) / sup))
    if args.reuse_a:
        (work / "a").mkdir(exist_ok=True)
        for f in ("train.json", "cpu.json"):
            (work / "a" / f).write_text((args.reuse_a.resolve() / "a" / f).read_text())
        cpu_a, steps_a = (json.loads((work / "a/cpu.json").read_text())[k] for k in ("cpu", "steps"))
    else:
        cpu_a = stage("train", params_for(args, work, "a", epochs=steps_a / per_epoch), work / "a.yaml")
        (work / "a/cpu.json").write_text(json.dumps({"cpu": cpu_a, "steps": steps_a}))
    overhead = cpu_a - steps_a * sup  # what a train process costs besides its steps, as measured in arm (a)

    steps_p = max(1, int((args.pretrain_share * cpu_a - 10.0) / pre))
    params_b = params_for(args, work, "b", pretrain_steps=steps_p)
    cpu_p = stage("pretrain", params_b, work / "b.yaml")
    steps_b = max(1, int((cpu_a - cpu_p - overhead) / sup))
    params_b = params_for(args, work, "b", pretrain_steps=steps_p, epochs=steps_b / per_epoch)
    cpu_b = stage("train", params_b, work / "b.yaml")
    pj = json.loads((work / "b/pretrain.json").read_text())
    spread = target_spread(params_b, work)

    rows = [("(a) fine-tune alone", 0, 0.0, *accuracy(work, "a"), cpu_a),
            ("(b) pretrain + fine-tune", steps_p, cpu_p, *accuracy(work, "b"), cpu_p + cpu_b)]
    print(f"\npolarity, seed {args.seed}, budget {args.budget_cpu_seconds:.0f} CPU s per arm; D={args.dim}, depth "
          f"{args.depth}, {args.heads} heads, first {args.max_len} tokens of each review, vocab {args.vocab}, "
          f"B={args.batch_size}, lr {args.lr}, mask ratio {args.mask_ratio}, teacher decay {args.teacher_decay}; pretraining loss "
          f"{pj['loss_first']:.4f} -> {pj['loss_last']:.4f}, mean cosine between its targets {spread:.3f} "
          "(about 0 at initialisation, 1 if collapsed)")
    print("| arm | pretrain steps | pretrain CPU s | fine-tune steps (best) | total CPU s | val acc | test acc |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ps, pc, test, val, steps, best, total in rows:
        print(f"| {name} | {ps} | {pc:.0f} | {steps} ({best}) | {total:.0f} | {val:.4f} | {test:.4f} |")
    print("| TF-IDF + LinearSVC (benchmarks/polarity_baseline.py) | | | | | | 0.8925 |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
