"""`tessera predict`: an exported model (ONNX Runtime) on files of its modality.

Each input gives one record, its task kind's (core/kinds/): {"source", "label", "score", "top"} for a classifier,
{"source", "value"} for a regression (in the target's units), {"source", "embedding"} for an alignment embedder,
the modality's own record where it needs the input (detection: {"source", "boxes"}, xyxy in the file's own pixels),
or {"source", "error"} for an input that could not be read; the others are still predicted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tessera.core.config import PrepareConfig
from tessera.core.data.files import expand
from tessera.core.errors import UserError
from tessera.core.kinds import KINDS
from tessera.core.modality import InputLimits
from tessera.core.stages.export import CONTRASTIVE
from tessera.modalities.io import READERS


class Predictor:
    """An exported task folder: its config, an ONNX Runtime session, and its modality's reading of inputs
    (`modality`, a ModalityIO; `read(source: Path | bytes, name=None)` takes a file or its bytes; refused past
    `limits`: by default prepare's default limits)."""

    def __init__(self, folder: str | Path, limits: InputLimits | None = None, spin: bool = True):
        import onnxruntime as ort

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file() or not (self.folder / "model.onnx").is_file():
            raise UserError(f"{self.folder}: not an exported model (needs config.json and model.onnx); "
                            "run `tessera export` and pass models/export/<task>")
        self.config = json.loads((self.folder / "config.json").read_text())
        self.modality = READERS[self.config["modality"]]
        options = ort.SessionOptions()
        if not spin:  # ORT's threads spin-wait after each run by default: a server's other threads need those cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.read, self.batch = self.modality.predict_io(self.config, self.folder, limits or InputLimits.of(PrepareConfig(), "prepare"))
        self.input_names = [i["name"] for i in self.config["inputs"]]

    def outputs(self, items: list) -> list[np.ndarray]:
        """The session's outputs on `items` (what `read` gave), batched."""
        return self.session.run(None, dict(zip(self.input_names, self.batch(items))))

    def records(self, sources: list[str], items: list, outputs: list[np.ndarray], top_k: int, threshold: float) -> list[dict]:
        """A record per input, from the session's `outputs` on `items`."""
        if self.config["head"] == CONTRASTIVE:
            return [{"source": s, "embedding": e.round(6).tolist()} for s, e in zip(sources, outputs[0])]
        if self.modality.records:
            return self.modality.records(sources, items, outputs, self.config, threshold)
        return KINDS[self.config["head"]].records(sources, outputs, self.config, top_k)

    def predict(self, paths: list[Path], top_k: int, threshold: float, batch_size: int = 16) -> Iterator[dict]:
        """One record per input, in order; unreadable inputs give an `error` record and the rest go on."""
        pending: list[tuple[str, object]] = []
        for path in expand(paths, self.modality.suffixes):
            for source, item, error in self.read(path):
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
