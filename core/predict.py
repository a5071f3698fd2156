"""`tessera predict`: an exported model (ONNX Runtime) on image, audio or text files.

A text file holds one input per non-empty line (.txt), or records with a `text` field (.jsonl, .csv).
Each input gives one record: {"source", "label", "score", "top"} for a classifier, {"source", "boxes"} for
detection (xyxy in the file's own pixels), {"source", "embedding"} for an alignment embedder, or
{"source", "error"} for a file that could not be read; the others are still predicted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.data import BadSample, read_rows
from core.errors import UserError
from modalities.audio import AUDIO_SUFFIXES, load_audio
from modalities.image import load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TEXT_SUFFIXES = {".txt", ".jsonl", ".csv"}
SUFFIXES = {"image": IMAGE_SUFFIXES, "detection": IMAGE_SUFFIXES, "audio": AUDIO_SUFFIXES, "text": TEXT_SUFFIXES}


def expand(paths: list[Path], modality: str) -> list[Path]:
    """Files as given, and the files below each folder whose suffix fits the modality, sorted."""
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES[modality])
        else:
            files.append(p)
    return files


def read_texts(path: Path) -> Iterator[tuple[str, str | None, str | None]]:
    """(source, text, error) per input in a text file."""
    if not path.is_file():
        yield str(path), None, "missing file"
        return
    if path.suffix.lower() in (".jsonl", ".csv"):
        for n, row, error in read_rows(path):
            text = (row or {}).get("text")
            yield f"{path}:{n}", text or None, error or (None if text else "no `text` field (or it is empty)")
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        yield str(path), None, f"not UTF-8 text ({e.reason} at byte {e.start})"
        return
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield f"{path}:{n}", line.strip(), None


class Predictor:
    """An exported task folder: its config, an ONNX Runtime session, and the reading of input files."""

    def __init__(self, folder: str | Path):
        import onnxruntime as ort

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file() or not (self.folder / "model.onnx").is_file():
            raise UserError(f"{self.folder}: not an exported model (needs config.json and model.onnx); "
                            "run `tessera export` and pass models/export/<task>")
        self.config = json.loads((self.folder / "config.json").read_text())
        self.modality, self.head = self.config["modality"], self.config["head"]
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.shape = self.config["inputs"][0]["shape"]
        if self.modality == "text":
            from modalities.text import load_tokenizer

            self.tokenizer = load_tokenizer(self.folder / "tokenizer.json")

    def read(self, files: list[Path]) -> Iterator[tuple[str, object, str | None]]:
        """(source, loaded input, error) per input: uint8 [C, H, W] + original (w, h), float32 [T], or a string."""
        for f in files:
            if self.modality == "text":
                yield from read_texts(f)
                continue
            try:
                if self.modality == "audio":
                    yield str(f), load_audio(f, self.config["model"]["audio"]["sample_rate"]), None
                else:
                    pixels = load_image(f, self.shape[2], self.shape[1])
                    with Image.open(f) as im:
                        yield str(f), (pixels, im.size), None
            except BadSample as e:
                yield str(f), None, str(e)

    def batch_inputs(self, items: list) -> dict[str, np.ndarray]:
        if self.modality == "text":
            from modalities.text import encode

            ids, pad = encode(self.tokenizer, items, self.config["model"]["text"]["max_len"])
            return {"input_ids": ids.numpy(), "pad_mask": pad.numpy()}
        if self.modality == "audio":
            lengths = np.array([len(w) for w in items], dtype=np.int64)
            wave = np.zeros((len(items), lengths.max()), dtype=np.float32)
            for i, w in enumerate(items):
                wave[i, : len(w)] = w
            return {"waveform": wave, "lengths": lengths}
        return {"images": np.stack([pixels for pixels, _ in items])}

    def records(self, sources: list[str], items: list, top_k: int, threshold: float) -> list[dict]:
        outputs = self.session.run(None, self.batch_inputs(items))
        if self.head == "contrastive":
            return [{"source": s, "embedding": e.round(6).tolist()} for s, e in zip(sources, outputs[0])]
        classes = self.config["classes"]
        if self.head == "detection":
            _, scores, labels, boxes = outputs
            side = self.shape[2]
            result = []
            for s, (_, (w, h)), sc, lb, bx in zip(sources, items, scores, labels, boxes):
                order = np.argsort(-sc)
                keep = order[sc[order] >= threshold]
                scale = np.array([w, h, w, h], dtype=np.float32) / side
                result.append({"source": s, "boxes": [{"label": classes[lb[q]], "score": round(float(sc[q]), 4),
                                                       "box": (bx[q] * scale).round(1).tolist()} for q in keep]})
            return result
        probs = torch.from_numpy(outputs[0]).softmax(-1)
        top = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [{"source": s, "label": classes[i[0]], "score": round(float(v[0]), 4),
                 "top": [{"label": classes[j], "score": round(float(u), 4)} for u, j in zip(v.tolist(), i.tolist())]}
                for s, v, i in zip(sources, top.values, top.indices)]

    def predict(self, paths: list[Path], top_k: int = 3, threshold: float = 0.5, batch_size: int = 16) -> Iterator[dict]:
        """One record per input, in order; unreadable inputs give an `error` record and the rest go on."""
        pending: list[tuple[str, object]] = []
        for source, item, error in self.read(expand(paths, self.modality)):
            if error:
                yield from self._flush(pending, top_k, threshold)
                pending = []
                yield {"source": source, "error": error}
                continue
            pending.append((source, item))
            if len(pending) == batch_size:
                yield from self._flush(pending, top_k, threshold)
                pending = []
        yield from self._flush(pending, top_k, threshold)

    def _flush(self, pending: list, top_k: int, threshold: float) -> list[dict]:
        if not pending:
            return []
        sources, items = zip(*pending)
        return self.records(list(sources), list(items), top_k, threshold)
