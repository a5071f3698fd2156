"""A prediction request's body -> its inputs, each read by the task's own reader (the checks `tessera predict`
makes), and the options its records are made with; a request we cannot read is Refused with its 4xx."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from tessera.core.config import ServeConfig
from tessera.core.entry.predict import Predictor, unusable
from tessera.core.serve.batching import Options
from tessera.modalities.io import READERS

MAX_FILES = 1024  # files in one batch request
# Bodies up to INLINE_BYTES (a digit PNG, a 1 s clip at 16 kHz) are read on the event loop: handing each to the
# thread pool cost more than reading it, its threads contending for the GIL with the loop (benchmarks/RESULTS.md,
# Serving). Larger ones are read in a thread, so as not to hold up the others.
INLINE_BYTES = 2**16
Input = tuple[str, object, str | None]  # (source, what the reader gave or None, why it could not be read or None)


class Refused(Exception):
    """A request we answer with a 4xx (or 503): `kind` is the error's name in the answer and in the metrics."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


async def parse_request(request: Request, task: str, predictor: Predictor, many: bool,
                        cfg: ServeConfig) -> tuple[list[Input], Options]:
    """The request's inputs and its options (query parameters, or form fields, over serve.top_k and
    serve.threshold); Refused for a request that holds no input we can read, or an option we cannot take."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await read_body(request, cfg.max_body_mb)
    if predictor.fused:
        return await fused_request(raw, kind, request, task, predictor, many, cfg)
    if kind == "application/json":
        rows = json_rows(raw, task, predictor, many)
        options = options_of(dict(request.query_params), cfg)
        return await on_loop_or_thread(len(raw), decode_rows, predictor, rows), options
    if kind == "multipart/form-data":
        uploads, fields = await multipart(raw, request.headers, task, predictor, many)
        options = options_of({**request.query_params, **fields}, cfg)
        return await on_loop_or_thread(len(raw), decode_uploads, predictor, uploads), options
    if not kind or not raw:
        raise Refused(400, "no_input", "an empty request: send a file as multipart field `file`, or JSON for text")
    raise Refused(415, "unsupported_type", f"content type {kind}: send multipart/form-data (files) or application/json (text)")


async def read_body(request: Request, max_mb: float) -> bytes:
    """The request's body, refused (413) as soon as it passes `max_mb` MB."""
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_mb * 2**20:
            raise Refused(413, "too_large", f"the body passed serve.max_body_mb ({max_mb:g} MB)")
        chunks.append(chunk)
    return b"".join(chunks)


def json_rows(raw: bytes, task: str, predictor: Predictor, many: bool) -> list[dict]:
    """A JSON body's inputs as the rows the task's reader takes ({"text": ...} -> {"text": ...})."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested past the parser, a number too long
        raise Refused(400, "bad_json", f"the body is not JSON we can read ({type(e).__name__}: {str(e)[:200]})") from None
    if predictor.modality.json_input is None:
        raise Refused(415, "wrong_modality", f"task {task} reads files ({', '.join(sorted(predictor.modality.suffixes))}) "
                      "as multipart uploads (field `file`), not JSON")
    one, several, to_row = predictor.modality.json_input
    key = several if many else one
    if not isinstance(body, dict) or key not in body:
        raise Refused(400, "bad_json", f'send {{"{key}": ...}} to /predict/{task}{"/batch" if many else ""}')
    values = body[key] if many else [body[key]]
    if not isinstance(values, list) or not values:
        raise Refused(400, "bad_json", f'"{key}" must be a non-empty list')
    return [to_row(v) for v in values]


async def multipart(raw: bytes, headers: Headers, task: str, predictor: Predictor,
                    many: bool) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """A multipart body's files (name, bytes) and its other fields {name: value}."""
    async def one_chunk():
        yield raw

    try:
        form = await MultiPartParser(headers, one_chunk(), max_files=MAX_FILES, max_fields=16).parse()
    except MultiPartException as e:
        raise Refused(400, "bad_multipart", f"an unreadable multipart body ({e.message})") from None
    uploads, fields = [], {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            check_suffix(task, predictor, value.filename or "")
            uploads.append((value.filename or "upload", await value.read()))
        else:
            fields[key] = value
    if not uploads:
        raise Refused(400, "no_input", "no file in the multipart form: send each input as field `file`")
    if not many and len(uploads) > 1:
        raise Refused(400, "one_input", f"{len(uploads)} files sent to /predict/{task}, which takes one; "
                      f"use /predict/{task}/batch")
    if any(not data for _, data in uploads):
        raise Refused(400, "empty_input", f"{next(n for n, d in uploads if not d)}: an empty file")
    return uploads, fields


async def fused_request(raw: bytes, kind: str, request: Request, task: str, predictor: Predictor, many: bool,
                        cfg: ServeConfig) -> tuple[list[Input], Options]:
    """A fused task's request: one record as one multipart form, a field per input (a file upload for an input
    read from files, a JSON value for a text or a row of table values), a field left out = an input the record
    lacks; the other fields are options. -> [(source "record", its Record, or why it has no usable input)]."""
    inputs = predictor.fused.modalities
    if many:
        raise Refused(400, "one_input", f"/predict/{task} takes one record (a field per input); send records as "
                      "concurrent requests, which are batched together")
    if kind != "multipart/form-data":
        raise Refused(415, "unsupported_type", f"content type {kind or 'none'}: task {task} takes one multipart form "
                      f"with a field per input ({', '.join(inputs)})")

    async def one_chunk():
        yield raw

    try:
        form = await MultiPartParser(request.headers, one_chunk(), max_files=len(inputs), max_fields=len(inputs) + 2).parse()
    except MultiPartException as e:
        raise Refused(400, "bad_multipart", f"an unreadable multipart body ({e.message})") from None
    values, names, fields = {}, {}, {}
    for key, value in form.multi_items():
        if key not in inputs:
            if isinstance(value, UploadFile) or key not in Options._fields:
                raise Refused(422, "bad_parameter", f"field {key!r}: not an input of task {task} nor an option; its "
                              f"inputs are {', '.join(inputs)}, the options {' and '.join(Options._fields)}")
            fields[key] = value
            continue
        takes_json = READERS[inputs[key]].json_input is not None
        if key in values:
            raise Refused(400, "one_input", f"field {key!r} given twice; a record has one value per input")
        if isinstance(value, UploadFile) == takes_json:
            want = "a JSON value (a text as a JSON string, table values as an object)" if takes_json else "a file upload"
            raise Refused(400, "wrong_field", f"field {key!r} ({inputs[key]}) takes {want}")
        if takes_json:
            try:
                values[key] = json.loads(value)
            except (ValueError, RecursionError):
                raise Refused(400, "bad_json", f"field {key!r}: not JSON (a text goes as a JSON string: \"a red mug\")") from None
        else:
            check_suffix(task, predictor, value.filename or "", READERS[inputs[key]].suffixes, key)
            values[key], names[key] = await value.read(), value.filename or f"{key}.upload"
    if not values:
        raise Refused(400, "no_input", f"no input field in the form: send at least one of {', '.join(inputs)}")
    options = options_of({**request.query_params, **fields}, cfg)
    record = await on_loop_or_thread(len(raw), predictor.fused.read, values, None, names)
    return [("record", record, None if record.items else f"no usable input ({unusable(record)})")], options


def check_suffix(task: str, predictor: Predictor, name: str, suffixes: frozenset[str] | None = None,
                 field: str = "file") -> None:
    """An upload's suffix against what the task (a fused task's input `field`: `suffixes`) reads; 415 otherwise."""
    suffixes = suffixes or predictor.modality.suffixes
    suffix = Path(name).suffix.lower()
    if suffix and suffix not in suffixes:
        others = sorted(m for m, spec in READERS.items() if suffix in spec.suffixes)
        raise Refused(415, "wrong_modality" if others else "unsupported_type",
                      f"{name}: task {task} reads {', '.join(sorted(suffixes))} files" + (f" in field {field!r}" if field != "file" else "")
                      + (f"; {suffix} is an input of {', '.join(others)}" if others else ""))


def options_of(given: Mapping[str, str], cfg: ServeConfig) -> Options:
    """top_k and threshold as a request sets them, else serve.top_k and serve.threshold; 422 naming the field
    for a value we cannot take, or for a name that is not an option."""
    unknown = sorted(given.keys() - set(Options._fields))
    if unknown:
        raise Refused(422, "bad_parameter", f"{unknown[0]}: not an option; the options are {' and '.join(Options._fields)}")
    return Options(top_k=option(given, "top_k", cfg.top_k, int, lambda k: k >= 1, "a whole number of classes, 1 or more"),
                   threshold=option(given, "threshold", cfg.threshold, float, lambda t: 0 <= t <= 1,  # NaN fails too
                                    "a number from 0 to 1 (the lowest score of a box listed)"))


def option(given: Mapping[str, str], name: str, default, parse: Callable[[str], Any], ok: Callable[[Any], bool], want: str):
    """given[name] parsed and checked, or `default` if the request does not set it."""
    if name not in given:
        return default
    try:
        value = parse(given[name])
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise Refused(422, "bad_parameter", f"{name}: {want} (got {given[name]!r})")
    return value


async def on_loop_or_thread(size: int, read: Callable, *args):
    """read(*args) on the event loop for a body of `size` <= INLINE_BYTES bytes, in a thread for a larger one."""
    if size <= INLINE_BYTES:
        return read(*args)
    return await asyncio.to_thread(read, *args)


def decode_rows(predictor: Predictor, rows: list[dict]) -> list[Input]:
    """JSON inputs (texts, table rows) read as the lines of one JSONL upload; sources `input <n>`."""
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    found = decode_uploads(predictor, [("input.jsonl", jsonl)])
    return [(f"input {n}", item, error) for n, (_, item, error) in enumerate(found)]


def decode_uploads(predictor: Predictor, uploads: list[tuple[str, bytes]]) -> list[Input]:
    """Uploaded files (name, bytes) -> each input in them, decoded from memory by the task's reader (the name's suffix
    picks a table's or a text file's format), its source and error naming the upload."""
    return [found for name, data in uploads for found in predictor.read(data, name)]
