"""Reading texts to predict on (`tessera predict`, `tessera serve`, `tessera explain`): the lines of a .txt file, or
the `text` field of each record of a .jsonl / .csv file, a file or its bytes; encoded by the run's tokenizer.json."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tessera.core.data.files import read_rows
from tessera.core.modality import InputLimits, ModalityIO
from tessera.modalities.text import encode, load_tokenizer


def valid_unicode(text: str) -> bool:
    """False for a string the tokenizer cannot take: JSON can carry lone surrogates (\\ud800), UTF-8 cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_texts(source: Path | bytes, name: str | None = None) -> Iterator[tuple[str, str | None, str | None]]:
    """(source, text, error) per input: one per non-empty line of a .txt file, or per record of a .jsonl / .csv file
    with a `text` field. `name` (default: the path) names the inputs and, by its suffix, gives the format."""
    name = name or str(source)
    if isinstance(source, Path) and not source.is_file():
        yield name, None, "missing file"
        return
    if Path(name).suffix.lower() in (".jsonl", ".csv"):
        for n, row, error in read_rows(source, name):
            text = (row or {}).get("text")
            ok = isinstance(text, str) and text.strip()
            if ok and not valid_unicode(text):
                ok, error = False, error or "not valid Unicode (a lone surrogate, e.g. \\ud800)"
            yield f"{name}:{n}", text if ok else None, error or (None if ok else "no `text` field, or it is not a non-empty string")
        return
    try:
        lines = (source if isinstance(source, bytes) else source.read_bytes()).decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        yield name, None, f"not UTF-8 text ({e.reason} at byte {e.start})"
        return
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield f"{name}:{n}", line.strip(), None


def predict_io(config: dict, folder: Path, limits: InputLimits):
    tok = load_tokenizer(folder / "tokenizer.json")
    max_len = config["model"]["text"]["max_len"]

    def batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (input_ids [B, L], pad_mask [B, L]), L the longest at most max_len."""
        ids, pad_mask = encode(tok, texts, max_len)
        return ids.numpy(), pad_mask.numpy()

    return read_texts, batch


IO = ModalityIO(
    name="text",
    suffixes=frozenset({".txt", ".jsonl", ".csv"}),
    predict_io=predict_io,
    json_input=("text", "texts", lambda text: {"text": text}),
)
