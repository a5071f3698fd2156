"""The multi-task model: one backbone shared by an adapter per modality, a head and a criterion per task; how it is
built from the prepared data for training, and loaded back from what training wrote.

A fused task (a records source in train.tasks) has one FusedAdapter (core/nn/fusion.py) over an adapter per input
of the record, each built from its own data facts (a text column's own tokenizer, the table's own columns): each
input's model config is the run's with that input's prepared folder applied (`Modality.from_data`). Those facts are
learnt from the data, so they live in the model card (`fused`), never in params.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tessera.core.config import RECORDS, ModelConfig
from tessera.core.errors import UserError
from tessera.core.nn.backbone import Encoder
from tessera.core.nn.fusion import FusedAdapter
from tessera.core.nn.heads import ContrastiveCriterion, weighted_loss
from tessera.core.nn.task_model import TaskModel
from tessera.core.nn.weights import read_state_dict
from tessera.modalities import REGISTRY, build_contrastive_head, build_criterion, build_head


class MultiTaskModel(nn.Module):
    """One backbone, an adapter per modality, a head and a criterion per task.

    forward(task, inputs, targets) -> dict of loss_* tensors, plus "loss": their weighted sum.
    `task_model(task)` is the plain adapter -> backbone -> head view of one task (evaluation, export), and
    `embedder(modality)` the same with the modality's alignment head.

    `fused`: each fused task's inputs in order, [{"name": input, "modality": m, "config": the input's section of the
    model config, model.<m>, with its data facts}]; its adapter (`adapters[task]`) is a FusedAdapter over them.
    `dropout`: fused task -> input -> modality-dropout probability in training (train.modality_dropout).
    """

    def __init__(self, cfg: ModelConfig, classes: dict[str, list[str]], align: tuple[str, str] | None = None,
                 fused: dict[str, list[dict]] | None = None, dropout: dict[str, dict[str, float]] | None = None):
        super().__init__()
        self.cfg, self.classes, self.align, self.fused = cfg, classes, align, fused or {}
        tasks = [t for t in classes if t != "align"]
        self.backbone = Encoder(cfg.backbone())
        own = sorted((set(tasks) - set(self.fused)) | set(align or ()))
        self.adapters = nn.ModuleDict({m: REGISTRY[m].adapter(cfg) for m in own})
        for t, inputs in self.fused.items():
            p = (dropout or {}).get(t, {})
            per_input = {i["name"]: REGISTRY[i["modality"]].adapter(input_config(cfg, i)) for i in inputs}
            self.adapters[t] = FusedAdapter(per_input, cfg.backbone().embed_dim, [p.get(i["name"], 0.0) for i in inputs])
        self.heads = nn.ModuleDict({t: build_head(t, cfg, len(classes[t])) for t in tasks})
        self.criteria = nn.ModuleDict({t: build_criterion(t, cfg, len(classes[t])) for t in tasks})
        if align:
            for m in align:
                self.heads[f"align_{m}"] = build_contrastive_head(cfg)
            self.criteria["align"] = ContrastiveCriterion()

    def inputs(self, task: str) -> dict[str, str] | None:
        """A fused task's inputs, name -> modality, in order; None for a modality's own task."""
        return {i["name"]: i["modality"] for i in self.fused[task]} if task in self.fused else None

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


def input_config(cfg: ModelConfig, inp: dict) -> ModelConfig:
    """The model config one input of a fused task builds its adapter from: `cfg` with the input's own section."""
    m = inp["modality"]
    return cfg.model_copy(update={m: type(getattr(cfg, m)).model_validate(inp["config"])})


def fused_inputs(cfg: ModelConfig, folder: Path, meta: dict) -> list[dict]:
    """The inputs of the records prepared in `folder` (meta.json `meta`), each with its section of `cfg` filled
    from its own prepared folder (its tokenizer's vocabulary, its statistics, its columns)."""
    inputs = []
    for i in meta["inputs"]:
        m, own = i["modality"], cfg.model_copy(deep=True)
        if REGISTRY[m].from_data:
            REGISTRY[m].from_data(own, folder / i["name"], json.loads((folder / i["name"] / "meta.json").read_text()))
        inputs.append({"name": i["name"], "modality": m, "config": getattr(own, m).model_dump()})
    return inputs


def check_dropout(dropout: dict[str, dict[str, float]], fused: dict[str, list[dict]]) -> None:
    for t, p in dropout.items():
        names = [i["name"] for i in fused.get(t, [])]
        unknown = sorted(set(p) - set(names))
        if unknown:
            raise UserError(f"params.yaml: train.modality_dropout.{t} names {unknown}, which are not inputs of {t}; "
                            f"its inputs are {names} (a column, or `table` for the numeric and categorical ones)")


def build_model(cfg: ModelConfig, prepared: Path, tasks: list[str], align: tuple[str, str] | None,
                dropout: dict[str, dict[str, float]] | None = None) -> MultiTaskModel:
    """A fresh model for the prepared data: each modality's data facts (vocabulary, statistics, columns) and each
    task's target statistics (regression) filled into the config, each fused task's inputs with their own facts,
    the class lists (a regression's target names) from meta.json, starting weights where the config names them.
    `dropout`: train.modality_dropout."""
    cfg = cfg.model_copy(deep=True)
    metas = {m: json.loads((prepared / m / "meta.json").read_text()) for m in dict.fromkeys([*tasks, *(align or ())])}
    fused = {t: fused_inputs(cfg, prepared / t, meta) for t, meta in metas.items() if meta.get("format") == RECORDS}
    for m, meta in metas.items():
        if m not in fused and REGISTRY[m].from_data:
            REGISTRY[m].from_data(cfg, prepared / m, meta)
    check_dropout(dropout or {}, fused)
    classes = {t: metas[t]["classes"] for t in tasks}
    cfg.targets = {t: metas[t]["target_stats"] for t in tasks if metas[t].get("target_stats")}
    if align:
        classes["align"] = metas[align[0]]["classes"]
    model = MultiTaskModel(cfg, classes, align, fused, dropout)
    for t in tasks:  # the task, and so the shared backbone, start there
        if t not in fused and REGISTRY[t].pretrained:
            REGISTRY[t].pretrained(model.task_model(t), cfg)
    return model


def model_card(model: MultiTaskModel) -> dict:
    """What evaluation, export and prediction need to rebuild the model from its weights: the model config, the
    classes, the aligned pair, and each fused task's inputs with their data facts."""
    return {"model": model.cfg.model_dump(), "classes": model.classes, "align": list(model.align or []),
            "fused": model.fused}


def load_trained(folder: str | Path) -> MultiTaskModel:
    """The model `tessera train` wrote to `folder` (model.json + model.safetensors), in eval mode on the CPU."""
    folder = Path(folder)
    if not (folder / "model.json").is_file():
        raise UserError(f"{folder}/model.json: no trained model there; run `tessera train` first")
    card = json.loads((folder / "model.json").read_text())
    model = MultiTaskModel(ModelConfig.model_validate(card["model"]), card["classes"], tuple(card["align"]) or None,
                           card.get("fused"))
    model.load_state_dict(read_state_dict(folder / "model.safetensors"))
    return model.eval()
