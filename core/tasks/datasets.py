"""The data of the tasks one run trains: each task's prepared splits, the cross-modal pairs of the alignment task,
and the order batches are drawn in.

Tasks: one per trained modality (its own task, named after it), one per trained records source (its fused task,
named after the source: core/data/records.py's RecordsSplit), and "align": contrastive alignment of two
modalities paired by label (a spoken "seven" with a written 7). A task's split is anything with `len`, `labels()`
and `gather(indices, buffers=None) -> batch` (core/data/shards.py's ShardedSplit, RecordsSplit, or PairedByLabel).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from tessera.core.config import RECORDS
from tessera.core.data.files import SPLITS
from tessera.core.data.records import RecordsSplit
from tessera.core.data.shards import Buffers, ShardedSplit
from tessera.core.errors import UserError
from tessera.modalities import REGISTRY

@dataclass
class TaskData:
    name: str
    train: object
    val: object
    test: object = None


class PairedByLabel:
    """Cross-modal pairs from two labelled datasets with the same classes: pair i holds the i-th sample of `a` whose
    class `b` has, and a sample of `b` of that class chosen by (seed, i). Used for contrastive alignment.

    In the training split every class present in either must be present in both: a class of `a` alone could not
    be paired, one of `b` alone would never be a positive. A held-out split may lack a class on one side (a small
    split often does): its unpaired samples are left out here, and retrieval counts them as unmatched.
    `names` (a, b, split) go into the error."""

    def __init__(self, a, b, seed: int = 0, names: tuple[str, str, str] = ("a", "b", "train")):
        self.a, self.b, self.seed = a, b, seed
        la, lb = a.labels(), b.labels()
        self.labels_a = la
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

    @property
    def starts(self) -> np.ndarray:
        """Where a's shards start in pair numbers [S + 1]: pairs follow a's samples, so a's shards order them."""
        return np.searchsorted(self.index.numpy(), self.a.starts)

    def partner(self, i: int) -> int:
        """The sample of `b` paired with pair i: one of the class of a's sample, chosen by (seed, i)."""
        pool = self.by_class_b[int(self.labels_a[self.index[i]])]
        return int(pool[np.random.default_rng([self.seed, i]).integers(len(pool))])

    def gather(self, indices, buffers: Buffers | None = None) -> dict:
        """Pairs -> {"a": a's batch, "b": b's batch}: row r of each is a positive pair."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        a, b = (buffers.part(k) if buffers else None for k in "ab")
        return {"a": self.a.gather(self.index[indices], a), "b": self.b.gather([self.partner(int(i)) for i in indices], b)}

    def labels(self) -> torch.Tensor:
        """The class of each pair [N]."""
        return self.labels_a[self.index]


def load_task_data(prepared: Path, tasks: list[str], align: tuple[str, str] | None, seed: int) -> dict[str, TaskData]:
    splits: dict[str, dict[str, ShardedSplit]] = {}
    for m in set(tasks) | set(align or ()):
        folder = prepared / m
        if not (folder / "meta.json").exists():
            raise UserError(f"{folder}: not prepared; add prepare.sources.{m} and run `tessera prepare`, or remove "
                            f"{m} from train.tasks and train.align")
        split = RecordsSplit if json.loads((folder / "meta.json").read_text()).get("format") == RECORDS else ShardedSplit
        splits[m] = {s: split(folder, s) for s in SPLITS}
    data = {t: TaskData(t, splits[t]["train"], splits[t]["val"], splits[t]["test"]) for t in tasks}
    if align:
        a, b = align
        if splits[a]["train"].meta["classes"] != splits[b]["train"].meta["classes"]:
            raise UserError(f"train.align: {a} and {b} must share their classes to be paired by label")
        data["align"] = TaskData("align", *(PairedByLabel(splits[a][s], splits[b][s], seed, (a, b, s))
                                            for s in SPLITS))
    for t, d in data.items():
        if len(d.train) == 0:
            raise UserError(f"task {t}: no training samples were prepared; see data/prepared/quarantine.jsonl")
    return data


def collate_task(task: str, align: tuple[str, str] | None, batch: dict, inputs: dict[str, str] | None = None):
    """A gathered batch of a task -> (inputs, targets): the modality's own collate; for a fused task (`inputs`: its
    input names -> modalities) each input's modality's collate on its sub-batch, and `present`; or for "align" each
    side's inputs by modality name (targets None: row r of each side is a positive pair)."""
    if inputs is not None:
        return ({"present": batch["present"], **{name: REGISTRY[m].collate({**batch[name], "label": None})[0]
                                                 for name, m in inputs.items()}}, batch["label"])
    if task == "align":
        a, b = align
        return {a: REGISTRY[a].collate(batch["a"])[0], b: REGISTRY[b].collate(batch["b"])[0]}, None
    return REGISTRY[task].collate(batch)


def epoch_order(starts: np.ndarray, seed: int, window: int) -> torch.Tensor:
    """One epoch's sample order [N] over shards that start at `starts` [S + 1]: the shards in a random order, then
    each run of `window` samples of that sequence shuffled within itself. A bounded shuffle buffer, computed on
    indices alone: a batch reads from the one or two windows it falls in, and the order is a function of the seed,
    so a resumed run draws the same batches."""
    g = torch.Generator().manual_seed(seed)
    shards = torch.randperm(len(starts) - 1, generator=g).tolist()
    order = torch.cat([torch.arange(int(starts[k]), int(starts[k + 1])) for k in shards]) if shards else torch.zeros(0, dtype=torch.long)
    for a in range(0, len(order), window):
        chunk = order[a: a + window]
        order[a: a + window] = chunk[torch.randperm(len(chunk), generator=g)]
    return order


class Batches(IterableDataset):
    """The batches of one epoch of one task from `start` on: batch i is samples order[i * G: (i + 1) * G] of the
    global batch G, of which this rank takes every world-th. Under a DataLoader with W workers, worker w gathers
    batches w, w + W, ...; the DataLoader takes them in turn, so the order is the same with any W, and no sample is
    read twice.

    In the training process itself (no workers) batches are gathered into a ring of `depth` reused Buffers: a
    batch stays intact until `depth` - 1 more have been drawn (the consumer holds one: on a GPU the DataLoader copies
    it into pinned memory at once). A worker allocates each batch afresh: the batch goes to the training process
    through shared memory, which it would otherwise overwrite while still queued there."""

    depth = 2

    def __init__(self, split, order: torch.Tensor, global_batch: int, start: int, rank: int, world: int, collate):
        super().__init__()
        self.split, self.order, self.G, self.start, self.rank, self.world = split, order, global_batch, start, rank, world
        self.collate = collate

    def __len__(self) -> int:
        return max(0, len(self.order) // self.G - self.start)

    def __iter__(self):
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        ring = [Buffers(reuse=info is None) for _ in range(self.depth)]
        for n, i in enumerate(range(self.start + w, len(self.order) // self.G, W)):
            rows = self.order[i * self.G: (i + 1) * self.G][self.rank:: self.world]
            yield self.collate(self.split.gather(rows, ring[n % self.depth]))


def in_order(split, batch_size: int, collate):
    """Every sample of a split once, in order, as collated batches (evaluation, export checks)."""
    n = len(split)
    for a in range(0, n, batch_size):
        yield collate(split.gather(torch.arange(a, min(n, a + batch_size))))
