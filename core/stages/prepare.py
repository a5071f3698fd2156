"""`tessera prepare` (`prepare_data`): open every sample, quarantine the bad ones, write model-ready shards per modality.

For each configured modality, two streaming passes over its listing:
1. hash every sample's content: the hash assigns its split (val, and test where no test source is given) and
   feeds the cache key, together with the preprocessing parameters of that modality alone; the samples of an
   unlabelled source (`unlabelled`) form a split of their own, which only pretraining reads;
2. unless `<out>/<modality>/meta.json` already carries that key, decode and check each sample, write the
   good ones to safetensors shards and the bad ones to the quarantine report, with the reason.

A records source (format: records) is a table whose columns are inputs of several modalities: each input is
prepared as above into `<out>/<name>/<input>/`, then each split's records index (`prepare_records`).

Nothing is lost: per modality and split, samples in = samples prepared + samples quarantined. Memory holds one
shard of samples (`prepare.shard_size`) plus about 100 bytes of bookkeeping per sample.
"""

from __future__ import annotations

import array
import collections
from concurrent.futures import ProcessPoolExecutor
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from tessera.core.config import RECORDS, Params, SourceConfig
from tessera.core.data.files import (SPLITS, UNLABELLED, BadSample, Entry, atomic_write_text, file_hash, hash_split,
                                     relative_source, sorted_labels, text_hash)
from tessera.core.data.records import write_index
from tessera.core.data.shards import ShardWriter
from tessera.core.errors import UserError
from tessera.core.modality import PrepareContext
from tessera.core.runtime.progress import Work
from tessera.core.units import Unit, plain
from tessera.modalities import REGISTRY, records, task_kind

VERSION = 4  # bump when the shard layout or preprocessing code changes meaning


def preprocessing_params(modality: str, params: Params) -> dict:
    """The values of the modality's `prepare_keys`: their change must re-prepare it, and no other modality. A key
    that names a file (a tokenizer) counts by the file's content."""
    values, everything = {}, params.model_dump()
    for key in REGISTRY[modality].prepare_keys:
        value = everything
        for part in key.split("."):
            value = value[part]
        values[key] = file_hash(Path(value)) if isinstance(value, str) and Path(value).is_file() else value
    return values


def content_hash(e: Entry) -> str:
    """What a sample is: its file's bytes, or what the listing carries (a sentence, a table row)."""
    if e.path is not None:
        return file_hash(e.path)
    return text_hash(e.payload if isinstance(e.payload, str) else json.dumps(e.payload, sort_keys=True, default=str))


Listing = Callable[[str], tuple[list[str] | None, Iterator[Entry]]]
"""A source file or folder -> (its class names where it fixes them, else None; its entries)."""
DECLARED = ("train", "test", UNLABELLED)  # a source's keys that list samples, in the order they are listed
LEAK = ("the same content as a held-out ({split}) sample: pretraining on it would show the model that input before "
        "it is evaluated; remove it from the unlabelled source")


class Plan:
    """Pass 1: each entry's split and content hash (or the reason it has none), the classes, and the cache key."""

    def __init__(self, modality: str, src: SourceConfig, params: Params, listing: Listing | None = None):
        self.modality, self.src, self.params, self.prep = modality, src, params, params.prepare
        self.listing = listing or (lambda path: REGISTRY[modality].list_source(src, path, params))
        self.splits = (*SPLITS, UNLABELLED) if src.unlabelled is not None else SPLITS
        self.rows: list[tuple[str, str | None]] = []  # (split, error), in listing order
        key = hashlib.sha256(json.dumps([VERSION, modality, src.model_dump(), preprocessing_params(modality, params),
                                         self.prep.val_fraction, self.prep.test_fraction,
                                         self.prep.root]).encode())  # the root: samples are named relative to it
        classes = {}
        labels = set()
        held_out: dict[bytes, str] = {}  # val and test digests (16 bytes each) -> split: no unlabelled sample may repeat one
        for declared in DECLARED:
            path = getattr(src, declared)
            if path is None:
                continue
            classes[declared], entries = self.listed(declared, path)
            for e in entries:
                split, error = e.split or declared, e.error
                if error is None:
                    try:
                        digest = content_hash(e)
                        split = e.split or self.assign(declared, digest)
                        key.update(f"{split}\0{digest}\0{e.label}\n".encode())
                        if split in ("train", "val"):
                            labels.add(e.label)
                        short = bytes.fromhex(digest[:32])
                        if split in ("val", "test") and src.unlabelled is not None:
                            held_out[short] = split
                        if split == UNLABELLED and short in held_out:
                            error = LEAK.format(split=held_out[short])
                    except BadSample as b:
                        error = str(b)
                self.rows.append((split, error))
        if classes.get("test") is not None and classes["test"] != classes["train"]:
            raise UserError(f"prepare.sources.{modality}: the test classes {classes['test']} differ from the train "
                            f"classes {classes['train']}; give both splits the same classes")
        self.classes = classes["train"] if classes["train"] is not None else sorted_labels(labels)
        key.update(json.dumps(self.classes).encode())
        self.key = key.hexdigest()

    def listed(self, declared: str, path: str) -> tuple[list[str] | None, Iterator[Entry]]:
        """The `declared` source's (class names or None, entries); an unlabelled source's fix no classes."""
        if declared == UNLABELLED:
            return None, REGISTRY[self.modality].list_unlabelled(self.src, path, self.params)
        return self.listing(path)

    def assign(self, declared: str, digest: str) -> str:
        if declared == UNLABELLED:
            return UNLABELLED
        return hash_split(declared, digest, self.prep.val_fraction, self.prep.test_fraction, self.src.test is not None)

    def entries(self) -> Iterator[tuple[Entry, str, str | None]]:
        """Pass 2's walk: the same listing again, with each entry's split and pass-1 error."""
        rows = iter(self.rows)
        for declared in DECLARED:
            path = getattr(self.src, declared)
            if path is not None:
                for e in self.listed(declared, path)[1]:
                    yield (e, *next(rows))


_DECODE = None  # the function the worker processes run: set before they are forked, so any closure will do


def _decode_chunk(chunk: list[tuple[Entry, str, str | None]]) -> list[tuple[Entry, str, dict | BadSample]]:
    out = []
    for e, split, error in chunk:
        try:
            out.append((e, split, _DECODE(e, split, error)))
        except BadSample as b:
            out.append((e, split, b))
    return out


def in_parallel(decode, items: Iterator[tuple[Entry, str, str | None]], workers: int, chunk: int = 32):
    """(entry, split, fields or the BadSample) per item, in the items' order, `decode(entry, split, error)` run by
    `workers` forked processes. At most 2 x workers chunks are in flight, so memory holds a bounded number of
    decoded samples whatever the dataset's size; with one worker, everything runs in this process. A worker that
    dies (the OOM killer) fails the run with BrokenProcessPool rather than leaving it waiting."""
    global _DECODE
    if workers <= 1:
        for e, split, error in items:
            try:
                yield e, split, decode(e, split, error)
            except BadSample as b:
                yield e, split, b
        return
    _DECODE = decode  # the workers are forked on the first submit, and inherit it
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            pending: collections.deque = collections.deque()
            for part in iter(lambda: list(itertools.islice(items, chunk)), []):
                pending.append(pool.submit(_decode_chunk, part))
                if len(pending) >= 2 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
    finally:
        _DECODE = None


def prepare_modality(modality: str, src: SourceConfig, params: Params, folder: Path, console: Console | None = None,
                     listing: Listing | None = None) -> dict:
    """Prepare one modality into `folder` unless its cache key is unchanged, the samples decoded counted on
    `console` (a bar, or a line every 30 s or 5%: core/runtime/progress.py). Returns its meta.json content.
    `listing`: the entries in place of the modality's own listing of `src` (a column of records)."""
    plan = Plan(modality, src, params, listing)
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == plan.key:
            return {**meta, "cached": True}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m, kind = REGISTRY[modality], task_kind(modality, params.model)

    def has_target(e: Entry) -> bool:
        try:
            return kind.target is None or kind.target(e.label, plan.classes) is not None
        except BadSample:
            return False

    usable = lambda: (e for e, split, error in plan.entries()  # noqa: E731
                      if split == "train" and error is None and has_target(e))
    load = m.loader(PrepareContext(params, plan.classes, usable, tmp))
    writers = {s: ShardWriter(tmp, s, params.prepare.shard_size, m.ragged) for s in plan.splits}
    counts = {s: {"in": 0, "prepared": 0, "quarantined": 0} for s in plan.splits}
    quarantine = []
    statistics = m.statistics(params) if m.statistics else None
    target_stats = kind.statistics() if kind.statistics else None

    def decode(e: Entry, split: str, error: str | None) -> dict:
        if error:
            raise BadSample(error)
        labelled = kind.target is not None and split != UNLABELLED
        label = kind.target(e.label, plan.classes) if labelled else None  # the target first: it costs least
        fields = load(e)
        if label is not None:
            fields["label"] = label
        return fields

    # a process per core for files to decode, where there are enough of them to repay starting one (256 each)
    workers = min(params.prepare.workers or os.cpu_count() or 1, len(plan.rows) // 256) if m.files else 1
    decoded = in_parallel(decode, plan.entries(), workers)
    with Work(console or Console(), f"preparing {modality}", len(plan.rows), "sample") as work:
        for e, split, fields in decoded:
            counts[split]["in"] += 1
            name = relative_source(e.source, params.prepare.root)  # the same in every clone, for every format
            work.advance(name)
            if isinstance(fields, BadSample):
                quarantine.append({"path": name, "modality": modality, "split": split, "reason": str(fields)})
                counts[split]["quarantined"] += 1
                continue
            writers[split].add(name, **fields)
            counts[split]["prepared"] += 1
            if statistics is not None and split == "train":
                statistics(fields)
            if target_stats is not None and split == "train":
                target_stats(fields["label"])
    for w in writers.values():
        w.flush()
    stats = statistics(None) if statistics is not None else {}
    meta = {"modality": modality, "key": plan.key, "kind": kind.name, "classes": plan.classes, "counts": counts,
            "stats": stats, "target_stats": target_stats(None) if target_stats is not None else None,
            "splits": {s: w.files for s, w in writers.items()}, "quarantine": quarantine}
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return {**meta, "cached": False}


def prepare_records(name: str, src: SourceConfig, params: Params, folder: Path, console: Console | None = None) -> dict:
    """Prepare a records source into `folder`: each input (modalities/records.py) by `prepare_modality` into
    `folder/<input>/`, with its own cache key, then each split's index (core/data/records.py). A record without a
    (known) target, or left with no usable input, is quarantined; a broken cell is quarantined with its column, and
    its record goes on without it. Returns the meta.json content, the inputs' metas under `parts`."""
    kinds = records.check_kinds(name, src)
    declared = [d for d in ("train", "test") if getattr(src, d) is not None]
    classes = sorted_labels({r.target for d in declared for r in records.list_records(src, params, d)
                             if r.error is None and r.split != "test"})
    if not classes:
        raise UserError(f"{src.train}: no training record has a target in column {src.target!r} "
                        f"(prepare.sources.{name}.target); name the column that holds the classes")
    inputs = records.inputs_of(kinds)
    metas = {}
    for inp in inputs:
        p = records.input_params(params, name, src, kinds, inp)
        listing = lambda path, inp=inp: (classes, records.input_entries(  # noqa: E731
            src, params, "train" if path == src.train else "test", inp, classes))
        metas[inp.name] = prepare_modality(inp.modality, p.prepare.sources[inp.modality], p, folder / inp.name, console,
                                          listing)
        if not metas[inp.name]["counts"]["train"]["prepared"]:
            raise UserError(f"{src.train}: no training record's {inp.name!r} could be prepared ({', '.join(inp.columns)}); "
                            f"see the reasons in {Path(params.prepare.out) / 'quarantine.jsonl'}, or drop it from "
                            f"prepare.sources.{name}.columns")
    quarantine = [{**q, "records": name, "column": inp.name} for inp in inputs for q in metas[inp.name]["quarantine"]]
    counts = {s: {"in": 0, "prepared": 0, "quarantined": 0} for s in SPLITS}
    tables = [relative_source(getattr(src, d), params.prepare.root) for d in declared]
    keys = {s: array.array("q") for s in SPLITS}  # 16 bytes a record, not a Python object each
    labels = {s: array.array("q") for s in SPLITS}
    index = {c: i for i, c in enumerate(classes)}
    for t, d in enumerate(declared):
        for r in records.list_records(src, params, d):
            counts[r.split]["in"] += 1
            error = r.error or (None if r.target in index else f"unknown target {r.target!r}; the training split's are {classes}")
            if error:
                quarantine.append({"path": f"{tables[t]}:{r.line}", "records": name, "split": r.split, "reason": error})
                counts[r.split]["quarantined"] += 1
                continue
            keys[r.split].append(record_key(t, r.line))
            labels[r.split].append(index[r.target])
    files = {}
    for s in SPLITS:
        k = np.frombuffer(keys[s], dtype=np.int64)
        rows = np.stack([input_rows(folder / inp.name, metas[inp.name]["splits"][s], tables, k) for inp in inputs], 1)
        usable = (rows >= 0).any(axis=1)  # [N]
        for key in k[~usable]:
            quarantine.append({"path": f"{tables[key >> 40]}:{key & (2**40 - 1)}", "records": name, "split": s,
                               "reason": "no usable input: every cell is empty or quarantined"})
        counts[s]["quarantined"] += int((~usable).sum())
        counts[s]["prepared"] += int(usable.sum())
        files[s] = write_index(folder, s, rows[usable], np.frombuffer(labels[s], dtype=np.int64)[usable])
    meta = {"format": RECORDS, "classes": classes, "target": src.target, "counts": counts, "splits": files,
            "inputs": [{"name": i.name, "modality": i.modality, "columns": {c: kinds[c] for c in i.columns}} for i in inputs],
            "shard_size": params.prepare.shard_size, "quarantine": quarantine}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False))
    for stale in {d for d in folder.iterdir() if d.is_dir()} - {folder / i.name for i in inputs}:
        shutil.rmtree(stale)  # a column no longer an input (or a crashed run's .tmp): nothing reads it
    parts = {f"{name}.{i}": m for i, m in metas.items()}
    return {**meta, "cached": all(m["cached"] for m in metas.values()), "parts": parts}


def record_key(table: int, line: int) -> int:
    """A record as one int64: its table (0: train, 1: test) and its line."""
    return table << 40 | line


def input_rows(folder: Path, files: list[str], tables: list[str], keys: np.ndarray) -> np.ndarray:
    """The row of each record `keys` [N] in one input's prepared split (its shards, in order), -1 where absent: the
    shards name each row by its record, "table:line"."""
    named = np.fromiter((record_key(tables.index(table), int(line)) for f in files
                         for table, line in (n.rsplit(":", 1) for n in json.loads((folder / (f + ".json")).read_text()))),
                        dtype=np.int64)
    rows = np.full(len(keys), -1, dtype=np.int64)
    if len(named):
        order = np.argsort(named, kind="stable")
        at = np.searchsorted(named, keys, sorter=order).clip(max=len(named) - 1)
        hit = named[order[at]] == keys
        rows[hit] = order[at[hit]]
    return rows


def check_sources(params: Params) -> None:
    """Each source's format is one its modality reads, and every named path exists: checked before any modality is
    prepared, since the fix is in params.yaml and nothing half-done should be left."""
    cfg = params.prepare
    if not cfg.sources:
        raise UserError("params.yaml: prepare.sources is empty; name at least one modality's data")
    for m, src in cfg.sources.items():
        if src.format != RECORDS and src.format not in REGISTRY[m].formats:
            raise UserError(f"params.yaml: prepare.sources.{m}.format: {src.format!r} is not one of "
                            f"{list(REGISTRY[m].formats)}")
        if src.unlabelled is not None and REGISTRY[m].list_unlabelled is None:
            raise UserError(f"params.yaml: prepare.sources.{m}.unlabelled: format {src.format!r} has no unlabelled "
                            "form yet; remove the key")
    missing = [f"{path}: no such file or folder (prepare.sources.{m}.{k})" for m, src in cfg.sources.items()
               for k, path in (("train", src.train), ("test", src.test), ("images", src.images),
                               ("unlabelled", src.unlabelled))
               if path is not None and not Path(path).exists()]
    if missing:
        raise UserError("; ".join(missing))


def prepare_data(params: Params, console: Console | None = None, unit: Unit = plain) -> dict[str, dict]:
    """Prepare every configured modality, each a unit of work (`prepare <modality>`); write the quarantine report
    and the counts metric. Returns the metas."""
    console = console or Console()
    cfg = params.prepare
    check_sources(params)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quarantine.jsonl").unlink(missing_ok=True)  # a crash below must not leave the last run's report
    metas = {m: unit(f"prepare {m}", prepare_records if src.format == RECORDS else prepare_modality, m, src, params,
                     out / m, console) for m, src in cfg.sources.items()}
    shown = {k: v for m, meta in metas.items() for k, v in {m: meta, **meta.get("parts", {})}.items()}  # records' inputs too
    atomic_write_text(out / "quarantine.jsonl", "".join(
        json.dumps(q, ensure_ascii=False) + "\n" for meta in metas.values() for q in meta["quarantine"]))
    metrics = {m: meta["counts"] for m, meta in shown.items()}
    Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(cfg.metrics), json.dumps(metrics, indent=1))
    table = Table(title=f"prepared into {out}")
    for col in ("modality", "split", "in", "prepared", "quarantined", ""):
        table.add_column(col, justify="right" if col in ("in", "prepared", "quarantined") else "left")
    for m, meta in shown.items():
        for s, c in meta["counts"].items():
            table.add_row(m, s, str(c["in"]), str(c["prepared"]), str(c["quarantined"]), "cached" if meta["cached"] else "")
    console.print(table)
    for m, meta in metas.items():
        n_val = meta["counts"]["val"]["prepared"]
        if n_val < 20:  # early stopping and the best checkpoint follow validation: on a handful of samples, noise
            console.print(f"[yellow]{m}: {n_val} validation samples[/]: too few to choose checkpoints by; raise "
                          f"prepare.val_fraction ({cfg.val_fraction}) or add data")
    n_bad = sum(len(meta["quarantine"]) for meta in metas.values())
    if n_bad:
        console.print(f"[yellow]{n_bad} samples quarantined[/]: reasons in {out / 'quarantine.jsonl'}")
    return metas
