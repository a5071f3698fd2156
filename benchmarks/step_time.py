"""Milliseconds per training step of each task (forward, backward, clip, AdamW), in-process, on prepared data.

    python benchmarks/step_time.py params.yaml 20

Run it against two commits (PYTHONPATH=<checkout>) alternately, with nothing else on the machine, to compare them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from tessera.core.config import load_params
from tessera.core.runtime.distributed import Dist
from tessera.core.data.batching import to_device
from tessera.core.tasks.datasets import load_task_data
from tessera.core.stages.train import build_streams
from tessera.core.tasks.multitask import build_model


def main(params_file: str, steps: int, warmup: int = 3) -> None:
    params = load_params(params_file)
    cfg = params.train
    torch.manual_seed(0)
    data = load_task_data(Path(params.prepare.out), list(cfg.tasks), params.pairs(), 0)
    model = build_model(params.model, Path(params.prepare.out), list(cfg.tasks), params.pairs()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    names = list(cfg.tasks) + list(params.pairs())
    cpu = Dist(0, 1, 0, torch.device("cpu"))
    ms = {}
    streams = build_streams(cfg.model_copy(update={"num_workers": 0}), names, data, model, cpu)
    for t, stream in streams.items():
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            inputs, targets = to_device(stream.next(), cpu.device)
            model(t, inputs, targets)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        ms[t] = (time.perf_counter() - start) / steps * 1000
    print(" ".join(f"{t} {v:.0f} ms" for t, v in ms.items()) + f"; mean {np.mean(list(ms.values())):.0f} ms")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
