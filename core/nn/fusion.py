"""Fusion in the shared backbone: the inputs of one sample, each a modality's tokens, as one sequence.

Single-stream fusion as in ViLT (Kim et al., 2021, arXiv:2102.03334) and Meta-Transformer (Zhang et al., 2023,
arXiv:2307.10802): every input's adapter makes its tokens, a learnt embedding per input says whose they are, one
[CLS] leads the sequence, and the same encoder every other task trains attends over all of it. An input a sample
lacks contributes no tokens: they are masked as keys, so no other token (nor [CLS]) can see them, at training and
at inference alike. Modality dropout (Neverova et al., 2016, ModDrop) masks present inputs at random in training,
so the model learns to answer from whatever is present.

FusedAdapter is an adapter like any modality's (raw inputs -> tokens, pad_mask), so a fused task is the same
TaskModel (adapter -> backbone -> head) that evaluation, export and explanations already handle.
"""

from __future__ import annotations

import torch
from torch import nn


def drop_inputs(present: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Modality dropout: present [B, K] bool, p [K] drop probabilities -> present [B, K] with each input dropped with
    its probability, independently per sample, except that a sample keeps its inputs where dropping would leave it
    none (an input-less sample teaches nothing and has no answer)."""
    drop = torch.rand(present.shape, generator=generator, device=present.device) < p.to(present.device)
    kept = present & ~drop
    return torch.where(kept.any(dim=1, keepdim=True), kept, present)


class FusedAdapter(nn.Module):
    """The inputs of a fused task as one token sequence.

    forward(present [B, K] bool, **inputs) -> (tokens [B, 1 + sum_k L_k, D], pad_mask [B, 1 + sum_k L_k]).
    `inputs[name]` holds input k's adapter keyword inputs (a batch of B rows; rows of an absent input may hold
    anything of the right shape: they are masked). The K adapters are the task's own, each built from its input's
    data facts (a text column's own tokenizer), while the backbone after them is shared; each input's tokens, its
    own [CLS] included, get the input's embedding added. pad_mask is True where a token is padding or belongs to an
    absent input; position 0 is the fused [CLS], never masked.
    `dropout` [K]: each input's modality-dropout probability in training.
    """

    def __init__(self, adapters: dict[str, nn.Module], embed_dim: int, dropout: list[float] | None = None):
        super().__init__()
        self.names = list(adapters)
        self.adapters = nn.ModuleDict(adapters)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.input_embed = nn.Parameter(torch.zeros(len(adapters), embed_dim))  # [K, D]
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.trunc_normal_(self.input_embed, std=0.02)
        self.register_buffer("dropout", torch.tensor(dropout or [0.0] * len(adapters), dtype=torch.float32),
                             persistent=False)

    def forward(self, present: torch.Tensor, **inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and bool(self.dropout.any()):
            present = drop_inputs(present, self.dropout)
        B = present.shape[0]
        tokens, masks = [self.cls_token.expand(B, -1, -1)], [present.new_zeros(B, 1)]
        for k, name in enumerate(self.names):
            x, pad_mask = self.adapters[name](**inputs[name])  # [B, L_k, D], [B, L_k] or None
            tokens.append(x + self.input_embed[k])
            absent = ~present[:, k: k + 1]  # [B, 1]
            masks.append(absent.expand(B, x.shape[1]) if pad_mask is None else pad_mask | absent)
        return torch.cat(tokens, dim=1), torch.cat(masks, dim=1)
