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
from safetensors.torch import load_file, save_file

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
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, source: str, **fields: np.ndarray) -> None:
        self.rows.append(fields)
        self.sources.append(source)
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
    """Whole shards, one at a time (for inspection and tests; training reads `ShardedSplit`)."""
    for name in files:
        yield load_file(folder / name)


def unflatten(tensors: dict[str, torch.Tensor], name: str) -> list[torch.Tensor]:
    """A ragged field of a whole shard back into its per-sample pieces."""
    offsets = tensors[f"{name}_offsets"].tolist()
    flat = tensors[name]
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


DTYPES = {"U8": np.uint8, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "F16": np.float16,
          "F32": np.float32, "F64": np.float64, "BOOL": np.bool_}


def map_shard(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of the file, memory-mapped (copy-on-write, never written): no
    byte is read until it is used, and the page cache, not the process, holds what was."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="c")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        array = raw[8 + n + begin: 8 + n + end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = torch.from_numpy(array)
    return tensors


def shard_length(path: Path) -> int:
    """Samples in a shard, from its header alone."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    offsets = [k for k in shapes if k.endswith("_offsets")]
    return shapes[offsets[0]][0] - 1 if offsets else next(iter(shapes.values()))[0]


LARGE_ROW = 4096  # bytes: rows this large (an image, a clip) are copied one by one and into reused memory


class Buffers:
    """Batch memory a loader writes its batches into. take(name, shape, dtype) -> a contiguous tensor of that shape.

    reuse=True: for fields of rows of 4 KB or more (images, clips), the memory `name` got last time (grown when
    too small), so that field of the batch before is overwritten.
    Allocating afresh costs a batch page faults that are most of a copy's cost (benchmarks/RESULTS.md, "Loader
    throughput"); reused, a gather runs at the speed of the memory bus. part(key) -> the Buffers of a sub-batch
    (each side of a pair)."""

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self._memory: dict[str, torch.Tensor] = {}
        self._parts: dict[str, Buffers] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        if not self.reuse or row_bytes < LARGE_ROW:  # small rows (labels, lengths, token ids): fresh, as cheap, and a
            return torch.empty(shape, dtype=dtype)  # batch's labels, often kept, are never overwritten
        n = int(np.prod(shape))
        memory = self._memory.get(name)
        if memory is None or memory.dtype != dtype or memory.numel() < n:
            # A quarter more than asked: padded batches widen a little, batch after batch, as longer samples come
            # (the longest clip so far), and each regrowth would be a fresh allocation
            memory = self._memory[name] = torch.empty(n + n // 4, dtype=dtype)
        return memory[:n].view(shape)

    def part(self, key: str) -> Buffers:
        return self._parts.setdefault(key, Buffers(self.reuse))


class ShardedSplit:
    """One split of one prepared modality, read lazily from its memory-mapped shards; memory holds the batch being
    gathered and at most `open_shards` mappings (beyond a shuffle window's shards), however large the split.

    gather(indices [B]) -> a batch: each fixed-size field stacked, [B, ...]; each ragged field padded with zeros to
    its longest sample, [B, L_max, ...], with its lengths in `<name>_lengths` [B]. Samples are numbered 0..N-1 across
    the shards in meta.json's order.

    `split` may name several splits, read as one in that order (pretraining's train and unlabelled): a batch then
    holds the fields every one of them has (no `label` where one has none).
    """

    def __init__(self, folder: Path, split: str | tuple[str, ...], open_shards: int = 32):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        splits = (split,) if isinstance(split, str) else split
        self.files = [f for s in splits for f in self.meta["splits"][s]]
        counts = [shard_length(self.folder / f) for f in self.files]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.open_shards = open_shards
        self._open: dict[int, dict[str, torch.Tensor]] = {}  # shard -> its tensors; least recently used first
        firsts = [self.files.index(self.meta["splits"][s][0]) for s in splits if self.meta["splits"][s]]
        # the fields of the split's first shard, which every shard of that split has (one writer wrote them)
        self.fields = set.intersection(*(set(self.shard(k)) for k in firsts)) if len(firsts) > 1 else None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard(self, k: int) -> dict[str, torch.Tensor]:
        tensors = self._open.pop(k, None) or map_shard(self.folder / self.files[k])
        self._open[k] = tensors
        while len(self._open) > self.open_shards:
            self._open.pop(next(iter(self._open)))  # unmapped once the last view of it is gone
        return tensors

    def labels(self) -> torch.Tensor:
        """Every sample's class [N] (int64), read without the samples."""
        parts = [self.shard(k)["label"].clone() for k in range(len(self.files))]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def gather(self, indices, buffers: Buffers | None = None) -> dict[str, torch.Tensor]:
        """indices [B] -> the batch; into `buffers`' memory when given (the caller is done with the batch it last
        gathered into them), else into fresh tensors."""
        buffers = buffers or Buffers(reuse=False)
        indices = torch.as_tensor(indices, dtype=torch.long)
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"sample indices outside 0..{len(self) - 1}")
        which = torch.from_numpy(np.searchsorted(self.starts, indices.numpy(), side="right") - 1)  # [B] shard of each
        parts = {}  # shard -> (positions in the batch, local indices)
        for k in which.unique().tolist():
            pos = torch.nonzero(which == k).flatten()
            parts[k] = (pos, indices[pos] - int(self.starts[k]))
        maps = {k: self.shard(k) for k in parts}  # each mapped once for the whole batch, however many it spans
        if not parts and self.files:  # no rows: the fields, empty
            maps, parts = {0: self.shard(0)}, {0: (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))}
        first = next(iter(maps.values())) if maps else {}
        batch = {}
        for name, t in first.items():
            if name.endswith("_offsets") or (self.fields is not None and name not in self.fields):
                continue
            if f"{name}_offsets" in first:
                batch[name], batch[f"{name}_lengths"] = self._ragged(name, parts, maps, len(indices), buffers)
            else:
                out = buffers.take(name, (len(indices), *t.shape[1:]), t.dtype)
                row_bytes = t[0].numel() * t.element_size() if len(t) else 0
                for k, (pos, local) in parts.items():
                    src = maps[k][name]
                    if row_bytes >= LARGE_ROW:  # an image: one copy per sample, straight from the mapped file into the batch
                        dst, src = out.numpy(), src.numpy()  # (numpy's indexing costs a third of torch's per row)
                        for p, i in zip(pos.tolist(), local.tolist()):
                            dst[p] = src[i]
                    else:  # labels, small rows: one indexing operation (which copies twice: cheap here)
                        out[pos] = src[local]
                batch[name] = out
        return batch

    def _ragged(self, name: str, parts: dict, maps: dict, B: int, buffers: Buffers) -> tuple[torch.Tensor, torch.Tensor]:
        spans = {}
        for k, (pos, local) in parts.items():
            offsets = maps[k][f"{name}_offsets"]
            spans[k] = (offsets[local], offsets[local + 1])
        lengths = torch.zeros(B, dtype=torch.long)
        for k, (pos, _) in parts.items():
            lengths[pos] = spans[k][1] - spans[k][0]
        flat = next(iter(maps.values()))[name]
        out = buffers.take(name, (B, int(lengths.max()) if B else 0, *flat.shape[1:]), flat.dtype)
        dst = out.numpy()
        for k, (pos, _) in parts.items():
            flat = maps[k][name].numpy()
            for p, a, b in zip(pos.tolist(), spans[k][0].tolist(), spans[k][1].tolist()):
                dst[p, : b - a] = flat[a:b]  # one copy per sample, into the batch
                dst[p, b - a:] = 0  # the padding: only it is zeroed, so each byte of the batch is written once
        return out, lengths

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Sample i alone, ragged fields at their own length."""
        batch = self.gather([i])
        return {k: v[0, : int(batch[f"{k}_lengths"][0])] if f"{k}_lengths" in batch else v[0]
                for k, v in batch.items() if not k.endswith("_lengths")}
