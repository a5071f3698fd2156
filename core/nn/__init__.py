"""Building blocks with no I/O: the shared backbone, heads, TaskModel."""

from __future__ import annotations

from dataclasses import dataclass


# Here, not in backbone.py beside the encoder it configures: core/config.py imports it, and `tessera --help`,
# `tessera params` and every process that reads params.yaml would otherwise import torch (~1.3 s of CPU) for it.
@dataclass(frozen=True)
class BackboneConfig:
    """Encoder hyper-parameters; `ModelConfig.backbone()` fills them from params.yaml (`model.*`), where the
    defaults live. Field names are timm's."""

    embed_dim: int  # D, the token width
    depth: int  # number of encoder blocks
    num_heads: int  # D must divide by it
    mlp_ratio: float  # MLP hidden width = mlp_ratio * D
    qkv_bias: bool
    drop_rate: float  # dropout after attention and MLP projections
    attn_drop_rate: float  # dropout on attention probabilities
    drop_path_rate: float  # stochastic depth, rising linearly to this value at the last block
