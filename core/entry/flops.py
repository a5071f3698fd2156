"""Counting what a model costs: parameters, tokens per sample and forward FLOPs (torch's own FLOP counter).

Training MFU = 3 x forward FLOPs x samples/s / peak FLOP/s (backward ~ 2 x forward); the benchmarks use this.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tessera.core.config import ModelConfig
from tessera.modalities import REGISTRY, build_task_model, task_kind


def forward_flops(model: torch.nn.Module, inputs: dict) -> int:
    """FLOPs of one forward pass on `inputs`, attention included."""
    # Grad stays enabled: the counter's module tracker fails on tensors made under no_grad. SDPA's math backend:
    # the counter has no formula for the fused CPU kernel and would count attention as 0 (torch 2.11); the math
    # backend's two matmuls are the FLOPs every kernel does.
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def describe_tasks(cfg: ModelConfig, num_classes: int = 10) -> list[dict]:
    """Each modality's own task at the configured size, on its example input (one sample)."""
    rows = []
    for name, modality in REGISTRY.items():
        model = build_task_model(name, cfg, num_classes).eval()
        example = modality.example(cfg, 1)
        if not example:  # a table's columns come from its data: none configured, nothing to count
            continue
        inputs = modality.from_inputs(cfg, example)
        with torch.no_grad():
            tokens, _ = model.adapter(**inputs)
        rows.append({
            "task": f"{name}/{task_kind(name, cfg).name}",
            "input": " x ".join(str(s) for s in example[0].shape[1:]),
            "tokens": tokens.shape[1],
            "params": sum(p.numel() for p in model.parameters()),
            "gflops": forward_flops(model, inputs) / 1e9,
        })
    return rows
