"""Task heads on backbone states, and their criteria.

A head maps token states [B, L, D] (and the padding mask [B, L]) to a dict of `pred_*` tensors. A criterion maps
those outputs and the targets to a dict of `loss_*` scalars; `weight_dict` says how they add up, so the weights
live in one place.

The contrastive head and loss follow CLIP (Radford et al., 2021, arXiv:2103.00020): L2-normalised projections,
symmetric InfoNCE, a learnable temperature stored as log(1 / 0.07) and clamped at a logit scale of 100.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pool(x: torch.Tensor, pad_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """[B, L, D] -> [B, D]: the [CLS] token (position 0, where every adapter puts it), or the mean over the
    unpadded tokens after it. As timm's `global_pool="avg"`, the mean leaves [CLS] out: it is a summary the
    model learns, not a piece of the input."""
    if mode == "cls":
        return x[:, 0]
    if mode == "mean":
        x = x[:, 1:]
        if pad_mask is None:
            return x.mean(dim=1)
        keep = (~pad_mask[:, 1:]).unsqueeze(-1).to(x.dtype)  # [B, L - 1, 1]
        return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {mode!r}")


class LinearHead(nn.Module):
    """Pooled states -> `num_outputs` class logits.

    forward(x [B, L, D], pad_mask [B, L]) -> {"pred_logits": [B, num_outputs]}; with pre_logits=True,
    {"pred_features": [B, D]}, the pooled features before the final layer.
    """

    def __init__(self, embed_dim: int, num_outputs: int, pool: str, drop: float):
        super().__init__()
        self.pool = pool
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(embed_dim, num_outputs)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, pre_logits: bool = False) -> dict:
        feats = pool(x, pad_mask, self.pool)
        if pre_logits:
            return {"pred_features": feats}
        return {"pred_logits": self.fc(self.drop(feats))}


class ContrastiveHead(nn.Module):
    """Pooled states -> unit-norm embedding for cross-modal alignment: {"pred_embed": [B, proj_dim]}."""

    def __init__(self, embed_dim: int, proj_dim: int, pool: str):
        super().__init__()
        self.pool = pool
        self.proj = nn.Linear(embed_dim, proj_dim, bias=False)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict:
        return {"pred_embed": F.normalize(self.proj(pool(x, pad_mask, self.pool)), dim=-1)}


class ClassificationCriterion(nn.Module):
    """{"pred_logits": [B, C]}, targets [B] class indices -> {"loss_ce"}."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.weight_dict = {"loss_ce": 1.0}

    def forward(self, outputs: dict, targets: torch.Tensor) -> dict:
        return {"loss_ce": F.cross_entropy(outputs["pred_logits"], targets, label_smoothing=self.label_smoothing)}


MAX_LOGIT_SCALE = 100.0


class ContrastiveCriterion(nn.Module):
    """Symmetric InfoNCE between two batches of unit embeddings whose row i is a positive pair.

    forward(a [B, P], b [B, P]) -> {"loss_contrastive"}: the mean of cross-entropy over a->b and b->a
    similarities scaled by exp(logit_scale). The scale is learnt; it starts at 1 / 0.07.
    """

    def __init__(self, init_temperature: float = 0.07):
        super().__init__()
        # shape [1], not a scalar: FSDP2 shards parameters along a dimension and refuses 0-d ones
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / init_temperature)]))
        self.weight_dict = {"loss_contrastive": 1.0}

    def scale(self) -> torch.Tensor:
        # Clamped in the forward pass (CLIP clamps the stored value after each step): same effect, no hook.
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict:
        logits = self.scale() * a @ b.T  # [B, B]
        target = torch.arange(len(a), device=a.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return {"loss_contrastive": loss}


def weighted_loss(losses: dict, weight_dict: dict) -> torch.Tensor:
    """The training objective: sum of weight * loss over the keys the weights name."""
    return sum(weight_dict[k] * v for k, v in losses.items() if k in weight_dict)
