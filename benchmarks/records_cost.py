"""What records cost (issue 25, section 3): a fused training step against the single-input steps it replaces, and
memory against the number of records.

    nice -n 10 python benchmarks/records_cost.py step   [--rounds 30] [--raw data/raw] [--out runs/records_cost]
    nice -n 10 python benchmarks/records_cost.py memory [--sizes 10000 1000000] [--out runs/records_cost]

step: on the default records (core/data/digits.py: a 16 x 16 grey grid of scans, its caption of up to 32 tokens,
the caption spoken, up to 128 frames at 64 mels; generated into --raw with params.yaml's `generate` when it has
none), with params.yaml's model and training settings (fp32 on the CPU, batch 64, its modality dropout), one
training run of four tasks as benchmarks/fusion.py trains them: the fused task `scenes` over the three inputs, and
each input alone as a records source with that one column declared (`scenes_image`, `scenes_caption`,
`scenes_speech`). The trainer's own step (core/stages/train.py `train_step`: draw the batch, forward, backward,
clip, AdamW) runs round-robin over them, so fused and single steps alternate in one process; after warm-up rounds,
each step is timed alone. Prints the median and the least seconds per step of each task (on a shared machine a
step whose thread lost its core takes several times longer: the least is the step's own cost), fused / (sum of the
singles) by each, and each task's tokens per sample and forward FLOPs (the mean over 8 batches: both follow each
batch's longest caption and clip; torch's counter, core/entry/flops.py, plus attention's; a training step ~ 3x),
the share of them in attention (q k^T and the weighted sum of v) and the achieved GFLOP/s.

memory: a records table of N rows (CSV) whose every row has a caption (text: 3-6 digit words), a price (numeric)
and a colour (categorical), and every 10th row a photo, one of 10 tiny 16 x 16 PNG files shared by path (the image
path without writing a million files; the other rows lack the input, so absent cells are exercised too). Then, each
in a child process whose peak RSS is read from the kernel (data_scale.py's peak_rss_mb: ru_maxrss of the largest
child), `tessera prepare` on it (modalities/records.py list_records, core/stages/prepare.py prepare_records), and
one epoch of its fused task's training batches of 64 drawn as the trainer draws them (TaskStream over the prepared
RecordsSplit, collated; no model: what grows with N is the data path's). Prints records, prepare seconds, prepare
peak MB, stream seconds, stream peak MB.

Both print JSON lines and write --out/<what>.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from rich.console import Console

from data_scale import peak_rss_mb
from fusion import INPUTS, ROOT, sources

from tessera.core.config import GenerateParams, load_params, parse_params
from tessera.core.data.batching import to_device
from tessera.core.data.digits import WORDS, generate
from tessera.core.entry.flops import forward_flops
from tessera.core.runtime.distributed import Dist
from tessera.core.stages.prepare import prepare_data
from tessera.core.stages.train import TaskStream, build, train_step
from tessera.core.tasks.datasets import collate_task, load_task_data

QUIET = Console(file=io.StringIO())


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{platform.node()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load average {load}"


# -- step: a fused step against the single-input steps it replaces


def step_params(base: dict, raw: Path, out: Path):
    """params.yaml training the fused task and each input alone in one run, every output under `out`."""
    singles = {k: v for k, v in sources(raw, "image", INPUTS).items() if not k.startswith("scenes_no_")}
    return parse_params({**base, "tasks": {}, "prepare": {**base["prepare"], "root": str(raw), "out": str(out / "prepared"),
                                                         "metrics": str(out / "prepare.json"), "sources": singles},
                         "train": {**base["train"], "tasks": list(singles), "align": [], "schedule": "round_robin",
                                   "grad_accum": 1, "out": str(out / "train"), "metrics": str(out / "train.json")}})


def counted(model, task: str, inputs: dict) -> dict:
    """Tokens per sample of `task` on the batch `inputs` (the longest sample's: what attention runs over) and its
    forward FLOPs (core/entry/flops.py), all and in attention: q k^T and the weights times v, 2 B H L^2 Dh each, per
    block (B H Dh = B D)."""
    tm = model.task_model(task)
    with torch.no_grad():
        tokens, _ = tm.adapter(**inputs)
    B, L, D = tokens.shape
    attention = model.cfg.backbone().depth * 2 * (2 * B * L * L * D)
    total = forward_flops(tm, inputs)
    return {"tokens": L, "forward_gflop": total / 1e9, "attention_share": attention / total}


def step(raw: Path, out: Path, rounds: int, warmup: int) -> dict:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    if not (raw / "records" / "train.csv").exists():
        generate(GenerateParams(**{**base.get("generate", {}), "out": str(raw)}))
    torch.manual_seed(0)
    p = step_params(base, raw, out)
    prepare_data(p, QUIET)
    run = build(p, QUIET, [])
    names = run.names  # fused first, then each input alone: train_step takes them in turn
    seconds = {t: [] for t in names}
    for r in range(warmup + rounds):
        for t in names:
            start = time.perf_counter()
            train_step(run)
            if r >= warmup:
                seconds[t].append(time.perf_counter() - start)
    median = {t: statistics.median(s) for t, s in seconds.items()}
    fused, singles = names[0], names[1:]
    rows = {}
    for t in names:  # tokens and FLOPs vary with each batch's longest caption and clip: their mean over 8 batches
        counts = [counted(run.model.train(), t, to_device(run.streams[t].next(), run.d.device)[0]) for _ in range(8)]
        rows[t] = {"median_s": median[t], "min_s": min(seconds[t]),
                   "iqr_s": float(np.subtract(*np.percentile(seconds[t], [75, 25]))),
                   **{k: float(np.mean([c[k] for c in counts])) for k in counts[0]}}
        rows[t]["gflop_per_s"] = 3 * rows[t]["forward_gflop"] / median[t]  # backward ~ 2x forward
        print(json.dumps({t: rows[t]}), flush=True)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine(), "batch_size": p.train.batch_size, "rounds": rounds, "warmup_rounds": warmup,
              "model": {k: getattr(run.model.cfg.backbone(), k) for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")},
              "tasks": rows, "fused_over_sum_of_singles": median[fused] / sum(median[t] for t in singles),
              "fused_over_sum_of_singles_min": rows[fused]["min_s"] / sum(rows[t]["min_s"] for t in singles),
              "fused_over_sum_of_singles_gflop": rows[fused]["forward_gflop"] / sum(rows[t]["forward_gflop"] for t in singles)}
    print(json.dumps({k: result[k] for k in ("machine", "fused_over_sum_of_singles", "fused_over_sum_of_singles_min",
                                             "fused_over_sum_of_singles_gflop")}))
    return result


# -- memory: preparing and streaming records against their number


COLOURS = ["red", "green", "blue", "black", "white"]


def write_table(root: Path, n: int, seed: int = 0) -> Path:
    """root/records.csv: n rows (caption, price, colour, photo in every 10th row, label), and the 10 photos."""
    rng = np.random.default_rng(seed)
    (root / "photos").mkdir(parents=True, exist_ok=True)
    for k in range(10):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "photos" / f"{k}.png")
    words = WORDS["en"].split()
    digits = rng.integers(0, 10, (n, 6))
    lengths = rng.integers(3, 7, n)
    prices = np.round(rng.gamma(2.0, 10.0, n), 2)
    colours = rng.integers(0, len(COLOURS), n)
    table = root / "records.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption", "price", "colour", "photo", "label"])
        for i in range(n):
            d = digits[i, : lengths[i]]
            w.writerow([" ".join(words[x] for x in d), prices[i], COLOURS[colours[i]],
                        f"photos/{i % 100 // 10}.png" if i % 10 == 0 else "", int(d.sum()) % 10])
    return table


def memory_params(base: dict, root: Path) -> dict:
    source = {"format": "records", "train": str(root / "records.csv"), "test": None, "target": "label",
              "columns": {"caption": "text", "price": "numeric", "colour": "categorical", "photo": "image"}}
    return {**base, "tasks": {}, "prepare": {**base["prepare"], "root": str(root), "out": str(root / "prepared"),
                                             "metrics": str(root / "prepare.json"), "test_fraction": 0.1,
                                             "sources": {"records": source}},
            "train": {**base["train"], "tasks": ["records"], "align": [], "modality_dropout": {}}}


def memory(sizes: list[int]) -> list[dict]:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            start = time.perf_counter()
            write_table(root, n)
            written = time.perf_counter() - start
            (root / "params.yaml").write_text(yaml.safe_dump(memory_params(base, root)))
            env = {**os.environ, "OMP_NUM_THREADS": "2"}
            # each measurement in a fresh interpreter, so ru_maxrss of the children is that child's alone
            got = {}
            for what in ("prepare", "stream"):
                got[what] = json.loads(subprocess.run([sys.executable, __file__, "_rss", str(root), what], check=True,
                                                      capture_output=True, text=True, env=env).stdout)
            meta = json.loads((root / "prepared" / "records" / "meta.json").read_text())
            row = {"records": n, "table_mb": (root / "records.csv").stat().st_size / 2**20, "write_s": written,
                   "prepare_s": got["prepare"][1], "prepare_peak_mb": got["prepare"][0],
                   "stream_s": got["stream"][1], "stream_peak_mb": got["stream"][0],
                   "train_records": meta["counts"]["train"]["prepared"], "quarantined": len(meta["quarantine"])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _rss(root: str, what: str) -> None:
    cmd = [sys.executable, "-m", "tessera.core.entry.cli", "prepare", "-p", "params.yaml"] if what == "prepare" else \
        [sys.executable, __file__, "_stream", "params.yaml"]
    print(json.dumps(peak_rss_mb(cmd, Path(root), dict(os.environ))))


def _stream(params_file: str) -> None:
    """One epoch of the fused task's training batches, as the trainer draws them (no DataLoader worker: the CPU
    default)."""
    p = load_params(params_file)
    data = load_task_data(Path(p.prepare.out), ["records"], None, 0)
    meta = data["records"].train.meta
    inputs = {i["name"]: i["modality"] for i in meta["inputs"]}
    stream = TaskStream(data["records"], 0, 64, Dist(0, 1, 0, torch.device("cpu")), 0,
                        lambda b: collate_task("records", None, b, inputs), 0, p.train.shuffle_buffer)
    for _ in range(stream.batches_per_epoch):
        stream.next()


def main() -> None:
    if sys.argv[1] in ("_rss", "_stream"):
        return {"_rss": _rss, "_stream": _stream}[sys.argv[1]](*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["step", "memory"])
    ap.add_argument("--rounds", type=int, default=30, help="step: timed rounds (one step of each task each)")
    ap.add_argument("--warmup", type=int, default=3, help="step: untimed rounds first")
    ap.add_argument("--raw", default="data/raw", help="step: the default dataset (generated here when it has no records)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000], help="memory: records")
    ap.add_argument("--out", default="runs/records_cost")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "step":
        result = step(Path(args.raw).resolve(), out, args.rounds, args.warmup)
    else:
        result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": memory(args.sizes)}
    (out / f"{args.what}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
