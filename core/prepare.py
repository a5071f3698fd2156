"""`tessera prepare`: open every sample, quarantine the bad ones, write model-ready shards per modality.

For each configured modality, two streaming passes over its listing:
1. hash every sample's content: the hash assigns its split (val, and test where no test source is given) and
   feeds the cache key, together with the preprocessing parameters of that modality alone;
2. unless `<out>/<modality>/meta.json` already carries that key, decode and check each sample, write the
   good ones to safetensors shards and the bad ones to the quarantine report, with the reason.

Nothing is lost: per modality and split, samples in = samples prepared + samples quarantined. Memory holds one
shard of samples (`prepare.shard_size`) plus about 100 bytes of bookkeeping per sample.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from core.config import Params, SourceConfig
from core.data import SPLITS, BadSample, Entry, ShardWriter, atomic_write_text, file_hash, hash_fraction, \
    list_class_folders, sorted_labels, text_hash
from core.errors import UserError
from modalities.audio import LogMel, list_audio_manifest, load_audio
from modalities.detection import list_coco, load_canvas
from modalities.image import load_image
from modalities.text import list_text, load_tokenizer, train_tokenizer

RAGGED = {"image": (), "audio": ("waveform",), "text": ("ids",), "detection": ("boxes", "labels")}
VERSION = 2  # bump when the shard layout or preprocessing code changes meaning


def to_int16(wave: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 PCM; 16-bit sources round-trip exactly (x / 32768 * 32768 = x)."""
    return np.clip(np.round(wave * 32768), -32768, 32767).astype(np.int16)


def from_int16(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768


def list_source(modality: str, src: SourceConfig, path: str) -> tuple[list[str] | None, Iterator[Entry]]:
    """(class names where the format fixes them, else None; the entries) of one source file or folder."""
    p = Path(path)
    if src.format in ("imagefolder", "folder"):
        return list_class_folders(p)
    if src.format == "coco":
        return list_coco(p, Path(src.images) if src.images else None)
    if not p.is_file():  # is_file() reads metadata only: a FIFO is refused here, never opened
        raise UserError(f"{p}: {'not a regular file' if p.exists() else 'no such file'} (prepare.sources.{modality})")
    return None, (list_audio_manifest(p) if modality == "audio" else list_text(p))


def preprocessing_params(modality: str, params: Params) -> dict:
    """The knobs whose change must re-prepare this modality, and no other."""
    m, p = params.model, params.prepare
    return {
        "image": lambda: {"img_size": m.image.img_size, "in_chans": m.image.in_chans, "max_pixels": p.max_image_pixels},
        "audio": lambda: {"sample_rate": m.audio.sample_rate, "n_mels": m.audio.n_mels, "n_fft": m.audio.n_fft,
                          "hop_length": m.audio.hop_length, "max_seconds": p.max_audio_seconds,
                          "rates": list(p.audio_rates)},
        "text": lambda: {"vocab_size": m.text.vocab_size, "max_len": m.text.max_len, "tokenizer":
                         file_hash(Path(m.text.tokenizer)) if m.text.tokenizer else None},
        "detection": lambda: {"img_size": m.detection.img_size, "in_chans": m.detection.in_chans,
                              "max_pixels": p.max_image_pixels},
    }[modality]()


class Plan:
    """Pass 1: each entry's split and content hash (or the reason it has none), the classes, and the cache key."""

    def __init__(self, modality: str, src: SourceConfig, params: Params):
        self.modality, self.src, self.prep = modality, src, params.prepare
        self.rows: list[tuple[str, str | None]] = []  # (split, error), in listing order
        key = hashlib.sha256(json.dumps([VERSION, modality, src.model_dump(), preprocessing_params(modality, params),
                                         self.prep.val_fraction, self.prep.test_fraction]).encode())
        classes = {}
        labels = set()
        for declared in ("train", "test"):
            path = getattr(src, declared)
            if path is None:
                continue
            classes[declared], entries = list_source(modality, src, path)
            for e in entries:
                split, error = e.split or declared, e.error
                if error is None:
                    try:
                        digest = text_hash(e.payload) if e.path is None else file_hash(e.path)
                        split = e.split or self.assign(declared, digest)
                        key.update(f"{split}\0{digest}\0{e.label}\n".encode())
                        if split != "test":
                            labels.add(e.label)
                    except BadSample as b:
                        error = str(b)
                self.rows.append((split, error))
        if classes.get("test") is not None and classes["test"] != classes["train"]:
            raise UserError(f"prepare.sources.{modality}: the test classes {classes['test']} differ from the train "
                            f"classes {classes['train']}; give both splits the same classes")
        self.classes = classes["train"] if classes["train"] is not None else sorted_labels(labels)
        key.update(json.dumps(self.classes).encode())
        self.key = key.hexdigest()

    def assign(self, declared: str, digest: str) -> str:
        if declared == "test":
            return "test"
        u = hash_fraction(digest)
        if u < self.prep.val_fraction:
            return "val"
        if self.src.test is None and u < self.prep.val_fraction + self.prep.test_fraction:
            return "test"
        return "train"

    def entries(self) -> Iterator[tuple[Entry, str, str | None]]:
        """Pass 2's walk: the same listing again, with each entry's split and pass-1 error."""
        rows = iter(self.rows)
        for declared in ("train", "test"):
            path = getattr(self.src, declared)
            if path is not None:
                for e in list_source(self.modality, self.src, path)[1]:
                    yield (e, *next(rows))

    def relative(self, source: str) -> str:
        """A sample's source as the shards record it: relative to its source's folder, so that prepared data
        hashes the same in every clone and names files that exist wherever it is pulled."""
        for declared in ("train", "test"):
            path = getattr(self.src, declared)
            if path is not None:
                root = Path(path) if Path(path).is_dir() else Path(path).parent
                if Path(source).is_relative_to(root):
                    return str(Path(source).relative_to(root))
                if Path(source).is_relative_to(root.resolve()):
                    return str(Path(source).relative_to(root.resolve()))
        return source


def _loader(modality: str, plan: Plan, params: Params, folder: Path):
    """The per-sample preprocessing of one modality: Entry -> dict of numpy fields (raises BadSample)."""
    m, p = params.model, params.prepare
    if modality == "image":
        return lambda e: {"image": load_image(e.path, m.image.img_size, m.image.in_chans, max_pixels=p.max_image_pixels)}
    if modality == "detection":
        return lambda e: load_canvas(e, m.detection.img_size, m.detection.in_chans, plan.classes, p.max_image_pixels)
    if modality == "audio":
        return lambda e: {"waveform": to_int16(load_audio(e.path, m.audio.sample_rate, p.max_audio_seconds, p.audio_rates))}
    if m.text.tokenizer:
        tok = load_tokenizer(m.text.tokenizer)
    else:  # trained on the training texts that pass the checks
        tok = train_tokenizer((e.payload for e, split, err in plan.entries() if split == "train" and err is None
                               and e.label in plan.classes and e.payload.strip()), m.text.vocab_size)
    tok.save(str(folder / "tokenizer.json"))

    def encode(e: Entry) -> dict:
        ids = tok.encode(e.payload).ids[: m.text.max_len]
        if not ids:
            raise BadSample("empty text")
        return {"ids": np.asarray(ids, dtype=np.int32)}

    return encode


def prepare_modality(modality: str, src: SourceConfig, params: Params, folder: Path) -> dict:
    """Prepare one modality into `folder` unless its cache key is unchanged. Returns its meta.json content."""
    plan = Plan(modality, src, params)
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == plan.key:
            return {**meta, "cached": True}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    load = _loader(modality, plan, params, tmp)
    writers = {s: ShardWriter(tmp, s, params.prepare.shard_size, RAGGED[modality]) for s in SPLITS}
    counts = {s: {"in": 0, "prepared": 0, "quarantined": 0} for s in SPLITS}
    quarantine = []
    logmel = LogMel(params.model.audio.sample_rate, params.model.audio.n_fft, params.model.audio.hop_length,
                    params.model.audio.n_mels) if modality == "audio" else None
    moments = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares of train log-mel values
    for e, split, error in track(plan.entries(), total=len(plan.rows), description=f"preparing {modality:9s}"):
        counts[split]["in"] += 1
        try:
            if error:
                raise BadSample(error)
            if modality != "detection" and e.label not in plan.classes:
                raise BadSample(f"unknown label {e.label!r}; the training split's labels are {plan.classes}")
            fields = load(e)
            if modality != "detection":
                fields["label"] = np.asarray(plan.classes.index(e.label), dtype=np.int64)
        except BadSample as b:
            quarantine.append({"path": e.source, "modality": modality, "split": split, "reason": str(b)})
            counts[split]["quarantined"] += 1
            continue
        writers[split].add(plan.relative(e.source), **fields)
        counts[split]["prepared"] += 1
        if logmel is not None and split == "train":
            spec = logmel(torch.from_numpy(from_int16(fields["waveform"]))[None]).double()
            moments += torch.stack([torch.tensor(spec.numel(), dtype=torch.float64), spec.sum(), (spec**2).sum()])
    for w in writers.values():
        w.flush()
    stats = {}
    if logmel is not None and moments[0] > 0:
        mean = moments[1] / moments[0]
        stats = {"norm_mean": mean.item(), "norm_std": (moments[2] / moments[0] - mean**2).clamp(min=1e-12).sqrt().item()}
    meta = {"modality": modality, "key": plan.key, "classes": plan.classes, "counts": counts, "stats": stats,
            "splits": {s: w.files for s, w in writers.items()}, "quarantine": quarantine}
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return {**meta, "cached": False}


def prepare(params: Params, console: Console | None = None) -> dict[str, dict]:
    """Prepare every configured modality; write the quarantine report and the counts metric. Returns the metas."""
    console = console or Console()
    cfg = params.prepare
    if not cfg.sources:
        raise UserError("params.yaml: prepare.sources is empty; name at least one modality's data")
    missing = [f"{path}: no such file or folder (prepare.sources.{m}.{k})" for m, src in cfg.sources.items()
               for k, path in (("train", src.train), ("test", src.test), ("images", src.images))
               if path is not None and not Path(path).exists()]
    if missing:  # before any modality is prepared: the fix is in params.yaml, and nothing half-done is left
        raise UserError("; ".join(missing))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quarantine.jsonl").unlink(missing_ok=True)  # a crash below must not leave the last run's report
    metas = {m: prepare_modality(m, src, params, out / m) for m, src in cfg.sources.items()}
    atomic_write_text(out / "quarantine.jsonl", "".join(
        json.dumps(q, ensure_ascii=False) + "\n" for meta in metas.values() for q in meta["quarantine"]))
    metrics = {m: meta["counts"] for m, meta in metas.items()}
    Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(cfg.metrics), json.dumps(metrics, indent=1))
    table = Table(title=f"prepared into {out}")
    for col in ("modality", "split", "in", "prepared", "quarantined", ""):
        table.add_column(col, justify="right" if col in ("in", "prepared", "quarantined") else "left")
    for m, meta in metas.items():
        for s in SPLITS:
            c = meta["counts"][s]
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
