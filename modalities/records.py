"""Records: a table (CSV, TSV, JSONL or Parquet) whose rows are samples and whose columns are inputs of several
modalities: an image path, an audio path, a text, numeric and categorical values, and the record's class (the
target). What each column kind is lives here, so that the rest of Tessera names no modality:

- each image, audio and text column is one input, prepared by its modality's own loader, limits and cache key as
  a source of that modality alone would be (core/stages/prepare.py: prepare_records);
- the numeric and categorical columns together are one input, "table", prepared by the tabular modality.

A path in a cell is relative to the table's folder and may not leave prepare.root (`resolve_inside`). An empty cell: the
record lacks that input. Kinds left undeclared (prepare.sources.<name>.columns: null) are inferred from the
training table; a declared kind that the column's values contradict stops prepare (`check_kinds`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tessera.core.config import COLUMN_NAME, Params, SourceConfig
from tessera.core.data.files import (BadSample, Entry, field, hash_split, resolve_inside, split_column, text_hash)
from tessera.core.errors import UserError
from tessera.modalities import audio, image
from tessera.modalities.tabular import NUMERIC_SHARE, missing, parse_number, read_table

KINDS = {"image": "image", "audio": "audio", "text": "text", "numeric": "tabular", "categorical": "tabular"}
"""A column's kind -> the modality that prepares it."""
FILES = {"image": image.SUFFIXES, "audio": audio.SUFFIXES}  # kinds whose cells are paths, told apart by suffix
TABLE = "table"  # the input of every numeric and categorical column together
INFER_VALUES = 10_000  # values per column that inference and the kind check read: memory stays flat
CATEGORY_CHARS = 32  # a categorical value is a short string, repeated: longer or mostly unique strings are text


@dataclass(frozen=True)
class Input:
    """One input of a records source: its name (a column, or TABLE), the modality preparing it, its columns."""

    name: str
    modality: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Record:
    """One row of a records table: `source` "table:line"; its split; its target, or the error that keeps it out."""

    source: str
    line: int  # its row's line in the table (the key of its cells in each input's shards)
    row: dict | None
    split: str
    target: str | None
    error: str | None


def list_records(src: SourceConfig, params: Params, declared: str) -> Iterator[Record]:
    """The records of the `declared` source (train / test), in table order. A record's split is its table's `split`
    column, else chosen by the hash of its cells (every column of a record lands in the same split)."""
    table, prep = Path(getattr(src, declared)), params.prepare
    for n, row, error in read_table(table):
        source, split = f"{table}:{n}", declared
        try:
            if error:
                raise BadSample(error)
            cells = {k: v for k, v in row.items() if k != "split"}
            digest = text_hash(json.dumps(cells, sort_keys=True, default=str))
            split = split_column(row) or hash_split(declared, digest, prep.val_fraction, prep.test_fraction,
                                                    src.test is not None)
            target = field(row, src.target) if not missing(row.get(src.target)) else None
            yield Record(source, n, row, split, target, None if target else f"no target in column {src.target!r}")
        except BadSample as e:
            yield Record(source, n, None, split, None, str(e))


def guess(values: list) -> str:
    """The kind of a column from its non-empty values: paths by suffix, numbers numeric, short repeated strings
    categorical, any other strings text."""
    for kind, suffixes in FILES.items():
        if 2 * sum(Path(str(v).strip()).suffix.lower() in suffixes for v in values) >= len(values):
            return kind
    if sum(parse_number(v) == parse_number(v) for v in values) >= NUMERIC_SHARE * len(values):  # NaN != NaN
        return "numeric"
    short = all(len(str(v).strip()) <= CATEGORY_CHARS for v in values)
    return "categorical" if short and 2 * len({str(v).strip() for v in values}) <= len(values) else "text"


def column_values(src: SourceConfig) -> dict[str, list]:
    """Up to INFER_VALUES non-empty values of each column of the training table but `split`; every column any row
    has, empty ones included."""
    values: dict[str, list] = {}
    for _, row, error in read_table(Path(src.train)):
        for k, v in (row or {}).items():
            seen = values.setdefault(k, [])
            if k != "split" and not missing(v) and len(seen) < INFER_VALUES:
                seen.append(v)
    values.pop("split", None)
    return values


def check_kinds(name: str, src: SourceConfig) -> dict[str, str]:
    """column -> kind, declared or inferred, each checked against the training table's values: a column declared as
    one kind that holds another stops prepare with the table, the column and the fix."""
    key = f"prepare.sources.{name}"
    values = column_values(src)
    if src.target not in values:
        raise UserError(f"{src.train}: no column {src.target!r} ({key}.target); its columns are {list(values)}")
    values.pop(src.target)
    if not values:
        raise UserError(f"{src.train}: no column besides the target {src.target!r}; a records table needs inputs")
    kinds = dict(src.columns) if src.columns is not None else {c: guess(v) for c, v in values.items() if v}
    for column, kind in kinds.items():
        if not COLUMN_NAME.fullmatch(column):  # declared names are checked with params.yaml; inferred ones here
            raise UserError(f"{src.train}: column {column!r} is prepared into a folder of its name, so use letters, "
                            f"digits, _ and - (rename it in the table), or leave it out of {key}.columns")
        if kind not in KINDS:
            raise UserError(f"{key}.columns.{column}: {kind!r} is not a column kind; use one of {list(KINDS)}")
        if column not in values:
            raise UserError(f"{src.train}: no column {column!r} ({key}.columns); its columns are {list(values)}")
        seen = values[column]
        if not seen:
            raise UserError(f"{src.train}: column {column!r} is empty in every row; fill it, or remove it from {key}.columns")
        found = guess(seen)
        wrong = (kind in FILES and found != kind) or (kind == "numeric" and found != "numeric") or \
                (kind not in FILES and found in FILES)
        if wrong:
            example = next((v for v in seen if guess([v]) == found), seen[0])
            raise UserError(f"{src.train}: column {column!r} is declared {kind} ({key}.columns), but its values look "
                            f"{found} (e.g. {str(example)[:60]!r}); declare it {found}, or fix the column")
    if not kinds:
        raise UserError(f"{src.train}: every column but the target is empty; a records table needs inputs")
    if TABLE in kinds and KINDS[kinds[TABLE]] != KINDS["numeric"]:
        raise UserError(f"{src.train}: column {TABLE!r} is {kinds[TABLE]}, and {TABLE!r} names the input of the "
                        "numeric and categorical columns; rename the column")
    return kinds


def inputs_of(kinds: dict[str, str]) -> list[Input]:
    """The inputs: each image, audio and text column alone, in table order, then the numeric and categorical ones as
    one TABLE input."""
    alone = [Input(c, KINDS[k], (c,)) for c, k in kinds.items() if KINDS[k] != KINDS["numeric"]]
    table = tuple(c for c, k in kinds.items() if KINDS[k] == KINDS["numeric"])
    return alone + ([Input(TABLE, KINDS["numeric"], table)] if table else [])


def input_params(params: Params, source: str, src: SourceConfig, kinds: dict[str, str], inp: Input) -> Params:
    """The params under which input `inp` of records source `source` is prepared as its modality's own source:
    prepare.sources holds it alone, the model section is the input's own (model.inputs), and the table's columns
    are the tabular section's (declared both numeric and categorical: those alone)."""
    one = src.model_copy(update={"columns": {c: kinds[c] for c in inp.columns}})
    model = params.model.for_input(f"{source}.{inp.name}", inp.modality)
    if inp.modality == KINDS["numeric"]:
        model = model.model_copy(update={"tabular": model.tabular.model_copy(update={
            "label": src.target, "numeric": [c for c in inp.columns if kinds[c] == "numeric"],
            "categorical": [c for c in inp.columns if kinds[c] == "categorical"]})})
    return params.model_copy(update={"model": model,
                                     "prepare": params.prepare.model_copy(update={"sources": {inp.modality: one}})})


def input_entries(src: SourceConfig, params: Params, declared: str, inp: Input, classes: list[str]) -> Iterator[Entry]:
    """Entries of input `inp` for the usable records of the `declared` source, as its modality's loader takes them
    (a file's path, a text, a row of table values), each named by its record and carrying the record's split and
    target. A record whose cells of `inp` are all empty lacks it: it has no entry."""
    folder, root = Path(getattr(src, declared)).parent.resolve(), Path(params.prepare.root)
    for r in list_records(src, params, declared):
        if r.error or (r.split == "test" and r.target not in classes):
            continue
        cells = {c: r.row.get(c) for c in inp.columns}
        if all(missing(v) for v in cells.values()):
            continue
        if inp.modality == KINDS["numeric"]:
            yield Entry(r.source, r.target, payload=cells, split=r.split)
            continue
        value = str(cells[inp.name]).strip()
        if inp.modality not in FILES:  # a text
            yield Entry(r.source, r.target, payload=value, split=r.split)
            continue
        try:
            yield Entry(r.source, r.target, resolve_inside(root, str(folder / value)), split=r.split)  # root / absolute = it
        except BadSample as e:
            yield Entry(r.source, r.target, error=str(e), split=r.split)  # quarantine.jsonl names the column


def read_records(table: Path, inputs: list[dict]) -> Iterator[tuple[int, dict, str | None]]:
    """(row number, {input: its value} by `input_values`, error or None) per row of a records table (CSV, TSV,
    JSONL, Parquet): what `tessera predict` reads a fused task's records from."""
    for n, row, error in read_table(table):
        yield n, {} if error else input_values(row, inputs), error


def input_values(row: dict, inputs: list[dict]) -> dict[str, object]:
    """A records table's row -> {input: its value} for the inputs a fused export's config.json names (`fused`:
    name, modality, config), leaving out those the row lacks (empty cells): an image, audio or text input's cell
    (a path, or a text), or the TABLE input's cells as {column: value} (its model config's numeric and categorical
    columns; present when any is filled). What `tessera predict` reads each row's inputs from."""
    values = {}
    for i in inputs:
        if i["modality"] == KINDS["numeric"]:
            cells = {c: row.get(c) for c in [*(i["config"]["numeric"] or []), *(i["config"]["categorical"] or [])]}
            if not all(missing(v) for v in cells.values()):
                values[i["name"]] = cells
        elif not missing(row.get(i["name"])):
            values[i["name"]] = row[i["name"]]
    return values
