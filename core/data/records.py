"""Prepared records: one sample, several inputs. `<folder>/<input>/` holds each input's shards as a source of its
modality alone would (core/data/shards.py); `<folder>/records-<split>.safetensors` is the split's index:

- `rows` [N, K] int64: the row of input k's prepared split that record n uses, -1 where the record lacks it;
- `label` [N] int64: the record's class, an index into meta.json's `classes` (the training split's targets).

`RecordsSplit` reads a split as one dataset whose batches hold every input's sub-batch and which are present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tessera.core.data.files import atomic_write
from tessera.core.data.shards import Buffers, ShardedSplit, map_shard


def index_file(split: str) -> str:
    return f"records-{split}.safetensors"


def write_index(folder: Path, split: str, rows: np.ndarray, labels: np.ndarray) -> str:
    """rows [N, K] int64 (-1: absent), labels [N] int64 -> the split's index file, written atomically."""
    name = index_file(split)
    tensors = {"rows": torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)),
               "label": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))}
    atomic_write(folder / name, lambda tmp: save_file(tensors, tmp))
    return name


class RecordsSplit:
    """One split of a prepared records source, every input read lazily through its own `ShardedSplit`: memory holds
    the index (16 bytes per record and input, memory-mapped) and the batch being gathered.

    gather(indices [B]) -> {"present": [B, K] bool, "<input>": that input's gathered batch (ShardedSplit.gather's
    fields, without "label"), "label": [B] int64}. An input a record lacks is filled with a placeholder row (the
    input's first row in this split, or in train where this split has none), masked by `present`, so that every
    sub-batch has B rows of valid values. `inputs` names the K inputs in order; `starts` bounds runs of
    `shard_size` records, the units epoch_order shuffles.
    """

    def __init__(self, folder: Path, split: str):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.inputs = [i["name"] for i in self.meta["inputs"]]
        index = map_shard(self.folder / self.meta["splits"][split])
        self.rows, self.label = index["rows"], index["label"]  # [N, K], [N]
        self.splits = {}
        for name in self.inputs:  # an input with no row in this split takes its placeholder from train
            own = ShardedSplit(self.folder / name, split)
            self.splits[name] = own if len(own) else ShardedSplit(self.folder / name, "train")
        n, step = len(self.label), max(1, int(self.meta["shard_size"]))
        self.starts = np.unique(np.concatenate([np.arange(0, n, step), [n]])).astype(np.int64)

    def __len__(self) -> int:
        return len(self.label)

    def labels(self) -> torch.Tensor:
        """Every record's class [N] (int64)."""
        return self.label.clone()

    def gather(self, indices, buffers: Buffers | None = None) -> dict[str, torch.Tensor | dict]:
        """indices [B] -> the batch; into `buffers`' memory (a part per input) when given, else into fresh tensors."""
        buffers = buffers or Buffers(reuse=False)
        indices = torch.as_tensor(indices, dtype=torch.long)
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"record indices outside 0..{len(self) - 1}")
        rows = self.rows[indices]  # [B, K]
        present = rows >= 0
        batch: dict = {"present": present}
        for k, name in enumerate(self.inputs):
            sub = self.splits[name].gather(rows[:, k].clamp(min=0), buffers.part(name))  # row 0: the placeholder
            sub.pop("label", None)
            batch[name] = sub
        batch["label"] = self.label[indices].clone()
        return batch
