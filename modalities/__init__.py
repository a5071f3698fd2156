"""Every modality Tessera knows, each declared in its package (modalities/<name>/__init__.py) as one `Modality`
(core/modality.py), and the builders that wire a task: adapter -> shared backbone -> head. This is what prepare and
training import; reading inputs to predict on (modalities/io.py) and drawing explanations (modalities/draw.py) are
registered apart, and nothing here imports them.

Every adapter keeps one contract: raw input -> (tokens [B, L, D], pad_mask [B, L] or None, True = padding).
A modality's own task is of the kind its declaration names (core/kinds/): the kind gives its head and criterion.
"""

from __future__ import annotations

from torch import nn

from tessera.core.config import ModelConfig
from tessera.core.kinds import KINDS
from tessera.core.kinds.kind import TaskKind
from tessera.core.modality import Modality
from tessera.core.nn.backbone import Encoder
from tessera.core.nn.task_model import TaskModel
from tessera.modalities import audio, detection, image, tabular, text

REGISTRY: dict[str, Modality] = {m.name: m for m in (image.MODALITY, audio.MODALITY, text.MODALITY,
                                                     detection.MODALITY, tabular.MODALITY)}


def task_kind(task: str, cfg: ModelConfig) -> TaskKind:
    """The kind of `task` under `cfg`: a modality's own task's kind, or for a fused task (a records source: any other
    name train.tasks may hold, core/config.py checks which) classification, since a record's target is its class."""
    return REGISTRY[task].kind(cfg) if task in REGISTRY else KINDS["classification"]


def build_head(modality: str, cfg: ModelConfig, num_outputs: int) -> nn.Module:
    """The head of `modality`'s own task, as its kind builds it."""
    return task_kind(modality, cfg).head(cfg, modality, num_outputs)


def build_criterion(modality: str, cfg: ModelConfig, num_outputs: int) -> nn.Module:
    """The criterion of `modality`'s own task, as its kind builds it."""
    return task_kind(modality, cfg).criterion(cfg, modality, num_outputs)


def build_task_model(modality: str, cfg: ModelConfig, num_outputs: int, backbone: Encoder | None = None,
                     contrastive: bool = False) -> TaskModel:
    """adapter + backbone + head (the modality's own, or a contrastive side's embedder's). Pass the same `backbone`
    to several calls to share it between tasks."""
    head = KINDS["contrastive"].head(cfg, modality, 0) if contrastive else build_head(modality, cfg, num_outputs)
    return TaskModel(REGISTRY[modality].adapter(cfg), backbone or Encoder(cfg.backbone()), head)
