"""The multi-task model: one backbone shared by an adapter per modality, a head and a criterion per task; how it is
built from the prepared data for training, and loaded back from what training wrote."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tessera.core.config import ModelConfig
from tessera.core.errors import UserError
from tessera.core.nn.backbone import Encoder
from tessera.core.nn.heads import ContrastiveCriterion, weighted_loss
from tessera.core.nn.task_model import TaskModel
from tessera.core.nn.weights import read_state_dict
from tessera.modalities import REGISTRY, build_contrastive_head, build_criterion, build_head


class MultiTaskModel(nn.Module):
    """One backbone, an adapter per modality, a head and a criterion per task.

    forward(task, inputs, targets) -> dict of loss_* tensors, plus "loss": their weighted sum.
    `task_model(task)` is the plain adapter -> backbone -> head view of one task (evaluation, export), and
    `embedder(modality)` the same with the modality's alignment head.
    """

    def __init__(self, cfg: ModelConfig, classes: dict[str, list[str]], align: tuple[str, str] | None = None):
        super().__init__()
        self.cfg, self.classes, self.align = cfg, classes, align
        tasks = [t for t in classes if t != "align"]
        self.backbone = Encoder(cfg.backbone())
        self.adapters = nn.ModuleDict({m: REGISTRY[m].adapter(cfg) for m in sorted(set(tasks) | set(align or ()))})
        self.heads = nn.ModuleDict({t: build_head(t, cfg, len(classes[t])) for t in tasks})
        self.criteria = nn.ModuleDict({t: build_criterion(t, cfg, len(classes[t])) for t in tasks})
        if align:
            for m in align:
                self.heads[f"align_{m}"] = build_contrastive_head(cfg)
            self.criteria["align"] = ContrastiveCriterion()

    def task_model(self, task: str) -> TaskModel:
        return TaskModel(self.adapters[task], self.backbone, self.heads[task])

    def embedder(self, modality: str) -> TaskModel:
        return TaskModel(self.adapters[modality], self.backbone, self.heads[f"align_{modality}"])

    def embed(self, modality: str, inputs: dict) -> torch.Tensor:
        """Unit-norm alignment embeddings [B, proj_dim] of one modality's inputs."""
        return self.embedder(modality)(**inputs)["pred_embed"]

    def forward(self, task: str, inputs: dict, targets) -> dict:
        if task == "align":
            a, b = self.align
            ea, eb = self.embed(a, inputs[a]), self.embed(b, inputs[b])
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                # every rank sees every rank's pairs as negatives, as CLIP does; gradients flow back through the gather
                from torch.distributed.nn.functional import all_gather

                ea, eb = torch.cat(all_gather(ea)), torch.cat(all_gather(eb))
            losses = self.criteria["align"](ea, eb)
        else:
            losses = self.criteria[task](self.task_model(task)(**inputs), targets)
        losses["loss"] = weighted_loss(losses, self.criteria[task].weight_dict)
        return losses


def build_model(cfg: ModelConfig, prepared: Path, tasks: list[str], align: tuple[str, str] | None) -> MultiTaskModel:
    """A fresh model for the prepared data: each modality's data facts (vocabulary, statistics, columns) and each
    task's target statistics (regression) filled into the config, the class lists (a regression's target names)
    from meta.json, starting weights where the config names them."""
    cfg = cfg.model_copy(deep=True)
    metas = {m: json.loads((prepared / m / "meta.json").read_text()) for m in dict.fromkeys([*tasks, *(align or ())])}
    for m, meta in metas.items():
        if REGISTRY[m].from_data:
            REGISTRY[m].from_data(cfg, prepared / m, meta)
    classes = {t: metas[t]["classes"] for t in tasks}
    cfg.targets = {t: metas[t]["target_stats"] for t in tasks if metas[t].get("target_stats")}
    if align:
        classes["align"] = metas[align[0]]["classes"]
    model = MultiTaskModel(cfg, classes, align)
    for t in tasks:  # the task, and so the shared backbone, start there
        if REGISTRY[t].pretrained:
            REGISTRY[t].pretrained(model.task_model(t), cfg)
    return model


def model_card(model: MultiTaskModel) -> dict:
    """What evaluation, export and prediction need to rebuild the model from its weights."""
    return {"model": model.cfg.model_dump(), "classes": model.classes, "align": list(model.align or [])}


def load_trained(folder: str | Path) -> MultiTaskModel:
    """The model `tessera train` wrote to `folder` (model.json + model.safetensors), in eval mode on the CPU."""
    folder = Path(folder)
    if not (folder / "model.json").is_file():
        raise UserError(f"{folder}/model.json: no trained model there; run `tessera train` first")
    card = json.loads((folder / "model.json").read_text())
    model = MultiTaskModel(ModelConfig.model_validate(card["model"]), card["classes"], tuple(card["align"]) or None)
    model.load_state_dict(read_state_dict(folder / "model.safetensors"))
    return model.eval()
