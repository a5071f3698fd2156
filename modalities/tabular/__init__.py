"""Tabular data, FT-Transformer-style (Gorishniy et al., 2021, arXiv:2106.11959): each numeric feature becomes a
token by its own linear map (x_j * w_j + b_j), each categorical feature by an embedding of its value plus a bias
of its own, and [CLS] goes in front; the shared backbone does the rest. Features carry their identity in their
own weights, so no position embedding is needed.

Sources are tables (CSV, TSV, JSONL or Parquet) with a label column (model.tabular.label) and optionally a
`split` column. The label is a class, or with `model.tabular.kind: regression` a number to predict: a row whose
target is no number is quarantined, and a column where more than a tenth of the rows are (a column of classes
named as a regression target) stops prepare with one message. Numeric and categorical columns are declared in params.yaml or inferred from the training rows:
a column is numeric when at least 90% of its values there are numbers, so that a stray "n/a" is quarantined
rather than turning the column into categories. A row with a missing value, a number that is not one, or a
category that the training split never had is quarantined with the reason.
"""

from __future__ import annotations

import array
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tessera.core.config import ModelConfig, Params, SourceConfig, TabularConfig
from tessera.core.data.files import BadSample, Entry, atomic_write_text, field, read_rows, refuse_label, source_file, split_column
from tessera.core.errors import UserError
from tessera.core.kinds import KINDS
from tessera.core.modality import Modality, PrepareContext

NUMERIC_SHARE = 0.9  # a column is numeric when at least this share of its training values are numbers


class TabularAdapter(nn.Module):
    """forward(numeric [B, Fn] raw values, categorical [B, Fc] category indices) -> (tokens [B, 1 + Fn + Fc, D],
    None). Numeric values are standardised by the training set's mean and std (buffers) before their linear map."""

    def __init__(self, embed_dim: int, c: TabularConfig, drop_rate: float):
        super().__init__()
        numeric, categorical = c.numeric or [], c.categorical or []
        bound = 1 / math.sqrt(embed_dim)  # FT-Transformer's uniform init of the feature tokenizer
        self.num_weight = nn.Parameter(torch.empty(len(numeric), embed_dim).uniform_(-bound, bound))
        self.num_bias = nn.Parameter(torch.empty(len(numeric), embed_dim).uniform_(-bound, bound))
        self.register_buffer("mean", torch.tensor(c.mean or [0.0] * len(numeric), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(c.std or [1.0] * len(numeric), dtype=torch.float32))
        sizes = [len(c.categories.get(col, [])) for col in categorical]
        # one table for every column's values; column j's indices start at offsets[j]
        self.register_buffer("offsets", torch.tensor([0, *np.cumsum(sizes)[:-1]] if sizes else [], dtype=torch.long))
        self.cat_embed = nn.Embedding(max(1, sum(sizes)), embed_dim)
        self.cat_bias = nn.Parameter(torch.empty(len(categorical), embed_dim).uniform_(-bound, bound))
        nn.init.uniform_(self.cat_embed.weight, -bound, bound)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.drop = nn.Dropout(drop_rate)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, numeric: torch.Tensor | None = None, categorical: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        B = (numeric if numeric is not None else categorical).shape[0]  # a size, not len(): export keeps it dynamic
        parts = [self.cls_token.expand(B, -1, -1)]
        if numeric is not None:
            x = (numeric.float() - self.mean) / self.std  # [B, Fn]
            parts.append(x[..., None] * self.num_weight + self.num_bias)  # [B, Fn, D]
        if categorical is not None:
            parts.append(self.cat_embed(categorical + self.offsets) + self.cat_bias)  # [B, Fc, D]
        return self.drop(torch.cat(parts, dim=1)), None


def read_table(source: Path | bytes, name: str | None = None) -> Iterator[tuple[int, dict | None, str | None]]:
    """(row number, row or None, error or None) per row of a CSV, TSV, JSONL or Parquet table, a file or its bytes;
    `name` (default: the path) gives the format by its suffix and names the table in messages."""
    name = name or str(source)
    if Path(name).suffix.lower() != ".parquet":
        yield from read_rows(source, name)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(source, Path) and not source.is_file():
        raise UserError(f"{name}: {'not a regular file' if source.exists() else 'no such file'}")
    try:
        n = 0
        for batch in pq.ParquetFile(io.BytesIO(source) if isinstance(source, bytes) else source).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, row, None
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{name}: not a readable Parquet file ({e})") from None


FLOAT32_MAX = float(np.finfo(np.float32).max)


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def value_of(row: dict, column: str):
    if column not in row:
        raise BadSample(f"no column {column!r}")
    if missing(row[column]):
        raise BadSample(f"missing value in column {column!r}")
    return row[column]


def parse_number(value) -> float:
    """The value as a float; NaN for what is no number (a word, a bool)."""
    try:
        return float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        return math.nan


def as_number(value, column: str) -> float:
    """A finite number that float32 holds, else BadSample with the reason."""
    x = parse_number(value)
    if not math.isfinite(x):
        raise BadSample(f"column {column!r} is numeric, and {value!r} is not a finite number")
    if abs(x) > FLOAT32_MAX:
        raise BadSample(f"column {column!r}: {value!r} is beyond float32's range (3.4e38)")
    return x


def category(value) -> str:
    """A categorical value as one string whatever the file format: 1, "1" and 1.0 (a Parquet integer column with
    nulls arrives as floats) are "1"; true and "True" are "true"."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text.lower() if text.lower() in ("true", "false") else text


def encode_row(row: dict, c: TabularConfig) -> dict[str, np.ndarray]:
    """One row -> {"numeric": float32 [Fn] raw values, "categorical": int64 [Fc] category indices} (a key only where
    the table has such columns), for a config whose columns and categories are filled in."""
    out = {}
    if c.numeric:
        out["numeric"] = np.asarray([as_number(value_of(row, col), col) for col in c.numeric], dtype=np.float32)
    if c.categorical:
        idx = []
        for col in c.categorical:
            value, values = category(value_of(row, col)), c.categories[col]
            try:
                idx.append(values.index(value))
            except ValueError:
                shown = values if len(values) <= 10 else values[:10] + ["..."]
                raise BadSample(f"unknown category {value!r} in column {col!r}; the training split has {shown}") from None
        out["categorical"] = np.asarray(idx, dtype=np.int64)
    return out


def infer_columns(c: TabularConfig, rows: Iterable[dict], source: str = "the table") -> TabularConfig:
    """The config with its columns, categories and numeric statistics filled in from the training rows `rows`
    (features only). Both lists unset: numeric columns are those whose values are numbers (NUMERIC_SHARE of them),
    the rest categorical; one list set: the other takes every remaining column; both set: those alone.
    `rows` is read twice (a list, or an iterable that lists the rows afresh each time, as the loader's does), and
    none is kept: memory holds each categorical column's categories and 8 bytes per numeric value, so a table of
    millions of rows costs no more than their numbers."""
    counts: dict[str, list[int]] = {}  # column -> [values, of them finite numbers], columns in order of appearance
    for r in rows:
        for k, v in r.items():
            n = counts.setdefault(k, [0, 0])
            if not missing(v):
                n[0] += 1
                n[1] += math.isfinite(parse_number(v))
    columns = list(counts)
    if not columns:
        raise UserError(f"{source}: no feature columns in its training rows, only the label: a table needs at least "
                        "one column to predict from")
    both = set(c.numeric or []) & set(c.categorical or [])
    if both:
        raise UserError(f"model.tabular: columns {sorted(both)} are declared both numeric and categorical; keep each in one list")
    for col in [*(c.numeric or []), *(c.categorical or [])]:
        if col not in columns:
            raise UserError(f"model.tabular: column {col!r} is in no training row of {source}; its columns are {columns}")
    numeric, categorical = c.numeric, c.categorical
    rest = [col for col in columns if col not in (numeric or []) + (categorical or [])]
    if numeric is None and categorical is None:
        numeric = [col for col in rest if counts[col][0] and counts[col][1] >= NUMERIC_SHARE * counts[col][0]]
        categorical = [col for col in rest if col not in numeric]
    elif numeric is None:
        numeric = rest
    elif categorical is None:
        categorical = rest
    found: dict[str, set] = {col: set() for col in categorical}
    values = {col: array.array("d") for col in numeric}
    for r in rows:
        for col, seen in found.items():
            if col in r and not missing(r[col]):
                seen.add(category(r[col]))
        for col, vs in values.items():
            try:
                vs.append(as_number(value_of(r, col), col))
            except BadSample:
                pass
    stats = []
    for col in numeric:
        x = np.frombuffer(values[col], dtype=np.float64) if len(values[col]) else np.zeros(1)
        stats.append((float(x.mean()), float(x.std()) or 1.0))
    return c.model_copy(update={"numeric": numeric, "categorical": categorical,
                                "categories": {col: sorted(seen) for col, seen in found.items()},
                                "mean": [m for m, _ in stats], "std": [s for _, s in stats]})


# -- what the rest of Tessera knows about tables (core/modality.py)

COLUMNS = "columns.json"  # the filled-in column facts, beside the shards


def regression_target(row: dict, label: str):
    """The row's target as a number, or BadSample naming the column."""
    value = field(row, label)
    if not math.isfinite(parse_number(value)):
        raise BadSample(f"column {label!r} is the regression target (model.tabular.kind), and {value!r} is not a number")
    return value


def _list_source(src: SourceConfig, path: str, params: Params) -> tuple[list[str] | None, Iterator[Entry]]:
    """(None: the classes are the labels; with kind regression, [the label column]: one target), the rows."""
    p, label, regression = Path(path), params.model.tabular.label, params.model.tabular.kind == "regression"

    def entries() -> Iterator[Entry]:
        rows, words = 0, []
        for n, row, error in read_table(p):
            source = f"{p}:{n}"
            try:
                if error:
                    raise BadSample(error)
                features = {k: v for k, v in row.items() if k not in (label, "split")}
                rows += 1
                target = regression_target(row, label) if regression else field(row, label)
                yield Entry(source, target, payload=features, split=split_column(row))
            except BadSample as e:
                if regression and label in (row or {}) and not missing(row[label]):
                    words.append(row[label])
                yield Entry(source, None, error=str(e))
        if len(words) > (1 - NUMERIC_SHARE) * rows:
            raise UserError(f"{p}: column {label!r} is the regression target (model.tabular.kind: regression), but "
                            f"{len(words)} of its {rows} rows hold no number (e.g. {words[:3]}); name a column of "
                            f"numbers in model.tabular.label, or set model.tabular.kind: classification for classes")

    source_file(path, "tabular")
    return ([label] if regression else None), entries()


def _list_unlabelled(src: SourceConfig, path: str, params: Params) -> Iterator[Entry]:
    """The rows of a table without the label column (model.tabular.label), read with the training split's columns;
    `split` is ignored."""
    p, label = source_file(path, "tabular.unlabelled"), params.model.tabular.label

    def entries() -> Iterator[Entry]:
        for n, row, error in read_table(p):
            source = f"{p}:{n}"
            if row is not None:
                refuse_label(row, label, source, "tabular")
            yield Entry(source, None, error=error) if error else Entry(
                source, None, payload={k: v for k, v in row.items() if k != "split"})

    return entries()


class Relisted:
    """An iterable whose every iteration lists its items afresh from `listing`: the training rows, read again
    rather than held (held as dicts, a million records raised prepare's peak RSS by 260 MB; benchmarks/RESULTS.md)."""

    def __init__(self, listing: Callable[[], Iterator]):
        self.listing = listing

    def __iter__(self) -> Iterator:
        return iter(self.listing())


def _loader(ctx: PrepareContext):
    rows = Relisted(lambda: (e.payload for e in ctx.train_entries()))
    if next(iter(rows), None) is None:
        raise UserError(f"prepare.sources.tabular: no training row has a usable label in column "
                        f"{ctx.params.model.tabular.label!r} (model.tabular.label); name the column that holds the classes")
    c = infer_columns(ctx.params.model.tabular, rows, ctx.params.prepare.sources["tabular"].train)
    atomic_write_text(ctx.folder / COLUMNS, json.dumps(c.model_dump(include={"numeric", "categorical", "categories", "mean", "std"})))
    return lambda e: encode_row(e.payload, c)


def _from_data(cfg: ModelConfig, folder: Path, meta: dict) -> None:
    cfg.tabular = cfg.tabular.model_copy(update=json.loads((folder / COLUMNS).read_text()))


def _collate(batch: dict) -> tuple[dict, torch.Tensor]:
    return {k: batch[k] for k in ("numeric", "categorical") if k in batch}, batch["label"]


def contract(c: TabularConfig) -> list[dict]:
    inputs = []
    if c.numeric:
        inputs.append({"name": "numeric", "dtype": "float32", "shape": ["batch", len(c.numeric)],
                       "meaning": f"raw values of columns {c.numeric}"})
    if c.categorical:
        inputs.append({"name": "categorical", "dtype": "int64", "shape": ["batch", len(c.categorical)],
                       "meaning": f"category indices of columns {c.categorical} (config.json: model.tabular.categories)"})
    return inputs


def _example(c: TabularConfig, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    args = []
    if c.numeric:
        args.append(torch.randn(batch, len(c.numeric), generator=g) * torch.tensor(c.std) + torch.tensor(c.mean))
    if c.categorical:
        args.append(torch.stack([torch.randint(0, len(c.categories[col]), (batch,), generator=g) for col in c.categorical], 1))
    return tuple(args)


MODALITY = Modality(
    name="tabular",
    formats=("table",),
    list_source=_list_source,
    list_unlabelled=_list_unlabelled,
    kind=lambda cfg: KINDS[cfg.tabular.kind],
    prepare_keys=("model.tabular.label", "model.tabular.kind", "model.tabular.numeric", "model.tabular.categorical"),
    loader=_loader,
    collate=_collate,
    files=False,  # rows, in the listing itself
    adapter=lambda cfg: TabularAdapter(cfg.backbone().embed_dim, cfg.tabular, cfg.drop_rate),
    from_data=_from_data,
    inputs=lambda cfg: contract(cfg.tabular),
    to_inputs=lambda x: tuple(x[k] for k in ("numeric", "categorical") if k in x),
    from_inputs=lambda cfg, args: dict(zip([i["name"] for i in contract(cfg.tabular)], args)),
    example=lambda cfg, batch: _example(cfg.tabular, batch),
)
