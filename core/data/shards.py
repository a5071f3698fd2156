"""Prepared data on disk: safetensors shards, and the splits training reads from them.

A shard holds up to `shard_size` samples as a few tensors (fixed-size samples stacked, variable-length ones
flattened with an `offsets` tensor [N + 1]) plus a JSON sidecar with each sample's source path. Shards are
written atomically: a reader sees a whole shard or none. `<folder>/meta.json` lists each split's shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from tessera.core.data.files import atomic_write, atomic_write_text


class ShardWriter:
    """Collects samples and writes `<prefix>-NNNNN.safetensors` every `shard_size` samples.

    add(source, **fields): each field a numpy array; fields named in `ragged` vary in their first dimension
    and are flattened with `<name>_offsets`. Memory holds at most one shard.
    """

    def __init__(self, folder: Path, prefix: str, shard_size: int, ragged: tuple[str, ...] = ()):
        self.folder, self.prefix, self.shard_size, self.ragged = folder, prefix, shard_size, ragged
        self.rows: list[dict] = []
        self.sources: list[str] = []
        self.files: list[str] = []
        self.count = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, source: str, **fields: np.ndarray) -> None:
        self.rows.append(fields)
        self.sources.append(source)
        self.count += 1
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        tensors = {}
        for name in self.rows[0]:
            values = [r[name] for r in self.rows]
            if name in self.ragged:
                lengths = [len(v) for v in values]
                tensors[name] = torch.from_numpy(np.concatenate(values))
                tensors[f"{name}_offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
            else:
                tensors[name] = torch.from_numpy(np.stack(values))
        name = f"{self.prefix}-{len(self.files):05d}.safetensors"
        atomic_write(self.folder / name, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
        atomic_write_text(self.folder / (name + ".json"), json.dumps(self.sources))
        self.files.append(name)
        self.rows, self.sources = [], []


def read_shards(folder: Path, files: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    for name in files:
        yield load_file(folder / name)


def unflatten(tensors: dict[str, torch.Tensor], name: str) -> list[torch.Tensor]:
    """A ragged field back into its per-sample pieces."""
    offsets = tensors[f"{name}_offsets"].tolist()
    flat = tensors[name]
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


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
        self.meta = json.loads((folder / "meta.json").read_text())
        parts = []
        for name in self.meta["splits"][split]:
            with safe_open(folder / name, "pt") as f:
                parts.append(f.get_tensor("label"))
        self._labels = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def labels(self) -> torch.Tensor:
        return self._labels
