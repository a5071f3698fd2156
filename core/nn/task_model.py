"""A task model: modality adapter -> shared backbone -> head.

Several task models hold the same `Encoder` instance, which is how one backbone serves every modality:
its parameters appear once in a module that contains them all.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.core.nn.backbone import Encoder


class TaskModel(nn.Module):
    """forward(**inputs) -> head outputs (a dict of pred_* tensors).

    The adapter turns raw inputs into (tokens [B, L, D], pad_mask [B, L] or None); the backbone turns tokens
    into states [B, L, D]; the head turns states into predictions.
    """

    def __init__(self, adapter: nn.Module, backbone: Encoder, head: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.backbone = backbone
        self.head = head

    def forward_features(self, **inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens, pad_mask = self.adapter(**inputs)
        return self.backbone(tokens, pad_mask), pad_mask

    def forward(self, **inputs) -> dict:
        states, pad_mask = self.forward_features(**inputs)
        return self.head(states, pad_mask)
