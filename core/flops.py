"""Counting what a model costs: parameters, tokens per sample and forward FLOPs (torch's own FLOP counter).

Training MFU = 3 x forward FLOPs x samples/s / peak FLOP/s (backward ~ 2 x forward); the benchmarks use this.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.config import ModelConfig


def example_inputs(modality: str, cfg: ModelConfig, batch_size: int = 1) -> dict:
    """Inputs of the configured size for one modality (random values: only the shapes matter)."""
    if modality in ("image", "detection"):
        c = cfg.image if modality == "image" else cfg.detection
        return {"images": torch.randn(batch_size, c.in_chans, c.img_size, c.img_size)}
    if modality == "text":
        return {"input_ids": torch.randint(0, cfg.text.vocab_size, (batch_size, cfg.text.max_len))}
    if modality == "audio":
        # a clip as long as max_frames: (frames - 1) hops
        return {"waveform": torch.randn(batch_size, (cfg.audio.max_frames - 1) * cfg.audio.hop_length) * 0.1}
    raise ValueError(modality)


def forward_flops(model: torch.nn.Module, inputs: dict) -> int:
    # Grad stays enabled: the counter's module tracker fails on tensors made under no_grad.
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def describe_tasks(cfg: ModelConfig, num_classes: int = 10) -> list[dict]:
    from modalities import TASKS, build_task_model

    rows = []
    for modality, head in TASKS:
        model = build_task_model(modality, head, cfg, num_classes).eval()
        inputs = example_inputs(modality, cfg)
        with torch.no_grad():
            tokens, _ = model.adapter(**inputs)
        rows.append({
            "task": f"{modality}/{head}",
            "input": " x ".join(str(s) for s in next(iter(inputs.values())).shape[1:]),
            "tokens": tokens.shape[1],
            "params": sum(p.numel() for p in model.parameters()),
            "gflops": forward_flops(model, inputs) / 1e9,
        })
    return rows
