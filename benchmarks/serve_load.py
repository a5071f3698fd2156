"""`tessera serve` under a bounded load on 127.0.0.1, with dynamic batching on and off, against ONNX Runtime's
offline throughput on the same inputs at the same batch size, measured in the same run.

    python benchmarks/serve_load.py [--export models/export] [--tasks image audio] [--concurrency 1 8 32 128]
                                    [--requests 600] [--max-batch 32] [--max-wait-ms 5]

For each task and each mode (batching on: serve.max_batch 32; off: serve.max_batch 1), a fresh `tessera serve`
process answers, for each concurrency N, a fixed number of requests from N concurrent clients (an aiohttp load
generator in a process of its own; each client posts the next of the task's test files as soon as its last answer
came), after a warm-up round. Reported: requests/s, p50 and p99 latency, failed requests, and the server's RSS
after the warm-up and at the end (from /proc). Offline: the task's Predictor (the reader and session `tessera
predict` and the service use) on the same files: session.run alone on pre-read batches of max_batch and of 1, and
read + batch + run, inputs/s. Each level also reports the server's mean inputs per ONNX Runtime call (/metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from tessera.core.data.files import expand
from tessera.core.entry.predict import Predictor


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _load(url: str, files: list[Path], concurrency: int, requests: int) -> dict:
    import aiohttp

    bodies = [(p.name, p.read_bytes()) for p in files]
    latencies, failures, sent = [], 0, 0

    async def client(session):
        nonlocal failures, sent
        while sent < requests:
            name, data = bodies[sent % len(bodies)]
            sent += 1
            form = aiohttp.FormData()
            form.add_field("file", data, filename=name)
            start = time.perf_counter()
            async with session.post(url, data=form) as response:
                await response.read()
                failures += response.status != 200
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {"requests": len(lat), "requests_per_s": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "failed": failures}


def load(url: str, files: list[Path], concurrency: int, requests: int) -> dict:
    """The load generator, in a process of its own (so it does not share the server's interpreter)."""
    code = ("import asyncio, json, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import serve_load as s; "
            f"print(json.dumps(asyncio.run(s._load({url!r}, [Path(p) for p in {[str(f) for f in files]!r}], {concurrency}, {requests}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def start(export: Path, port: int, serve: dict, tmp: Path) -> subprocess.Popen:
    params = tmp / f"serve-{port}.yaml"
    params.write_text(yaml.safe_dump({"serve": serve}))
    proc = subprocess.Popen([sys.executable, "-m", "tessera.core.entry.cli", "serve", str(export), "--port", str(port),
                             "-p", str(params)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not get ready")


def offline(folder: Path, files: list[Path], batch: int, rounds: int = 5) -> dict:
    """Inputs/s of the task's session alone on pre-read batches of `batch` and of 1 (their ratio is the most that
    batching can give: the model's own economy of scale), and of read + batch + run (best of `rounds`)."""
    p = Predictor(folder)
    items = [item for f in files for _, item, error in p.read(f) if not error]

    def session(size: int) -> float:
        feeds = [dict(zip(p.input_names, p.batch(items[a: a + size]))) for a in range(0, len(items) - size + 1, size)]
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for feed in feeds:
                p.session.run(None, feed)
            best = min(best, time.perf_counter() - start)
        return len(feeds) * size / best

    full_s = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for a in range(0, len(files), batch):
            got = [item for f in files[a: a + batch] for _, item, error in p.read(f) if not error]
            p.session.run(None, dict(zip(p.input_names, p.batch(got))))
        full_s = min(full_s, time.perf_counter() - start)
    return {"session_inputs_per_s": session(batch), "session_inputs_per_s_batch_1": session(1),
            "read_and_session_inputs_per_s": len(files) / full_s}


def batch_sizes(base: str, task: str) -> tuple[float, float]:
    """(ONNX Runtime calls, inputs) the server has made for `task` so far, from its /metrics."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return tuple(float(next(line.split()[-1] for line in text.splitlines()
                            if line.startswith(f'tessera_batch_size_{k}{{task="{task}"}}'))) for k in ("count", "sum"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("models/export"))
    parser.add_argument("--data", type=Path, default=Path("data/raw"), help="where the test files are (the default data)")
    parser.add_argument("--tasks", nargs="+", default=["image", "audio"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    inputs = {"image": args.data / "images/test", "audio": args.data / "audio/wav", "detection": args.data / "images/test"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            folder = args.export / task
            files = expand([inputs[task]], Predictor(folder).modality.suffixes)[:256]
            ref = offline(folder, files, args.max_batch)
            print(json.dumps({"task": task, "offline": ref}), flush=True)
            for mode, max_batch in (("batching", args.max_batch), ("one at a time", 1)):
                port = 18000 + len(rows)
                proc = start(args.export, port, {"max_batch": max_batch, "max_wait_ms": args.max_wait_ms}, Path(tmp))
                url = f"http://127.0.0.1:{port}/predict/{task}"
                try:
                    load(url, files, 8, 200)  # warm-up
                    rss_warm = rss_mb(proc.pid)
                    for c in args.concurrency:
                        calls, n = batch_sizes(f"http://127.0.0.1:{port}", task)
                        r = load(url, files, c, args.requests if c > 1 else args.requests // 3)
                        calls_, n_ = batch_sizes(f"http://127.0.0.1:{port}", task)
                        row = {"task": task, "mode": mode, "concurrency": c, **r,
                               "inputs_per_call": (n_ - n) / (calls_ - calls),
                               "share_of_offline_session": r["requests_per_s"] / ref["session_inputs_per_s"],
                               "share_of_offline_read_and_session": r["requests_per_s"] / ref["read_and_session_inputs_per_s"]}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                    print(json.dumps({"task": task, "mode": mode, "rss_after_warmup_mb": rss_warm,
                                      "rss_end_mb": rss_mb(proc.pid)}), flush=True)
                finally:
                    proc.terminate()
                    proc.wait(30)


if __name__ == "__main__":
    main()
