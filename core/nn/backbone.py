"""The shared transformer: a pre-LayerNorm encoder, and the decoder that detection queries run through.

Blocks follow ViT (Dosovitskiy et al., 2021, arXiv:2010.11929): x + attn(LN(x)), then x + mlp(LN(x)).
The decoder block adds cross-attention to the encoder states, as in DETR (Carion et al., 2020,
arXiv:2005.12872), but pre-LN like the encoder.

The backbone knows nothing about modalities: token embeddings [B, L, D] and a padding mask [B, L]
(True = padded) in, token states [B, L, D] out. Parameter names follow timm's VisionTransformer
(blocks.i.norm1, blocks.i.attn.qkv, ...) so that its state dicts load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.core.nn import BackboneConfig  # defined without torch: the config imports it


class AttentionRecorder:
    """Within `with AttentionRecorder() as rec:`, every attention layer takes the plain path and appends
    (module, weights [B, H, Lq, Lk]) to rec.maps in call order, the weights still in the autograd graph (for the
    explanations, core/tasks/explain.py). The model itself is the one that trains and exports: nothing forks."""

    active: AttentionRecorder | None = None

    def __init__(self):
        self.maps: list[tuple[nn.Module, torch.Tensor]] = []

    def __enter__(self) -> AttentionRecorder:
        AttentionRecorder.active = self
        return self

    def __exit__(self, *exc) -> None:
        AttentionRecorder.active = None


def positive_score_gradient(weights: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Recorded attention weights A [B, H, Lq, Lk] and the gradient of an explained score y with respect to them
    -> mean over heads of relu(∂y/∂S) [B, Lq, Lk], S the pre-softmax scores: ∂y/∂S = A ⊙ (∂y/∂A - <A, ∂y/∂A>).
    Chefer et al.'s ∇A ⊙ A, made blind to the offset a row of attention (which sums to 1) leaves undetermined
    (core/tasks/explain.py has the measurements)."""
    weights, grad = weights.detach(), grad.detach()
    return (weights * (grad - (weights * grad).sum(-1, keepdim=True))).clamp(min=0).mean(1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pad_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    fused: bool = True,
    module: nn.Module | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v over heads.

    q: [B, H, Lq, Dh]; k, v: [B, H, Lk, Dh]; pad_mask: [B, Lk], True where the key is padding.
    Returns [B, H, Lq, Dh]. `fused` picks F.scaled_dot_product_attention (Flash / cuDNN / memory-efficient
    kernels on GPU); the plain path spells the definition out and is the reference it is tested against.
    Under an AttentionRecorder the plain path runs, and its weights are recorded against `module`.
    A sample whose every key is padding has nothing to attend to: both paths return zeros for it (a plain
    softmax over only -inf is NaN, and GPU kernels differ in what they return), so no NaN can spread.
    """
    if pad_mask is None:
        keep = None
    else:
        keep = ~pad_mask[:, None, None, :]  # [B, 1, 1, Lk], True = attend
        empty = ~keep.any(dim=-1, keepdim=True)  # [B, 1, 1, 1]: no key left to attend to
    recorder = AttentionRecorder.active
    if fused and recorder is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
    else:
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, Lq, Lk]
        if keep is not None:
            scores = scores.masked_fill(~keep | empty, float("-inf")).masked_fill(empty, 0.0)
        weights = F.dropout(scores.softmax(dim=-1), dropout_p)
        if recorder is not None:
            recorder.maps.append((module, weights))
        out = weights @ v
    return out if keep is None else out.masked_fill(empty, 0.0)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection. x: [B, L, D] -> [B, L, D]."""

    fused: bool = True  # class-wide switch; the tests flip it to compare against the plain path

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, L, Dh]
        x = attention(q, k, v, pad_mask, self.attn_drop if self.training else 0.0, self.fused, self)
        x = x.transpose(1, 2).reshape(B, L, D)
        return self.proj_drop(self.proj(x))


class CrossAttention(nn.Module):
    """Queries x [B, Lq, D] attend to memory [B, Lk, D] (padding mask [B, Lk]); returns [B, Lq, D]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, pad_mask: torch.Tensor | None = None,
                memory_pos: torch.Tensor | None = None) -> torch.Tensor:
        """memory_pos [1 or B, Lk, D]: positions added to the keys only, as DETR does (values stay content)."""
        B, Lq, D = x.shape
        Lk, H = memory.shape[1], self.num_heads
        q = self.q(x).reshape(B, Lq, H, D // H).transpose(1, 2)  # [B, H, Lq, Dh]
        kv = self.kv(memory)  # [B, Lk, 2D]
        if memory_pos is not None:  # W_k (memory + pos) = W_k memory + W_k pos
            kv = kv + F.pad(F.linear(memory_pos, self.kv.weight[:D]), (0, D))
        k, v = kv.reshape(B, Lk, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, Lk, Dh]
        x = attention(q, k, v, pad_mask, self.attn_drop if self.training else 0.0, Attention.fused, self)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, Lq, D)))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, [B, L, D] -> [B, L, D]."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016, arXiv:1603.09382): in training, a residual branch's output [B, ...] is
    zeroed for a whole sample with probability `drop_prob`, and the kept samples scaled by 1 / (1 - drop_prob) so
    that its expectation is unchanged; the identity in eval. timm's DropPath, draw for draw (the same `bernoulli_`
    on the same generator, so a run and its resume match timm's bit for bit); written here because importing timm
    costs every process that imports the config about 1.6 s of CPU (torchvision, torch._dynamo, sympy)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # [B, 1, ...]
        if keep_prob > 0.0:
            keep.div_(keep_prob)
        return x * keep

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def _drop_path(p: float) -> nn.Module:
    return DropPath(p) if p > 0 else nn.Identity()


class Block(nn.Module):
    """Pre-LN encoder block: [B, L, D] -> [B, L, D]."""

    def __init__(self, cfg: BackboneConfig, drop_path: float = 0.0):
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.attn = Attention(D, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio), cfg.drop_rate)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), pad_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: self-attention over queries [B, Q, D], cross-attention to memory [B, L, D], MLP."""

    def __init__(self, cfg: BackboneConfig, drop_path: float = 0.0):
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.self_attn = Attention(D, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.cross_attn = CrossAttention(D, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate)
        self.norm3 = nn.LayerNorm(D, eps=1e-6)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio), cfg.drop_rate)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, pad_mask: torch.Tensor | None = None,
                query_pos: torch.Tensor | None = None, memory_pos: torch.Tensor | None = None) -> torch.Tensor:
        """query_pos [1 or B, Q, D] joins the cross-attention queries, memory_pos [1 or B, L, D] its keys."""
        x = x + self.drop_path(self.self_attn(self.norm1(x)))
        q = self.norm2(x) if query_pos is None else self.norm2(x) + query_pos
        x = x + self.drop_path(self.cross_attn(q, memory, pad_mask, memory_pos))
        return x + self.drop_path(self.mlp(self.norm3(x)))


def init_weights(module: nn.Module) -> None:
    """timm's ViT init: truncated-normal(0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    """The shared backbone: `depth` pre-LN blocks and a final LayerNorm.

    forward(x [B, L, D], pad_mask [B, L] or None) -> [B, L, D]. Padded positions get outputs too (they attend
    to the real tokens) but never influence a real token.
    """

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, pad_mask)
        return self.norm(x)


class Decoder(nn.Module):
    """`depth` decoder blocks and the LayerNorm applied after each; the detection head runs them one at a time,
    because each block starts from the boxes the previous one predicted (iterative box refinement)."""

    def __init__(self, cfg: BackboneConfig, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.apply(init_weights)
