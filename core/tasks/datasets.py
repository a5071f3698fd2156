"""The data of the tasks one run trains: each task's prepared splits, the pairs of each contrastive task, and the
order batches are drawn in.

Tasks: one per trained modality (its own task, named after it), one per trained records source (its fused task,
named after the source: core/data/records.py's RecordsSplit), and each contrastive task (core/kinds/contrastive.py)
by its name: two inputs of one records source paired by sample (PairedBySample: a record's photo with its own
caption), or two modalities paired by label (PairedByLabel: a spoken "seven" with a written 7). A task's split is
anything with `len`, `labels()` and `gather(indices, buffers=None) -> batch` (core/data/shards.py's ShardedSplit,
RecordsSplit, PairedBySample or PairedByLabel); a pairing's `sides()` are its two galleries for retrieval.
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
                raise UserError(f"contrastive task [{name_a}, {name_b}]: in the {split} split, classes "
                                f"{[a.meta['classes'][c] for c in sorted(only)]} have {have} samples but no {lack} "
                                f"samples; pairs are matched by label, so add {lack} samples of them, or remove the task")
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

    def sides(self) -> tuple[tuple[object, torch.Tensor], tuple[object, torch.Tensor]]:
        """The two galleries retrieval ranks, each (split, labels [N]): every sample of each side's own split, a
        hit being any sample of the query's class."""
        return (self.a, self.a.labels()), (self.b, self.b.labels())


class PairedBySample:
    """Pairs from one records source: pair i is record index[i]'s input `a` with the same record's input `b` (a
    photo with its own caption). Records lacking either input are left out of the task.

    gather(indices [B]) -> {"a": a's sub-batch, "b": b's sub-batch} (each its input's ShardedSplit.gather fields,
    without "label"): row r of each is a positive pair. `labels()` numbers the pairs 0..N-1: for retrieval each pair
    is its own class, so the only hit for a query is its own partner."""

    def __init__(self, records: RecordsSplit, a: str, b: str):
        self.records, self.names = records, (a, b)
        cols = [records.inputs.index(a), records.inputs.index(b)]
        rows = records.rows[:, cols]  # [N_records, 2], -1: absent
        self.index = torch.nonzero((rows >= 0).all(dim=1)).flatten()  # [N]
        self.rows = rows[self.index]  # [N, 2]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def starts(self) -> np.ndarray:
        """Where the records' runs start in pair numbers [S + 1]: pairs follow the records' order."""
        return np.searchsorted(self.index.numpy(), self.records.starts)

    def side(self, k: int, indices, buffers: Buffers | None = None) -> dict:
        """Side k's sub-batch of pairs `indices` [B]."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        sub = self.records.splits[self.names[k]].gather(self.rows[indices, k], buffers)
        sub.pop("label", None)
        return sub

    def gather(self, indices, buffers: Buffers | None = None) -> dict:
        return {key: self.side(k, indices, buffers.part(key) if buffers else None) for k, key in enumerate("ab")}

    def labels(self) -> torch.Tensor:
        return torch.arange(len(self))

    def sides(self) -> tuple[tuple[object, torch.Tensor], tuple[object, torch.Tensor]]:
        """The two galleries retrieval ranks: every pair's `a`, every pair's `b`, labelled by pair."""
        return tuple((_Side(self, k), self.labels()) for k in range(2))


@dataclass
class _Side:
    """One side of PairedBySample as a split of its own (retrieval embeds each side's gallery alone)."""
    pairs: PairedBySample
    k: int

    def __len__(self) -> int:
        return len(self.pairs)

    def gather(self, indices, buffers: Buffers | None = None) -> dict:
        return self.pairs.side(self.k, indices, buffers)


def load_task_data(prepared: Path, tasks: list[str], pairs: dict[str, tuple[str, str]] | None, seed: int) -> dict[str, TaskData]:
    """Each task's splits: `tasks` (modalities' own and records sources' fused tasks) and the contrastive `pairs`,
    task -> its two inputs (two modalities, or `<source>.<input>` twice, of one records source)."""
    pairs = pairs or {}
    folders = dict.fromkeys([*tasks, *(i.split(".")[0] for pair in pairs.values() for i in pair)])
    splits: dict[str, dict] = {}
    for m in folders:
        folder = prepared / m
        if not (folder / "meta.json").exists():
            raise UserError(f"{folder}: not prepared; add prepare.sources.{m} and run `tessera prepare`, or remove "
                            f"the tasks that name {m} from params.yaml")
        split = RecordsSplit if json.loads((folder / "meta.json").read_text()).get("format") == RECORDS else ShardedSplit
        splits[m] = {s: split(folder, s) for s in SPLITS}
    data = {t: TaskData(t, splits[t]["train"], splits[t]["val"], splits[t]["test"]) for t in tasks}
    for t, (a, b) in pairs.items():
        data[t] = TaskData(t, *(pairing(t, a, b, splits, s, seed) for s in SPLITS))
    for t, d in data.items():
        if len(d.train) == 0:
            raise UserError(f"task {t}: no training samples were prepared (or, for a contrastive task over records, no "
                            "record holds both its inputs); see data/prepared/quarantine.jsonl")
    return data


def pairing(task: str, a: str, b: str, splits: dict, split: str, seed: int):
    """Split `split` of contrastive task `task` over inputs a, b: by sample within one records source
    (`<source>.<input>`), else by label across two modalities' datasets."""
    if "." in a:
        source = a.split(".")[0]
        return PairedBySample(splits[source][split], a.split(".")[1], b.split(".")[1])
    if splits[a]["train"].meta["classes"] != splits[b]["train"].meta["classes"]:
        raise UserError(f"tasks.{task}: {a} and {b} must share their classes to be paired by label")
    return PairedByLabel(splits[a][split], splits[b][split], seed, (a, b, split))


def collate_task(task: str, sides: dict[str, str] | None, batch: dict, inputs: dict[str, str] | None = None):
    """A gathered batch of a task -> (inputs, targets): the modality's own collate; for a fused task (`inputs`: its
    input names -> modalities) each input's modality's collate on its sub-batch, and `present`; or for a contrastive
    task (`sides`: its two sides' names -> modalities) each side's inputs by side name (targets None: row r of each
    side is a positive pair)."""
    if inputs is not None:
        return ({"present": batch["present"], **{name: REGISTRY[m].collate({**batch[name], "label": None})[0]
                                                 for name, m in inputs.items()}}, batch["label"])
    if sides is not None:
        return {s: collate_side(m, batch[key]) for key, (s, m) in zip("ab", sides.items())}, None
    return REGISTRY[task].collate(batch)


def collate_side(modality: str, batch: dict) -> dict:
    """One contrastive side's gathered sub-batch -> its adapter's inputs."""
    return REGISTRY[modality].collate({**batch, "label": None})[0]


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
