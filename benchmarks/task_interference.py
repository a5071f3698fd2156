"""Why joint training costs detection: per-task gradients on the shared backbone of a trained model.

    python benchmarks/task_interference.py models/train data/prepared

Prints, for each task, the norm of its gradient on the backbone and on the whole model (the mean over 8 training
batches; training clips each step's gradient at `train.grad_clip`), the cosine between tasks' backbone gradients
(negative: the tasks pull the shared trunk apart), and one detection step from the same state with loss weight 1
and 2: with the gradient above the clip norm, the weights after the step are the same, so loss weights cannot
rebalance tasks that train one per step.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from tessera.core.runtime.distributed import Dist
from tessera.core.data.batching import to_device
from tessera.core.tasks.datasets import collate_task, load_task_data
from tessera.core.tasks.multitask import load_trained
from tessera.core.stages.train import TaskStream, param_groups


def main(folder: str, prepared: str, batches: int = 8) -> None:
    torch.manual_seed(0)
    model = load_trained(folder).train()
    tasks = [t for t in model.classes if t not in model.pairs]
    data = load_task_data(Path(prepared), tasks, {t: tuple(s["input"] for s in p) for t, p in model.pairs.items()}, 0)
    names = list(data)
    cpu = Dist(0, 1, 0, torch.device("cpu"))
    streams = {t: TaskStream(data[t], i, 64, cpu, 0, lambda s, t=t: collate_task(t, model.sides(t), s, model.inputs(t)), 0)
               for i, t in enumerate(names)}
    grads = {}
    for t in names:
        backbone, whole = 0.0, 0.0
        for _ in range(batches):
            inputs, targets = to_device(streams[t].next(), cpu.device)
            model.zero_grad()
            model(t, inputs, targets)["loss"].backward()
            backbone = backbone + torch.cat([p.grad.flatten() for p in model.backbone.parameters()])
            whole += torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item()
        grads[t] = backbone / batches
        print(f"{t:10s} gradient norm: backbone {grads[t].norm():.3f}, whole model {whole / batches:.3f}")
    print("cosine between backbone gradients:")
    for a in names:
        print(f"  {a:10s} " + " ".join(f"{b} {torch.cosine_similarity(grads[a], grads[b], dim=0):+.3f}" for b in names))
    if "detection" in names:
        inputs, targets = to_device(streams["detection"].next(), cpu.device)
        after = []
        for weight in (1.0, 2.0):
            m = copy.deepcopy(model)
            torch.manual_seed(0)  # the same stochastic depth in both steps
            opt = torch.optim.AdamW(param_groups(m, 0.05), lr=1e-3)
            (m("detection", inputs, targets)["loss"] * weight).backward()
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            after.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
            print(f"detection step, loss weight {weight:g}: gradient norm {norm:.2f} before clipping at 1")
        print(f"largest difference of the weights after the two steps: {(after[0] - after[1]).abs().max():.1e}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
