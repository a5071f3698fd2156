"""What an explanation costs: explaining one input (grad and rollout) against one forward pass of the same eager
task model, on the CPU, per exported task, for an input of the exported example size: the median of 30 calls
after 5 warm-up ones, each kind measured in turn.

    python benchmarks/explain_cost.py [--export models/export]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tessera.core.stages.explanations import relevance
from tessera.core.stages.export import CONTRASTIVE, load_deployable
from tessera.modalities.draw import DRAWINGS


def median_seconds(fn, calls: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("models/export"))
    args = parser.parse_args()
    for folder in sorted(p for p in args.export.iterdir() if (p / "config.json").is_file()):
        config = json.loads((folder / "config.json").read_text())
        if config["head"] == CONTRASTIVE:
            continue
        deployable = load_deployable(folder)
        net, spec = deployable.net, deployable.spec
        inputs = spec.from_inputs(deployable.cfg, spec.example(deployable.cfg, 1))
        forward = torch.no_grad()(lambda: net(**inputs))
        times = {"forward": median_seconds(forward)}
        for method in ("grad", "rollout"):
            times[method] = median_seconds(lambda m=method: relevance(net, DRAWINGS[deployable.modality], inputs, m))
        print(json.dumps({"task": folder.name, **{f"{k}_ms": v * 1e3 for k, v in times.items()},
                          "grad_x_forward": times["grad"] / times["forward"],
                          "rollout_x_forward": times["rollout"] / times["forward"]}), flush=True)


if __name__ == "__main__":
    main()
