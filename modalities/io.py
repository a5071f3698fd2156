"""How each modality reads a user's input to predict on, declared in its infer.py as one `ModalityIO`
(core/modality.py): what `tessera predict`, `tessera serve` and `tessera explain` import. Training never does."""

from __future__ import annotations

import json
from pathlib import Path

from tessera.core.modality import ModalityIO
from tessera.modalities.audio import infer as audio
from tessera.modalities.detection import infer as detection
from tessera.modalities.image import infer as image
from tessera.modalities.tabular import infer as tabular
from tessera.modalities.text import infer as text

READERS: dict[str, ModalityIO] = {m.name: m for m in (image.IO, audio.IO, text.IO, detection.IO, tabular.IO)}


def read_input(modality: str, read, value, base: Path | None = None, name: str | None = None) -> tuple[object, str | None]:
    """One input of a record, read by its modality's reader `read` (ModalityIO.predict_io's) -> (item, None), or
    (None, why not). `value`: a file's bytes (an upload, `name` its file name), a path relative to `base` (a
    records table's cell, for a modality read from files), or a JSON value (a text, a row of table values) for a
    modality that takes JSON (`json_input`)."""
    io = READERS[modality]
    if io.json_input is not None and not isinstance(value, bytes):
        value, name = (json.dumps(io.json_input[2](value)) + "\n").encode(), "input.jsonl"
    elif not isinstance(value, bytes):
        value, name = (base or Path(".")) / str(value).strip(), None
    found = [(item, error) for _, item, error in read(value, name)]
    if len(found) != 1:
        return None, f"holds {len(found)} inputs, not one"
    return found[0]
