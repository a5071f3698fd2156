"""`tessera predict`: an exported model (ONNX Runtime) on files of its modality, or a fused task's on tables of
records.

Each input gives one record, its task kind's (core/kinds/): {"source", "label", "score", "top"} for a classifier,
{"source", "value"} for a regression (in the target's units), {"source", "embedding"} for an alignment embedder,
the modality's own record where it needs the input (detection: {"source", "boxes"}, xyxy in the file's own pixels),
or {"source", "error"} for an input that could not be read; the others are still predicted.

A fused task reads a records table (CSV, TSV, JSONL, Parquet; the columns its inputs were trained on): one record
per row, source `<table>:<row>`, with `absent`: the inputs the row lacks (an empty cell) or whose cell could not
be read, and `warnings`: each unreadable cell, named by its column ("photo: not an image ..."). A row left with no
usable input gets {"source", "error"}.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tessera.core.config import ModelConfig, PrepareConfig
from tessera.core.data.files import expand
from tessera.core.errors import UserError
from tessera.core.kinds import KINDS
from tessera.core.modality import InputLimits
from tessera.core.stages.export import CONTRASTIVE
from tessera.core.tasks.multitask import input_config
from tessera.modalities import REGISTRY
from tessera.modalities.io import READERS, read_input
from tessera.modalities.records import read_records

TABLES = frozenset({".csv", ".tsv", ".jsonl", ".parquet"})  # what a fused task's records come in


@dataclass(frozen=True)
class Record:
    """One record of a fused task, read: {input: what its reader gave} for the inputs it has, and a warning
    ("photo: not an image ...") for each input whose value could not be read (so absent)."""

    items: dict
    warnings: list[str]


class FusedInputs:
    """A fused task's inputs (config.json's `fused`), each read by its modality's reader under the input's own
    config and assets (a text input's own tokenizer, under <export>/<input>/), and batched as the exported model
    takes them (`batch`)."""

    def __init__(self, config: dict, folder: Path, limits: InputLimits):
        self.inputs, cfg = config["fused"], ModelConfig.model_validate(config["model"])
        self.configs = {i["name"]: input_config(cfg, i) for i in self.inputs}
        self.readers = {i["name"]: READERS[i["modality"]].predict_io(
            {**config, "model": self.configs[i["name"]].model_dump()}, folder / i["name"], limits)
            for i in self.inputs}
        self.modalities = {i["name"]: i["modality"] for i in self.inputs}

    def read(self, values: dict[str, object], base: Path | None = None, names: dict[str, str] | None = None) -> Record:
        """{input: value} (a cell, a JSON value, or an upload's bytes with its file name in `names`) -> the Record."""
        items, warnings = {}, []
        for name, value in values.items():
            item, error = read_input(self.modalities[name], self.readers[name][0], value, base, (names or {}).get(name))
            if error:
                warnings.append(f"{name}: {error}")
            else:
                items[name] = item
        return Record(items, warnings)

    def rows(self, tables: list[Path]) -> Iterator[tuple[str, Record | None, str | None]]:
        """(source `<table>:<row>`, the row's Record, None) per row of each table, in order (paths in cells are
        relative to the table), or (source, None, why) for a row with no usable input or one the table cannot give:
        how `tessera predict` and `tessera explain` read records."""
        for table in tables:
            for n, values, error in read_records(table, self.inputs):
                record = self.read(values, table.parent)
                if record.items:
                    yield f"{table}:{n}", record, None
                else:
                    yield f"{table}:{n}", None, f"no usable input ({unusable(record, error)})"

    def described(self, made: dict, record: Record) -> dict:
        """A prediction's record (its kind's) with the inputs the row lacks (`absent`) and its unreadable cells."""
        return {**made, "absent": [n for n in self.modalities if n not in record.items]} | (
            {"warnings": record.warnings} if record.warnings else {})

    def batch(self, records: list[Record]) -> tuple[np.ndarray, ...]:
        """Records -> the exported model's inputs: each input's (its reader's batch of the records that have it; a
        record lacking it repeats another's row, masked by `present`, or, where no record has it, the modality's
        example of the configured size), then present [B, K] bool."""
        arrays, records = [], [r.items for r in records]
        for name, m in self.modalities.items():
            have = [r[name] for r in records if name in r]
            if not have:
                arrays += [a.numpy() for a in REGISTRY[m].example(self.configs[name], len(records))]
                continue
            rows, k = [], 0
            for r in records:  # each record's row among `have`, 0 where it lacks the input
                rows.append(k if name in r else 0)
                k += name in r
            arrays += [np.take(a, rows, axis=0) for a in self.readers[name][1](have)]
        return (*arrays, np.array([[name in r for name in self.modalities] for r in records], dtype=bool))


class Predictor:
    """An exported task folder: its config, an ONNX Runtime session, and its modality's reading of inputs
    (`modality`, a ModalityIO; `read(source: Path | bytes, name=None)` takes a file or its bytes; refused past
    `limits`: by default prepare's default limits). A fused task's (`fused`, FusedInputs; `modality` and `read`
    None) reads each input of a record by that input's modality."""

    def __init__(self, folder: str | Path, limits: InputLimits | None = None, spin: bool = True):
        import onnxruntime as ort

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file() or not (self.folder / "model.onnx").is_file():
            raise UserError(f"{self.folder}: not an exported model (needs config.json and model.onnx); "
                            "run `tessera export` and pass models/export/<task>")
        self.config = json.loads((self.folder / "config.json").read_text())
        limits = limits or InputLimits.of(PrepareConfig(), "prepare")
        self.fused = FusedInputs(self.config, self.folder, limits) if self.config.get("fused") else None
        self.modality = None if self.fused else READERS[self.config["modality"]]
        options = ort.SessionOptions()
        if not spin:  # ORT's threads spin-wait after each run by default: a server's other threads need those cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.read, self.batch = (None, self.fused.batch) if self.fused else self.modality.predict_io(self.config, self.folder, limits)
        self.input_names = [i["name"] for i in self.config["inputs"]]

    def outputs(self, items: list) -> list[np.ndarray]:
        """The session's outputs on `items` (what `read` gave), batched."""
        return self.session.run(None, dict(zip(self.input_names, self.batch(items))))

    def records(self, sources: list[str], items: list, outputs: list[np.ndarray], top_k: int, threshold: float) -> list[dict]:
        """A record per input, from the session's `outputs` on `items`."""
        if self.fused:
            made = KINDS[self.config["head"]].records(sources, outputs, self.config, top_k)
            return [self.fused.described(r, item) for r, item in zip(made, items)]
        if self.config["head"] == CONTRASTIVE:
            return [{"source": s, "embedding": e.round(6).tolist()} for s, e in zip(sources, outputs[0])]
        if self.modality.records:
            return self.modality.records(sources, items, outputs, self.config, threshold)
        return KINDS[self.config["head"]].records(sources, outputs, self.config, top_k)

    def predict(self, paths: list[Path], top_k: int, threshold: float, batch_size: int = 16) -> Iterator[dict]:
        """One record per input, in order; unreadable inputs give an `error` record and the rest go on. A fused
        task's inputs are the rows of records tables (paths in cells relative to the table): a cell that cannot be
        read leaves its input absent for that row (`warnings`); a row with no usable input, or one the table cannot
        give, is an error."""
        read = self.fused.rows(expand(paths, TABLES)) if self.fused else \
            (found for path in expand(paths, self.modality.suffixes) for found in self.read(path))
        pending: list[tuple[str, object]] = []
        for source, item, error in read:
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
        return self.records(list(sources), list(items), self.outputs(list(items)), top_k, threshold)


def unusable(record: Record, error: str | None = None) -> str:
    """Why a record has no input to predict on: the row's error, each input's that could not be read, or none given."""
    return error or "; ".join(record.warnings) or "every input's cell is empty"
