"""The data path at scale: training memory against dataset size, loader throughput against a memory-copy roofline,
and `tessera prepare` against a plain single-process PIL loop.

    python benchmarks/data_scale.py memory  [--sizes 10000 100000 1000000] [--old PATH]
    python benchmarks/data_scale.py loader  [--images 2048] [--clips 2048]
    python benchmarks/data_scale.py prepare [--images 20000]

memory: synthetic prepared splits of N 16 x 16 grey images (256 bytes each) train for one epoch (model.size
debug, batch 1024) in a training process of its own (`python -m tessera.core.entry.worker`), whose peak RSS is
read from the kernel (ru_maxrss of the child). With --old, the same splits train under another checkout's code
(commit 15b3626's layout: `LOCAL_RANK=0 python -m core.cli train`), side by side.

loader: batches of 256 gathered from memory-mapped shards into ready tensors (one thread), for 224 x 224 x 3 uint8
images and 10-second 16 kHz int16 clips (padded batches with lengths): as the training process draws them (into
reused buffers) against copying the same bytes into a tensor touched before (the roofline), and as a DataLoader
worker does (each batch into fresh memory) against copying them into a fresh tensor. The shards are freshly
written, so they are read from the page cache.

prepare: a generated ImageFolder of 384 x 384 RGB JPEGs (photo-sized: their decoding is the work), prepared to
32 x 32 grey shards by `tessera prepare` (every core) and by a plain loop of PIL open, convert, resize (one
process), on the same files; the page cache holds them for both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from tessera.core.data.shards import ShardedSplit, ShardWriter
from tessera.core.tasks.datasets import Batches, epoch_order
from tessera.modalities import REGISTRY

H100_IMG_S = 3254  # timm ViT-B/16, compiled, bf16, on one H100: ../shared/anchors/


def write_split(folder: Path, split: str, n: int, shape: tuple, dtype, shard_size: int, ragged: bool = False,
                seed: int = 0) -> list[str]:
    """n random samples of `shape` (ragged: lengths up to shape[0]) with labels 0-9, in shards."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(folder, split, shard_size, ("waveform",) if ragged else ())
    field = "waveform" if ragged else "image"
    for i in range(n):
        size = (int(rng.integers(shape[0] // 2, shape[0] + 1)),) if ragged else shape
        value = rng.integers(0, 255, size=size, dtype=np.uint8).astype(dtype) if dtype == np.uint8 else \
            rng.integers(-3000, 3000, size=size, dtype=np.int16)
        writer.add(f"{split}/{i}", **{field: value, "label": np.asarray(i % 10, dtype=np.int64)})
    writer.flush()
    return writer.files


def synthetic_images(root: Path, n: int) -> Path:
    """A prepared image modality of n train samples (and 1,000 each for val and test) under root/prepared."""
    folder = root / "prepared" / "image"
    splits = {s: write_split(folder, s, count, (1, 16, 16), np.uint8, 1024, seed=k)
              for k, (s, count) in enumerate((("train", n), ("val", 1000), ("test", 1000)))}
    meta = {"modality": "image", "key": f"synthetic-{n}", "classes": [str(c) for c in range(10)], "stats": {},
            "counts": {s: {"in": len(f), "prepared": len(f), "quarantined": 0} for s, f in splits.items()},
            "splits": splits, "quarantine": []}
    (folder / "meta.json").write_text(json.dumps(meta))
    return root / "prepared"


def peak_rss_mb(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(peak RSS in MB of the largest child process, seconds) of running `cmd` to completion."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - start


def memory(sizes: list[int], old: Path | None) -> list[dict]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            prepared = synthetic_images(root, n)
            params = {"model": {"size": "debug", "image": {"img_size": 16, "patch_size": 4, "in_chans": 1, "augment": False}},
                      "prepare": {"root": str(root), "out": str(prepared)},
                      "train": {"tasks": ["image"], "align": [], "epochs": 1, "batch_size": 1024, "eval_every": 10**9,
                                "num_workers": 0, "out": str(root / "train"), "metrics": str(root / "train.json")}}
            (root / "params.yaml").write_text(yaml.safe_dump(params))
            env = {**os.environ, "OMP_NUM_THREADS": "2"}
            # each measurement in a fresh interpreter, so ru_maxrss of the children is this run's alone
            new = json.loads(subprocess.run([sys.executable, __file__, "_rss", str(root), "new"], check=True,
                                            capture_output=True, text=True, env=env).stdout)
            row = {"samples": n, "tessera_mb": new[0], "tessera_s": new[1]}
            if old:
                (root / "train").exists() and shutil.rmtree(root / "train")
                got = json.loads(subprocess.run([sys.executable, __file__, "_rss", str(root), "old", str(old)], check=True,
                                                capture_output=True, text=True, env=env).stdout)
                row.update({"old_mb": got[0], "old_s": got[1]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _rss(root: str, which: str, old: str = "") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if which == "new":
        cmd = [sys.executable, "-m", "tessera.core.entry.worker", "--params", "params.yaml"]
    else:  # the old layout's worker: the CLI under LOCAL_RANK, its packages on the path
        cmd, env = [sys.executable, "-m", "core.cli", "train", "--params", "params.yaml"], \
            {**env, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": old}
    print(json.dumps(peak_rss_mb(cmd, Path(root), env)))


def throughput(split: ShardedSplit, collate, batch: int, reuse: bool, epochs: int = 3) -> float:
    """Samples per second gathered and collated over `epochs` epochs in the training order, drawn as one stream.
    reuse: as the training process draws them (Batches: into a ring of reused buffers); the clock starts after the
    ring's first `Batches.depth` batches, which allocate it (once an epoch: a few batches of hundreds in a real
    epoch). Else each batch into fresh memory, as a DataLoader worker does, every batch timed."""
    order = torch.cat([epoch_order(split.starts, r, 16384) for r in range(epochs)])
    batches = iter(Batches(split, order, batch, 0, 0, 1, collate) if reuse else (
        collate(split.gather(order[a: a + batch])) for a in range(0, len(order) - batch + 1, batch)))
    for _ in range(Batches.depth if reuse else 0):
        next(batches)
    start = time.perf_counter()
    n = sum(len(next(iter(inputs.values()))) for inputs, _ in batches)
    return n / (time.perf_counter() - start)


def roofline(example: torch.Tensor, rounds: int = 20, warm: bool = False) -> float:
    """Bytes per second of copying a batch of `example`'s size (the best of `rounds`), from one of 4 batches in turn
    (so that the source, like a gather's, is not in the cache from the last round) into a fresh tensor; warm: into
    one tensor allocated and touched before."""
    sources = [torch.randint_like(example, 0, 100) for _ in range(4)]
    best, into = float("inf"), torch.empty_like(example).copy_(example)
    for r in range(rounds):
        start = time.perf_counter()
        (into if warm else torch.empty_like(example)).copy_(sources[r % 4])
        best = min(best, time.perf_counter() - start)
    return example.numel() * example.element_size() / best


def loader(images: int, clips: int) -> dict:
    torch.set_num_threads(1)  # per core
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, shape, dtype, ragged, collate in (
                ("image 224x224x3 uint8", images, (3, 224, 224), np.uint8, False, REGISTRY["image"].collate),
                ("audio 10 s 16 kHz int16", clips, (160000,), np.int16, True, REGISTRY["audio"].collate)):
            folder = Path(tmp) / name.split()[0]
            files = write_split(folder, "train", n, shape, dtype, 256, ragged)
            (folder / "meta.json").write_text(json.dumps({"splits": {"train": files}}))
            split = ShardedSplit(folder, "train")
            reused, fresh = throughput(split, collate, 256, reuse=True), throughput(split, collate, 256, reuse=False)
            inputs, _ = collate(split.gather(torch.arange(256)))
            example = next(iter(inputs.values()))
            sample_bytes = example.numel() * example.element_size() / 256
            warm, cold = roofline(example, warm=True) / sample_bytes, roofline(example) / sample_bytes  # samples/s
            result[name] = {"samples_per_s": reused, "warm_copy_samples_per_s": warm, "share_of_warm_copy": reused / warm,
                            "x_h100_vit_b16_rate": reused / H100_IMG_S, "fresh_samples_per_s": fresh,
                            "fresh_copy_samples_per_s": cold, "fresh_share_of_fresh_copy": fresh / cold,
                            "batch_mb": example.numel() * example.element_size() / 2**20}
            print(json.dumps({name: result[name]}), flush=True)
    return result


def prepare(images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        rng = np.random.default_rng(0)
        for i in range(images):
            (root / str(i % 10)).mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).resize((384, 384), Image.BICUBIC)
            coarse.save(root / str(i % 10) / f"{i}.jpg", quality=90)
        files = sorted(root.rglob("*.jpg"))
        start = time.perf_counter()
        for f in files:  # the baseline: decode and resize, nothing else
            with Image.open(f) as im:
                np.asarray(im.convert("L").resize((32, 32), Image.BICUBIC))
        baseline = len(files) / (time.perf_counter() - start)
        params = {"model": {"image": {"img_size": 32, "patch_size": 4, "in_chans": 1}},
                  "prepare": {"root": str(root), "out": str(Path(tmp) / "prepared"), "metrics": str(Path(tmp) / "m.json"),
                              "sources": {"image": {"format": "imagefolder", "train": str(root)}}}}
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params))
        rss, seconds = peak_rss_mb([sys.executable, "-m", "tessera.core.entry.cli", "prepare", "-p", "params.yaml"],
                                   Path(tmp), dict(os.environ))
        shutil.rmtree(Path(tmp) / "prepared")
        inside = json.loads(subprocess.run([sys.executable, __file__, "_prepare", str(Path(tmp) / "params.yaml")],
                                           check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    result = {"images": images, "cores": os.cpu_count(), "baseline_img_s": baseline,
              "prepare_img_s": images / inside, "ratio": images / inside / baseline,
              "command_img_s": images / seconds, "command_ratio": images / seconds / baseline, "command_peak_rss_mb": rss,
              "note": "prepare: prepare_data() after its imports, in a process of its own (pass 1 hashes every file, "
                      "pass 2 decodes on every core and writes shards); command: `tessera prepare` as a whole, "
                      "start-up included"}
    print(json.dumps(result), flush=True)
    return result


def _prepare(params: str) -> None:
    from tessera.core.config import load_params
    from tessera.core.stages.prepare import prepare_data

    p = load_params(params)
    start = time.perf_counter()
    prepare_data(p)
    print(json.dumps(time.perf_counter() - start))


def main() -> None:
    if sys.argv[1] == "_rss":
        return _rss(*sys.argv[2:])
    if sys.argv[1] == "_prepare":
        return _prepare(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "loader", "prepare"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--old", type=Path, help="a checkout of the old layout (commit 15b3626) to compare with")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--clips", type=int, default=2048)
    args = parser.parse_args()
    if args.what == "memory":
        memory(args.sizes, args.old)
    elif args.what == "loader":
        loader(args.images or 2048, args.clips)
    else:
        prepare(args.images or 10_000)


if __name__ == "__main__":
    main()
