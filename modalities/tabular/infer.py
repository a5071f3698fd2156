"""Reading table rows to predict on (`tessera predict`, `tessera serve`, `tessera explain`): each row of a CSV, TSV,
JSONL or Parquet table, a file or its bytes, encoded with the columns and categories the run learnt."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tessera.core.config import TabularConfig
from tessera.core.data.files import BadSample
from tessera.core.errors import UserError
from tessera.core.modality import InputLimits, ModalityIO
from tessera.modalities.tabular import encode_row, read_table


def predict_io(config: dict, folder: Path, limits: InputLimits):
    c = TabularConfig.model_validate(config["model"]["tabular"])

    def read(source: Path | bytes, name: str | None = None):
        """(name:row, {"numeric": [Fn], "categorical": [Fc]}, error) per row."""
        name = name or str(source)
        try:
            for n, row, error in read_table(source, name):
                try:
                    if error:
                        raise BadSample(error)
                    yield f"{name}:{n}", encode_row(row, c), None
                except BadSample as e:
                    yield f"{name}:{n}", None, str(e)
        except UserError as e:
            yield name, None, str(e)

    def batch(items: list[dict]) -> tuple[np.ndarray, ...]:
        return tuple(np.stack([item[k] for item in items]) for k in ("numeric", "categorical") if k in items[0])

    return read, batch


IO = ModalityIO(
    name="tabular",
    suffixes=frozenset({".csv", ".tsv", ".jsonl", ".parquet"}),
    predict_io=predict_io,
    json_input=("row", "rows", lambda row: row if isinstance(row, dict) else {}),
)
