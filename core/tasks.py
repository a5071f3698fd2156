"""The tasks one run trains, their data, and the multi-task model that shares one backbone between them.

Tasks: "image", "audio", "text" (classification), "detection" (DETR), and "align" (contrastive alignment of two
modalities, e.g. audio <-> image, paired by label: a spoken "seven" with a written 7).

A batch is (inputs, targets) as the collate functions make it: uint8 images and int16 waveforms travel to the
device as they are stored (a quarter and a half of float32's bytes) and `to_device` turns them into floats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from core.backbone import Encoder
from core.config import ModelConfig
from core.data import read_shards, unflatten
from core.errors import UserError
from core.heads import ContrastiveCriterion, weighted_loss
from core.model import TaskModel
from modalities import TASKS, build_adapter, build_criterion, build_head

HEAD_OF = dict(TASKS)  # task (named after its input) -> head


class PreparedSplit(Dataset):
    """One split of one prepared modality, its shards read into memory. Item i: a dict of tensors."""

    def __init__(self, folder: Path, split: str):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.samples: list[dict] = []
        for shard in read_shards(folder, self.meta["splits"][split]):
            ragged = {k[: -len("_offsets")] for k in shard if k.endswith("_offsets")}
            pieces = {k: unflatten(shard, k) for k in ragged}
            n = len(next(iter(pieces.values()))) if pieces else len(next(iter(shard.values())))
            for i in range(n):
                self.samples.append({k: (pieces[k][i] if k in pieces else v[i]) for k, v in shard.items()
                                     if not k.endswith("_offsets")})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]

    def labels(self) -> torch.Tensor:
        return torch.stack([s["label"] for s in self.samples])


class PreparedLabels:
    """The labels of one prepared split, read without its samples (for checks before training)."""

    def __init__(self, folder: Path, split: str):
        from safetensors import safe_open

        self.meta = json.loads((folder / "meta.json").read_text())
        parts = []
        for name in self.meta["splits"][split]:
            with safe_open(folder / name, "pt") as f:
                parts.append(f.get_tensor("label"))
        self._labels = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def labels(self) -> torch.Tensor:
        return self._labels


def _pad(seqs: list[torch.Tensor], value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged 1-D tensors -> ([B, L_max], lengths [B])."""
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.full((len(seqs), int(lengths.max())), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths


def collate(modality: str, samples: list[dict]) -> tuple[dict, object]:
    """Samples -> (adapter inputs, targets). Targets: class indices [B], or a list of DETR target dicts."""
    if modality == "image":
        return {"images": torch.stack([s["image"] for s in samples])}, torch.stack([s["label"] for s in samples])
    if modality == "audio":
        wave, lengths = _pad([s["waveform"] for s in samples])
        return {"waveform": wave, "lengths": lengths}, torch.stack([s["label"] for s in samples])
    if modality == "text":
        ids, lengths = _pad([s["ids"].long() for s in samples])
        return {"input_ids": ids, "pad_mask": torch.arange(ids.shape[1]) >= lengths[:, None]}, \
            torch.stack([s["label"] for s in samples])
    if modality == "detection":
        return {"images": torch.stack([s["image"] for s in samples])}, \
            [{"labels": s["labels"], "boxes": s["boxes"]} for s in samples]
    raise ValueError(modality)


def pixels_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..] -> float32 in [-1, 1]: the one normalisation every image model here is trained with."""
    return images.float() / 127.5 - 1.0


def pcm_to_float(pcm: torch.Tensor) -> torch.Tensor:
    """int16 samples -> float32 in [-1, 1): how prepared waveforms are stored, and how every model reads them."""
    return pcm.float() / 32768.0


def to_device(obj, device: torch.device):
    """Moves a batch to `device` (non-blocking from pinned memory); uint8 images become floats in [-1, 1],
    int16 waveforms floats in [-1, 1)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if obj.dtype == torch.uint8:
            return pixels_to_float(obj)
        if obj.dtype == torch.int16:
            return pcm_to_float(obj)
        return obj
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


@dataclass
class TaskData:
    name: str
    modality: str  # for "align": the first modality of the pair
    train: Dataset
    val: Dataset
    test: Dataset | None = None


class PairedByLabel(Dataset):
    """Cross-modal pairs from two labelled datasets with the same classes: pair i holds the i-th sample of `a` whose
    class `b` has, and a sample of `b` of that class chosen by (seed, i). Used for contrastive alignment.

    In the training split every class present in either must be present in both: a class of `a` alone could not
    be paired, one of `b` alone would never be a positive. A held-out split may lack a class on one side (a small
    split often does): its unpaired samples are left out here, and retrieval counts them as unmatched.
    `names` (a, b, split) go into the error."""

    def __init__(self, a: PreparedSplit, b: PreparedSplit, seed: int = 0, names: tuple[str, str, str] = ("a", "b", "train")):
        self.a, self.b, self.seed = a, b, seed
        la, lb = a.labels(), b.labels()
        ca, cb = set(la.unique().tolist()), set(lb.unique().tolist())
        name_a, name_b, split = names
        for have, lack, only in ((name_a, name_b, ca - cb), (name_b, name_a, cb - ca)):
            if only and split == "train":
                raise UserError(f"train.align [{name_a}, {name_b}]: in the {split} split, classes "
                                f"{[a.meta['classes'][c] for c in sorted(only)]} have {have} samples but no {lack} "
                                f"samples; pairs are matched by label, so add {lack} samples of them, or set train.align: []")
        self.by_class_b = {c: torch.nonzero(lb == c).flatten() for c in ca & cb}
        self.index = torch.nonzero(torch.isin(la, torch.tensor(sorted(ca & cb), dtype=la.dtype))).flatten()  # [N]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        sa = self.a[int(self.index[i])]
        pool = self.by_class_b[int(sa["label"])]
        j = pool[np.random.default_rng([self.seed, i]).integers(len(pool))]
        return {"a": sa, "b": self.b[int(j)]}

    def labels(self) -> torch.Tensor:
        """The class of each pair [N]."""
        return self.a.labels()[self.index]


def load_task_data(prepared: Path, tasks: list[str], align: tuple[str, str] | None, seed: int) -> dict[str, TaskData]:
    splits: dict[str, dict[str, PreparedSplit]] = {}
    modalities = set(tasks) | set(align or ())
    for m in modalities:
        folder = prepared / m
        if not (folder / "meta.json").exists():
            raise UserError(f"{folder}: not prepared; add prepare.sources.{m} and run `tessera prepare`, or remove "
                            f"{m} from train.tasks and train.align")
        splits[m] = {s: PreparedSplit(folder, s) for s in ("train", "val", "test")}
    data = {t: TaskData(t, t, splits[t]["train"], splits[t]["val"], splits[t]["test"]) for t in tasks}
    if align:
        a, b = align
        if splits[a]["train"].meta["classes"] != splits[b]["train"].meta["classes"]:
            raise UserError(f"train.align: {a} and {b} must share their classes to be paired by label")
        data["align"] = TaskData("align", a, *(PairedByLabel(splits[a][s], splits[b][s], seed, (a, b, s))
                                               for s in ("train", "val", "test")))
    for t, d in data.items():
        if len(d.train) == 0:
            raise UserError(f"task {t}: no training samples were prepared; see data/prepared/quarantine.jsonl")
    return data


def collate_task(task: str, modality_of: dict[str, str], align: tuple[str, str] | None, samples: list[dict]):
    if task == "align":
        a, b = align
        return {a: collate(a, [s["a"] for s in samples])[0], b: collate(b, [s["b"] for s in samples])[0]}, None
    return collate(modality_of[task], samples)


class MultiTaskModel(nn.Module):
    """One backbone, an adapter per modality, a head and a criterion per task.

    forward(task, inputs, targets) -> dict of loss_* tensors, plus "loss": their weighted sum.
    `task_model(task)` is the plain adapter -> backbone -> head view of one task (evaluation, export).
    """

    def __init__(self, cfg: ModelConfig, classes: dict[str, list[str]], align: tuple[str, str] | None = None):
        super().__init__()
        self.cfg, self.classes, self.align = cfg, classes, align
        tasks = [t for t in classes if t != "align"]
        self.backbone = Encoder(cfg.backbone())
        self.adapters = nn.ModuleDict({m: build_adapter(m, cfg) for m in sorted(set(tasks) | set(align or ()))})
        self.heads = nn.ModuleDict({t: build_head(HEAD_OF[t], cfg, len(classes[t])) for t in tasks})
        self.criteria = nn.ModuleDict({t: build_criterion(HEAD_OF[t], cfg, len(classes[t])) for t in tasks})
        if align:
            for m in align:
                self.heads[f"align_{m}"] = build_head("contrastive", cfg, 0)
            self.criteria["align"] = ContrastiveCriterion()

    def task_model(self, task: str) -> TaskModel:
        return TaskModel(self.adapters[task], self.backbone, self.heads[task])

    def embed(self, modality: str, inputs: dict) -> torch.Tensor:
        """Unit-norm alignment embeddings [B, proj_dim] of one modality's inputs."""
        return TaskModel(self.adapters[modality], self.backbone, self.heads[f"align_{modality}"])(**inputs)["pred_embed"]

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


def model_card(model: MultiTaskModel) -> dict:
    """What evaluation, export and prediction need to rebuild the model from its weights."""
    return {"model": model.cfg.model_dump(), "classes": model.classes, "align": list(model.align or [])}


def load_trained(folder: str | Path) -> MultiTaskModel:
    """The model `tessera train` wrote to `folder` (model.json + model.safetensors), in eval mode on the CPU."""
    from core.checkpoint import read_state_dict
    from core.config import ModelConfig

    folder = Path(folder)
    if not (folder / "model.json").is_file():
        raise UserError(f"{folder}/model.json: no trained model there; run `tessera train` first")
    card = json.loads((folder / "model.json").read_text())
    model = MultiTaskModel(ModelConfig.model_validate(card["model"]), card["classes"], tuple(card["align"]) or None)
    model.load_state_dict(read_state_dict(folder / "model.safetensors"))
    return model.eval()
