"""The data of the tasks one run trains: each task's prepared splits, the cross-modal pairs of the alignment task,
and batches of either.

Tasks: one per trained modality (its own task, named after it), and "align": contrastive alignment of two
modalities paired by label (a spoken "seven" with a written 7).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tessera.core.data.shards import PreparedSplit
from tessera.core.errors import UserError
from tessera.modalities import REGISTRY

SPLIT_NAMES = ("train", "val", "test")


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

    def __init__(self, a, b, seed: int = 0, names: tuple[str, str, str] = ("a", "b", "train")):
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
    for m in set(tasks) | set(align or ()):
        folder = prepared / m
        if not (folder / "meta.json").exists():
            raise UserError(f"{folder}: not prepared; add prepare.sources.{m} and run `tessera prepare`, or remove "
                            f"{m} from train.tasks and train.align")
        splits[m] = {s: PreparedSplit(folder, s) for s in SPLIT_NAMES}
    data = {t: TaskData(t, t, splits[t]["train"], splits[t]["val"], splits[t]["test"]) for t in tasks}
    if align:
        a, b = align
        if splits[a]["train"].meta["classes"] != splits[b]["train"].meta["classes"]:
            raise UserError(f"train.align: {a} and {b} must share their classes to be paired by label")
        data["align"] = TaskData("align", a, *(PairedByLabel(splits[a][s], splits[b][s], seed, (a, b, s))
                                               for s in SPLIT_NAMES))
    for t, d in data.items():
        if len(d.train) == 0:
            raise UserError(f"task {t}: no training samples were prepared; see data/prepared/quarantine.jsonl")
    return data


def collate_task(task: str, align: tuple[str, str] | None, samples: list[dict]):
    """Samples of a task -> (inputs, targets): the modality's own collate, or for "align" each side's inputs by
    modality name (targets None: row i of each side is a positive pair)."""
    if task == "align":
        a, b = align
        return {a: REGISTRY[a].collate([s["a"] for s in samples])[0], b: REGISTRY[b].collate([s["b"] for s in samples])[0]}, None
    return REGISTRY[task].collate(samples)
