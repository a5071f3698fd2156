"""How samples are stored and moved: uint8 pixels and int16 PCM on disk and on the way to the device (a quarter
and a half of float32's bytes), floats in the model."""

from __future__ import annotations

import numpy as np
import torch


def pixels_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..] -> float32 in [-1, 1]: the one normalisation every image model here is trained with."""
    return images.float() / 127.5 - 1.0


def pcm_to_float(pcm: torch.Tensor) -> torch.Tensor:
    """int16 samples -> float32 in [-1, 1): how prepared waveforms are stored, and how every model reads them."""
    return pcm.float() / 32768.0


def to_int16(wave: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 PCM; 16-bit sources round-trip exactly (x / 32768 * 32768 = x)."""
    return np.clip(np.round(wave * 32768), -32768, 32767).astype(np.int16)


def to_device(obj, device: torch.device):
    """Moves a batch to `device` (non-blocking from pinned memory); uint8 images become floats in [-1, 1],
    int16 waveforms floats in [-1, 1)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if obj.dtype == torch.uint8:
            return pixels_to_float(obj)
        if obj.dtype == torch.int16:
            return pcm_to_float(obj)
        return obj
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
