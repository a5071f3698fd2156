"""Weights files: safetensors, or torch checkpoints read with weights_only=True. Never a bare pickle."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tessera.core.errors import UserError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a .safetensors file or a torch checkpoint of tensors only.

    A torch checkpoint that wraps its weights under "model" or "state_dict" (timm's and many trainers' habit)
    is unwrapped. A file that would run code when unpickled is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only raises UnpicklingError for code; other errors for truncation
        raise UserError(
            f"{path}: refused: not a weights-only torch checkpoint ({type(e).__name__}). "
            "Save it with safetensors (safetensors.torch.save_file) or as a plain state dict."
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of tensors (a state dict)")
    return obj
