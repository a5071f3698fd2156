"""Self-supervised pretraining of the adapters and the shared backbone: one masked-prediction objective for every
modality, on adapter tokens [B, L, D], so it never asks which modality made them.

data2vec 2.0 (Baevski et al., 2022, arXiv:2212.07525): a teacher, the exponential moving average (EMA) of the
student's adapters and backbone, encodes the whole input; its targets are the per-token average of its blocks'
outputs, each layer-normalised, normalised again. The student encodes only the visible tokens (MAE's asymmetric
design, He et al., 2021, arXiv:2111.06377: masked tokens are dropped, not replaced, so a step at mask ratio r costs
about (1 - r) of an encoder pass), and a light decoder puts a learnt mask token at every masked position and
predicts the teacher's targets there.

Why not MAE's reconstruction: on adapter tokens its target would be the adapter's own output, which the adapter is
free to make constant (the loss then falls to 0 and teaches nothing); reconstructing raw inputs instead needs a
target per modality (pixels, spectrogram patches, token ids, table cells). The teacher's normalised contextual
states are a target of the same shape for every modality, and the EMA keeps them from collapsing.

Both the student's and the teacher's adapters run in eval mode: a modality's training augmentation (an image's
random shift, SpecAugment, modality dropout) would give the two different token grids, and the teacher's targets
would no longer sit where the student's masked tokens are. Masking is the corruption.

Masks are per sample: sample i's masked tokens are drawn from its own seed (`sample_seeds`: run seed, epoch, the
sample's index), among its real tokens counted in order, so neither its batch-mates nor where the batch pads changes
them. Padding is never a target, and the first `keep` tokens (every adapter's [CLS]) are never masked.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.core.nn.backbone import BackboneConfig, Block, Encoder, init_weights


def sample_seeds(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """The mask seed of each sample: index [B] (its position in its split) -> [B] int64, a function of (seed, epoch,
    index) alone, so a sample gets a fresh mask each epoch and the same one in any batch."""
    return torch.tensor([int(np.random.SeedSequence([seed, epoch, int(i)]).generate_state(1, np.uint64)[0] >> 1)
                         for i in index.tolist()], dtype=torch.int64)


def sample_masks(seeds: torch.Tensor, pad_mask: torch.Tensor | None, L: int, ratio: float, keep: int = 1) -> torch.Tensor:
    """Which tokens the student does not see: seeds [B] int64, pad_mask [B, L] (True = padding) or None -> masked
    [B, L] bool, on the CPU. Sample b masks round(ratio * n) of its n real tokens after the first `keep`, at least one where
    n > 0, chosen by a permutation its seed draws over those n tokens in order."""
    B = seeds.shape[0]
    real = torch.ones(B, L, dtype=torch.bool) if pad_mask is None else ~pad_mask.cpu()
    real[:, :keep] = False
    masked = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        where = real[b].nonzero().squeeze(1)  # [n] the sample's candidate positions, in order
        n = len(where)
        k = min(n, max(1, round(ratio * n))) if n else 0
        chosen = np.random.default_rng(int(seeds[b])).permutation(n)[:k]
        masked[b, where[torch.from_numpy(chosen)]] = True
    return masked


def gather_visible(tokens: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The visible tokens of each sample, first in their order: tokens [B, L, D], visible [B, L] bool ->
    (x [B, V, D], pad [B, V] True past a sample's count, ids [B, V] their positions in L), V the largest count.
    `ids` are distinct per row (an argsort's prefix): a row's padded slots point at some of its hidden positions."""
    count = visible.sum(1)  # [B]
    V = int(count.max())
    ids = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)[:, :V]  # [B, V]
    x = tokens.gather(1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    pad = torch.arange(V, device=tokens.device)[None] >= count[:, None]
    return x, pad, ids


def sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sine-cosine embeddings (Vaswani et al., 2017) of positions [B, L] (float) -> [B, L, dim]."""
    freq = torch.exp(torch.arange(0, dim, 2, device=positions.device) * (-math.log(10000.0) / dim))  # [dim / 2]
    angle = positions.unsqueeze(-1) * freq  # [B, L, dim / 2]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)[..., :dim]


class MaskDecoder(nn.Module):
    """MAE's light decoder: the student's states at the visible positions, a learnt mask token at the hidden ones,
    each plus the sine-cosine embedding of its rank among the sample's real tokens (an absolute index would move
    with the batch's padding); `depth` pre-LN blocks; a linear map to the target width.

    forward(states [B, V, D], ids [B, V], vis_pad [B, V], visible [B, L], pad_mask [B, L] or None) -> [B, L, D]."""

    def __init__(self, cfg: BackboneConfig, depth: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, states, ids, vis_pad, visible, pad_mask):
        B, L = visible.shape
        D = states.shape[-1]
        placed = states.new_zeros(B, L, D).scatter(1, ids.unsqueeze(-1).expand(-1, -1, D),
                                                   states.masked_fill(vis_pad.unsqueeze(-1), 0.0))
        x = torch.where(visible.unsqueeze(-1), placed, self.mask_token.to(states.dtype).expand(B, L, D))
        real = torch.ones_like(visible) if pad_mask is None else ~pad_mask
        x = x + sincos((real.cumsum(1) - 1).clamp(min=0).to(states.dtype), D)
        for block in self.blocks:
            x = block(x, pad_mask)
        return self.head(self.norm(x))


def layer_targets(layers: list[torch.Tensor]) -> torch.Tensor:
    """data2vec's targets: block outputs [B, L, D] each -> [B, L, D], their average after a parameter-free layer
    norm of each, layer-normed again (so every position's target has mean 0 and variance 1 over D)."""
    D = layers[0].shape[-1]
    return F.layer_norm(torch.stack([F.layer_norm(y.float(), (D,)) for y in layers]).mean(0), (D,))


class MaskedPrediction(nn.Module):
    """The pretraining model: `student` (the adapters and the backbone that training starts from), its EMA
    `teacher` (no gradients, ever) and the decoder.

    forward(name, inputs, seeds [B]) -> {"loss_masked": mean squared error over the masked real tokens and D,
    "loss": the same, "masked": how many tokens it averaged}. `name`: the adapter (a modality, or a fused task);
    `inputs`: its keyword inputs; `seeds`: `sample_seeds` of the batch's samples.
    """

    def __init__(self, adapters: nn.ModuleDict, backbone: Encoder, mask_ratio: float, teacher_decay: float,
                 decoder_depth: int = 1, top_k: int | None = None, keep: int = 1):
        super().__init__()
        self.student = nn.ModuleDict({"adapters": adapters, "backbone": backbone})
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.decoder = MaskDecoder(backbone.cfg, decoder_depth)
        self.mask_ratio, self.teacher_decay, self.keep = mask_ratio, teacher_decay, keep
        self.top_k = top_k or backbone.cfg.depth
        self.train()  # the adapters and the teacher in eval mode from the start

    def train(self, mode: bool = True) -> MaskedPrediction:
        super().train(mode)
        self.student["adapters"].eval()  # no augmentation: the module docstring says why
        self.teacher.eval()
        return self

    @torch.no_grad()
    def targets(self, name: str, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's targets [B, L, D] on the whole input, and the adapter's pad_mask [B, L] or None."""
        x, pad_mask = self.teacher["adapters"][name](**inputs)
        layers = []
        for block in self.teacher["backbone"].blocks:
            x = block(x, pad_mask)
            layers.append(x)
        return layer_targets(layers[-self.top_k:]), pad_mask

    def forward(self, name: str, inputs: dict, seeds: torch.Tensor) -> dict:
        target, pad_mask = self.targets(name, inputs)
        tokens, _ = self.student["adapters"][name](**inputs)  # [B, L, D]
        B, L, _ = tokens.shape
        masked = sample_masks(seeds, pad_mask, L, self.mask_ratio, self.keep).to(tokens.device)
        visible = ~masked if pad_mask is None else ~masked & ~pad_mask
        x, vis_pad, ids = gather_visible(tokens, visible)
        states = self.student["backbone"](x, vis_pad)  # [B, V, D]: the encoder never sees a masked token
        pred = self.decoder(states, ids, vis_pad, visible, pad_mask)
        err = ((pred.float() - target) ** 2).mean(-1)  # [B, L]
        n = masked.sum()
        loss = (err * masked).sum() / n.clamp(min=1)
        return {"loss_masked": loss, "loss": loss, "masked": n}

    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, after each optimizer step."""
        for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            t.lerp_(s.detach(), 1.0 - self.teacher_decay)
        for t, s in zip(self.teacher.buffers(), self.student.buffers(), strict=True):
            t.copy_(s)
