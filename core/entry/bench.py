"""`tessera bench`: our ViT (image adapter + shared backbone + head) against timm's ViT of the same size,
measured side by side in one process on one device, on synthetic inputs.

Train step = forward + backward + AdamW step. MFU = FLOPs per second / peak, where the model's FLOPs are counted
by torch's FLOP counter (training = 3 x forward) and the peak is a large matrix product measured in the same run
(fp32 on CPU, bf16 on GPU). Figures are ratios against the reference, never absolute claims.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tessera.core.entry.flops import forward_flops
from tessera.core.stages.export import load_deployable
from tessera.modalities.image import timm_twin  # the benchmark's reference: timm's ViT


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matrix product on random data (the best of `repeats`)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def models(size: str, img_size: int, patch: int, device: torch.device) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """name -> (model, forward(images) -> logits). Both start from the same weights (ours loads timm's)."""
    ours, ref = timm_twin(size, img_size, patch, 1000)
    ours, ref = ours.to(device), ref.to(device)
    return {"tessera": (ours, lambda x: ours(images=x)["pred_logits"]), "timm": (ref, ref)}


def _steps(model, forward, images, labels, bf16: bool, dev) -> dict[str, Callable[[], None]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")

    def train():
        model.train()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer():
        model.eval()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            forward(images)

    return {"train": train, "infer": infer}


def bench(size: str = "tiny", img_size: int = 224, patch: int = 16, batch: int = 8, steps: int = 10, warmup: int = 3,
          compile: bool = False, device: str | None = None, rounds: int = 3) -> list[dict]:
    """Peak memory, on GPU, is the largest of the whole run (both models), not per model."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = dev.type == "cuda"
    peak = matmul_peak(dev, torch.bfloat16 if bf16 else torch.float32, 8192 if bf16 else 2048)
    images = torch.randn(batch, 3, img_size, img_size, device=dev)
    labels = torch.randint(0, 1000, (batch,), device=dev)
    steps_fns, flops, times = {}, {}, {}
    for name, (model, forward) in models(size, img_size, patch, dev).items():
        flops[name] = forward_flops(model, {"images" if name == "tessera" else "x": images[:1]})  # per image
        steps_fns[name] = _steps(model, torch.compile(forward) if compile else forward, images, labels, bf16, dev)
        times[name] = {"train": [], "infer": []}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(rounds):  # alternate the models, so that neither always runs on a colder or hotter machine
        for name, fns in steps_fns.items():
            for kind, fn in fns.items():
                times[name][kind].append(time_it(fn, dev, steps, warmup))
    rows = []
    for name in steps_fns:
        t_train, t_infer = (sorted(times[name][k])[rounds // 2] for k in ("train", "infer"))
        rows.append({"model": name, "gflops": flops[name] / 1e9, "train_img_s": batch / t_train, "infer_img_s": batch / t_infer,
                     "train_mfu": 3 * flops[name] * batch / t_train / peak, "infer_mfu": flops[name] * batch / t_infer / peak,
                     "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None})
    ref = rows[-1]
    for r in rows:
        r["train_ratio"], r["infer_ratio"] = r["train_img_s"] / ref["train_img_s"], r["infer_img_s"] / ref["infer_img_s"]
    return [{"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x {torch.get_num_threads()} threads",
             "peak_tflops": peak / 1e12, "size": size, "batch": batch, "img_size": img_size, **r} for r in rows]



def bench_export(folder: str, batches: tuple[int, ...] = (1, 16), steps: int = 20, warmup: int = 3) -> list[dict]:
    """ONNX Runtime against eager PyTorch (the same task rebuilt from model.safetensors), on the CPU, per exported
    task and batch size, alternating the two. Both use every core (torch's and ORT's default thread pools)."""
    import onnxruntime as ort  # late: `tessera bench` alone does not need it

    dev = torch.device("cpu")
    rows = []
    for task in sorted(p for p in Path(folder).iterdir() if (p / "config.json").is_file()):
        config = json.loads((task / "config.json").read_text())
        eager = load_deployable(task)
        session = ort.InferenceSession(str(task / "model.onnx"), providers=["CPUExecutionProvider"])
        for batch in batches:
            args = eager.example(batch)
            feed = {i["name"]: a.numpy() for i, a in zip(config["inputs"], args)}
            fns = {"eager": torch.no_grad()(lambda: eager(*args)), "onnxruntime": lambda: session.run(None, feed)}
            times = {k: [] for k in fns}
            for _ in range(3):
                for k, fn in fns.items():
                    times[k].append(time_it(fn, dev, steps, warmup))
            t = {k: sorted(v)[1] for k, v in times.items()}
            rows.append({"task": task.name, "batch": batch, "eager_ms": t["eager"] * 1e3, "ort_ms": t["onnxruntime"] * 1e3,
                         "speedup": t["eager"] / t["onnxruntime"]})
    return rows
