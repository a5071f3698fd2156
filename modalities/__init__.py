"""Modality adapters and the registry that wires adapter -> shared backbone -> head for each task.

Every adapter keeps one contract: raw input -> (tokens [B, L, D], pad_mask [B, L] or None, True = padding).
`TASKS` lists what can be built; the contract tests run over all of it.
"""

from __future__ import annotations

from torch import nn

from core.backbone import Encoder
from core.checkpoint import read_state_dict
from core.config import ModelConfig
from core.heads import ClassificationCriterion, ContrastiveHead, LinearHead, RegressionCriterion
from core.model import TaskModel
from modalities.audio import AudioAdapter
from modalities.detection import DetectionHead, HungarianMatcher, SetCriterion
from modalities.image import ImageAdapter, load_timm_vit
from modalities.text import TextAdapter

# (input kind, head kind). "detection" inputs are images, built from model.detection.
MODALITIES = ("image", "text", "audio", "detection")
HEADS = ("classification", "regression", "contrastive", "detection")
TASKS = [(m, "classification") for m in ("image", "text", "audio")] + [("detection", "detection")]


def build_adapter(modality: str, cfg: ModelConfig) -> nn.Module:
    D, drop = cfg.backbone().embed_dim, cfg.drop_rate
    if modality in ("image", "detection"):
        c = cfg.image if modality == "image" else cfg.detection
        return ImageAdapter(D, c.img_size, c.patch_size, c.in_chans, drop, c.augment)
    if modality == "text":
        return TextAdapter(cfg.text.vocab_size, D, cfg.text.max_len, drop)
    if modality == "audio":
        a = cfg.audio
        # log-mel statistics start at (0, 1); training copies in the prepared training set's (core/train.py)
        return AudioAdapter(D, a.sample_rate, a.n_mels, a.n_fft, a.hop_length, a.patch_size, a.max_frames,
                            a.freq_mask, a.time_mask, drop_rate=drop)
    raise ValueError(f"unknown modality {modality!r}; known: {MODALITIES}")


def build_head(head: str, cfg: ModelConfig, num_outputs: int) -> nn.Module:
    b = cfg.backbone()
    if head in ("classification", "regression"):
        return LinearHead(b.embed_dim, num_outputs, cfg.pool, cfg.drop_rate)
    if head == "contrastive":
        return ContrastiveHead(b.embed_dim, cfg.proj_dim, cfg.pool)
    if head == "detection":
        return DetectionHead(b, num_outputs, cfg.detection.num_queries, cfg.detection.decoder_depth)
    raise ValueError(f"unknown head {head!r}; known: {HEADS}")


def build_criterion(head: str, cfg: ModelConfig, num_outputs: int) -> nn.Module:
    """Contrastive criteria pair two models' outputs, so `core.heads.ContrastiveCriterion` is built by the caller."""
    if head == "classification":
        return ClassificationCriterion()
    if head == "regression":
        return RegressionCriterion()
    if head == "detection":
        d = cfg.detection
        matcher = HungarianMatcher(d.cost_class, d.cost_bbox, d.cost_giou)
        return SetCriterion(num_outputs, matcher, d.eos_coef, d.loss_ce, d.loss_bbox, d.loss_giou, d.decoder_depth - 1)
    raise ValueError(f"no single-model criterion for head {head!r}")


def build_task_model(modality: str, head: str, cfg: ModelConfig, num_outputs: int,
                     backbone: Encoder | None = None) -> TaskModel:
    """adapter + backbone + head. Pass the same `backbone` to several calls to share it between tasks.

    An image classifier starts from `model.image.timm_checkpoint` when one is set.
    """
    model = TaskModel(build_adapter(modality, cfg), backbone or Encoder(cfg.backbone()),
                      build_head(head, cfg, num_outputs))
    if modality == "image" and cfg.image.timm_checkpoint:
        load_timm_vit(model, read_state_dict(cfg.image.timm_checkpoint), cfg.image.timm_checkpoint)
    return model
