"""The multi-task model: one backbone shared by an adapter per modality, a head and a criterion per task; how it is
built from the prepared data for training, and loaded back from what training wrote.

A fused task (a records source in train.tasks) has one FusedAdapter (core/nn/fusion.py) over an adapter per input
of the record, each built from its own data facts (a text column's own tokenizer, the table's own columns): each
input's model config is the run's with that input's prepared folder applied (`Modality.from_data`). Those facts are
learnt from the data, so they live in the model card (`fused`), never in params.yaml.

A contrastive task (core/kinds/contrastive.py) has a ContrastiveHead per side (`heads["<task>_<side>"]`) and one
criterion. A side that is a modality uses that modality's adapter; a side that is an input of a records source
(`shop.photo`) has its own adapter (`adapters["shop:photo"]`), built from the input's data facts as a fused task's
are, and shared by every contrastive task that names it."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from tessera.core.config import RECORDS, ModelConfig, by_sample
from tessera.core.errors import UserError
from tessera.core.nn.backbone import Encoder
from tessera.core.nn.fusion import FusedAdapter
from tessera.core.kinds import KINDS
from tessera.core.kinds.kind import TaskKind
from tessera.core.nn.heads import weighted_loss
from tessera.core.nn.task_model import TaskModel
from tessera.core.nn.weights import read_state_dict
from tessera.modalities import REGISTRY, build_criterion, build_head, task_kind


class MultiTaskModel(nn.Module):
    """One backbone, an adapter per modality (and per fused task, and per records input a contrastive task names),
    a head and a criterion per task.

    forward(task, inputs, targets) -> dict of loss_* tensors, plus "loss": their weighted sum.
    `task_model(task)` is the plain adapter -> backbone -> head view of one task (evaluation, export), and
    `embedder(task, side)` the same for one side of a contrastive task.

    `fused`: each fused task's inputs in order, [{"name": input, "modality": m, "config": the input's section of the
    model config, model.<m>, with its data facts}]; its adapter (`adapters[task]`) is a FusedAdapter over them.
    `pairs`: each contrastive task's two sides, [{"name": side, "input": a modality or `<source>.<input>`,
    "modality": m, "config": a records input's section with its data facts, or None}].
    `dropout`: fused task -> input -> modality-dropout probability in training (train.modality_dropout).
    """

    def __init__(self, cfg: ModelConfig, classes: dict[str, list[str]], pairs: dict[str, list[dict]] | None = None,
                 fused: dict[str, list[dict]] | None = None, dropout: dict[str, dict[str, float]] | None = None):
        super().__init__()
        self.cfg, self.classes, self.pairs, self.fused = cfg, classes, pairs or {}, fused or {}
        tasks = [t for t in classes if t not in self.pairs]
        self.backbone = Encoder(cfg.backbone())
        sides = [s for pair in self.pairs.values() for s in pair]
        own = sorted((set(tasks) - set(self.fused)) | {s["input"] for s in sides if s["config"] is None})
        self.adapters = nn.ModuleDict({m: REGISTRY[m].adapter(cfg) for m in own})
        for t, inputs in self.fused.items():
            p = (dropout or {}).get(t, {})
            per_input = {i["name"]: REGISTRY[i["modality"]].adapter(input_config(cfg, i)) for i in inputs}
            self.adapters[t] = FusedAdapter(per_input, cfg.backbone().embed_dim, [p.get(i["name"], 0.0) for i in inputs])
        for s in sides:
            if s["config"] is not None and adapter_key(s) not in self.adapters:
                self.adapters[adapter_key(s)] = REGISTRY[s["modality"]].adapter(input_config(cfg, s))
        self.heads = nn.ModuleDict({t: build_head(t, cfg, len(classes[t])) for t in tasks})
        self.criteria = nn.ModuleDict({t: build_criterion(t, cfg, len(classes[t])) for t in tasks})
        contrastive = KINDS["contrastive"]
        for t, pair in self.pairs.items():
            for s in pair:
                self.heads[f"{t}_{s['name']}"] = contrastive.head(cfg, t, 0)
            self.criteria[t] = contrastive.criterion(cfg, t, 0)

    def kind(self, task: str) -> TaskKind:
        return KINDS["contrastive"] if task in self.pairs else task_kind(task, self.cfg)

    def inputs(self, task: str) -> dict[str, str] | None:
        """A fused task's inputs, name -> modality, in order; None for a modality's own task."""
        return {i["name"]: i["modality"] for i in self.fused[task]} if task in self.fused else None

    def sides(self, task: str) -> dict[str, str] | None:
        """A contrastive task's two sides, name -> modality, in order; None for any other task."""
        return {s["name"]: s["modality"] for s in self.pairs[task]} if task in self.pairs else None

    def task_model(self, task: str) -> TaskModel:
        return TaskModel(self.adapters[task], self.backbone, self.heads[task])

    def embedder(self, task: str, side: str) -> TaskModel:
        """Side `side` of contrastive task `task`: its inputs -> {"pred_embed": [B, proj_dim]}, unit norm."""
        s = next(s for s in self.pairs[task] if s["name"] == side)
        return TaskModel(self.adapters[adapter_key(s)], self.backbone, self.heads[f"{task}_{side}"])

    def forward(self, task: str, inputs: dict, targets) -> dict:
        if task in self.pairs:  # its criterion takes both sides' embeddings
            outputs = {s: self.embedder(task, s)(**inputs[s]) for s in self.sides(task)}
        else:
            outputs = self.task_model(task)(**inputs)
        losses = self.criteria[task](outputs, targets)
        losses["loss"] = weighted_loss(losses, self.criteria[task].weight_dict)
        return losses


def adapter_key(side: dict) -> str:
    """The adapter of a contrastive side: its modality's, or a records input's own (`shop:photo`: module names
    hold no dots)."""
    return side["input"].replace(".", ":")


def input_config(cfg: ModelConfig, inp: dict) -> ModelConfig:
    """The model config one input of a fused task builds its adapter from: `cfg` with the input's own section."""
    m = inp["modality"]
    return cfg.model_copy(update={m: type(getattr(cfg, m)).model_validate(inp["config"])})


def fused_inputs(cfg: ModelConfig, folder: Path, meta: dict) -> list[dict]:
    """The inputs of the records source prepared in `folder` (meta.json `meta`), each with its section of `cfg`:
    its own settings (model.inputs) and facts from its own prepared folder (its tokenizer's vocabulary, its
    statistics, its columns)."""
    names = [i["name"] for i in meta["inputs"]]
    unknown = sorted(ref for ref in cfg.inputs if ref.split(".")[0] == folder.name and ref.split(".", 1)[1] not in names)
    if unknown:
        raise UserError(f"params.yaml: model.inputs names {unknown}, which are not inputs of {folder.name}; its "
                        f"inputs are {names} (a column, or `table` for the numeric and categorical ones)")
    inputs = []
    for i in meta["inputs"]:
        m = i["modality"]
        own = cfg.for_input(f"{folder.name}.{i['name']}", m).model_copy(deep=True)
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


def build_model(cfg: ModelConfig, prepared: Path, tasks: list[str], pairs: dict[str, tuple[str, str]] | None,
                dropout: dict[str, dict[str, float]] | None = None) -> MultiTaskModel:
    """A fresh model for the prepared data: each modality's data facts (vocabulary, statistics, columns) and each
    task's target statistics (regression) filled into the config, each fused task's inputs (and each records input
    a contrastive task names) with their own facts, the class lists (a regression's target names) from meta.json,
    starting weights where the config names them. `pairs`: contrastive task -> its two inputs; `dropout`:
    train.modality_dropout."""
    cfg = cfg.model_copy(deep=True)
    pairs = pairs or {}
    names = dict.fromkeys([*tasks, *(i.split(".")[0] for pair in pairs.values() for i in pair)])
    metas = {m: json.loads((prepared / m / "meta.json").read_text()) for m in names}
    records = {t: fused_inputs(cfg, prepared / t, meta) for t, meta in metas.items() if meta.get("format") == RECORDS}
    for m, meta in metas.items():
        if m not in records and REGISTRY[m].from_data:
            REGISTRY[m].from_data(cfg, prepared / m, meta)
    fused = {t: records[t] for t in tasks if t in records}
    check_dropout(dropout or {}, fused)
    classes = {t: metas[t]["classes"] for t in tasks}
    cfg.targets = {t: metas[t]["target_stats"] for t in tasks if metas[t].get("target_stats")}
    sides = {}
    for t, pair in pairs.items():
        sides[t] = [side(i, records) for i in pair]
        classes[t] = [] if "." in pair[0] else metas[pair[0]]["classes"]  # by sample: no classes
    model = MultiTaskModel(cfg, classes, sides, fused, dropout)
    for t in tasks:  # the task, and so the shared backbone, start there
        if t not in fused and REGISTRY[t].pretrained:
            REGISTRY[t].pretrained(model.task_model(t), cfg)
    return model


def side(ref: str, records: dict[str, list[dict]]) -> dict:
    """A contrastive side from its input: a modality, or `<source>.<input>` with that input's data facts."""
    if not by_sample(ref):
        return {"name": ref, "input": ref, "modality": ref, "config": None}
    source, name = ref.split(".")
    i = next(i for i in records[source] if i["name"] == name)
    return {"name": name, "input": ref, "modality": i["modality"], "config": i["config"]}


def model_card(model: MultiTaskModel) -> dict:
    """What evaluation, export and prediction need to rebuild the model from its weights: the model config, the
    classes, each contrastive task's sides and each fused task's inputs, with their data facts."""
    return {"model": model.cfg.model_dump(), "classes": model.classes, "pairs": model.pairs, "fused": model.fused}


def load_trained(folder: str | Path) -> MultiTaskModel:
    """The model `tessera train` wrote to `folder` (model.json + model.safetensors), in eval mode on the CPU."""
    folder = Path(folder)
    if not (folder / "model.json").is_file():
        raise UserError(f"{folder}/model.json: no trained model there; run `tessera train` first")
    card = json.loads((folder / "model.json").read_text())
    pairs = card.get("pairs")
    if pairs is None:  # a model trained before contrastive tasks had names: `align`, two modalities
        pairs = {"align": [side(m, {}) for m in card["align"]]} if card.get("align") else {}
    model = MultiTaskModel(ModelConfig.model_validate(card["model"]), card["classes"], pairs, card.get("fused"))
    model.load_state_dict(read_state_dict(folder / "model.safetensors"))
    return model.eval()
