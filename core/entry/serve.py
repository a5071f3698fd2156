"""`tessera serve`: every exported task behind HTTP (FastAPI on uvicorn), each task's concurrent requests batched
into one ONNX Runtime call.

    GET  /                      a page to try the models (serve_page.html: no CDN, no build step)
    GET  /health                the process is up
    GET  /ready                 every model loaded and its warm-up check passed (503 until then, or naming why not)
    GET  /info                  the tasks (classes, input contract, outputs), the model card, the version served
    GET  /metrics               Prometheus text: requests, errors by kind, latency, batch sizes, queue depth
    POST /predict/{task}        one input: a file (multipart field `file`), or JSON {"text": ...} / {"row": {...}}
    POST /predict/{task}/batch  several: files, or JSON {"texts": [...]} / {"rows": [...]}
    POST /admin/reload          (serve.admin; from localhost only) serve the export now on disk; requests in
                                flight finish on the models they started on

An answer is `tessera predict`'s record for that input (core/entry/predict.py), the same whether the input was
batched with others or not: ragged inputs are padded with the masks the models take. A bad input is a 4xx JSON
error {"error": kind, "detail": what and the fix, "request_id"}; a failure of ours is a 500 whose traceback goes
to the log under its request id, never to the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from safetensors import safe_open
from safetensors.numpy import load_file
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from tessera.core.config import PrepareConfig, ServeConfig
from tessera.core.entry.predict import Predictor
from tessera.core.errors import UserError
from tessera.core.modality import InputLimits
from tessera.modalities.io import READERS

log = logging.getLogger("tessera.serve")
PAGE = Path(__file__).with_name("serve_page.html")
MAX_FILES = 1024  # files in one batch request
# Bodies up to INLINE_BYTES (a digit PNG, a 1 s clip at 16 kHz) are read on the event loop: handing each to the
# thread pool cost more than reading it, its threads contending for the GIL with the loop (benchmarks/RESULTS.md,
# Serving). Larger ones are read in a thread, so as not to hold up the others.
INLINE_BYTES = 2**16


class Refused(Exception):
    """A request we answer with a 4xx (or 503): `kind` is the error's name in the answer and in the metrics."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tessera_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("tessera_errors", "Requests refused or failed, by kind", ["kind"], registry=r)
        self.latency = Histogram("tessera_request_seconds", "Time to answer a request", ["endpoint"], registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch = Histogram("tessera_batch_size", "Inputs per ONNX Runtime call", ["task"], registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue = Gauge("tessera_queue_depth", "Inputs waiting for a batch", ["task"], registry=r)


class Batcher:
    """A task's inputs gathered into ONNX Runtime calls of at most `max_batch`: the first waiting request opens a
    batch, which takes the requests that arrive within `max_wait_ms` or until it is full. One call runs at a time
    per task; requests that arrive meanwhile make the next batch."""

    def __init__(self, task: str, predictor: Predictor, cfg: ServeConfig, metrics: Metrics):
        self.task, self.predictor, self.cfg, self.metrics = task, predictor, cfg, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.runner: asyncio.Task | None = None
        self.coming = 0  # requests for the task still being read: what a batch may wait for

    async def predict(self, sources: list[str], items: list) -> list[dict]:
        if self.runner is None:
            self.runner = asyncio.create_task(self.run())
        done = asyncio.get_running_loop().create_future()
        self.metrics.queue.labels(self.task).inc(len(items))
        await self.queue.put((sources, items, done))
        return await done

    async def run(self) -> None:
        """Batches until `close` queues its None, answering everything queued before it."""
        loop, stop = asyncio.get_running_loop(), False
        while not stop:
            first = await self.queue.get()
            if first is None:
                return
            jobs, n, deadline = [first], len(first[1]), loop.time() + self.cfg.max_wait_ms / 1000
            while n < self.cfg.max_batch and (self.coming or not self.queue.empty()):  # alone: no wait, no latency
                try:
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        job = await self.queue.get()
                except TimeoutError:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
                n += len(job[1])
            self.metrics.queue.labels(self.task).dec(n)
            await self._answer(jobs)

    async def _answer(self, jobs: list) -> None:
        sources = [s for job in jobs for s in job[0]]
        items = [i for job in jobs for i in job[1]]
        try:
            records = []
            for a in range(0, len(items), self.cfg.max_batch):  # a batch request larger than max_batch: in parts
                part = slice(a, a + self.cfg.max_batch)
                self.metrics.batch.labels(self.task).observe(len(items[part]))
                records += await asyncio.to_thread(self.predictor.records, sources[part], items[part],
                                                   self.cfg.top_k, self.cfg.threshold)
        except Exception as e:
            if len(jobs) > 1:  # each request again on its own: only the one the model fails on gets the error
                for job in jobs:
                    await self._answer([job])
                return
            if not jobs[0][2].done():
                jobs[0][2].set_exception(e)  # a 500, its traceback in the log under the request id
            return
        for sources_, _, done in jobs:
            if not done.done():  # a client that went away cancelled its future
                done.set_result(records[: len(sources_)])
            records = records[len(sources_):]

    async def close(self) -> None:
        """Answers what is queued, then stops."""
        if self.runner:
            await self.queue.put(None)
            await self.runner


def export_hash(folder: Path) -> str:
    """DVC's hash of a folder (`md5: ....dir` in dvc.lock): the md5 of the sorted JSON list of each file's md5 and
    relative path. The same export gives the same hash wherever it was fetched (`dvc artifacts get`, a copy)."""
    entries = [{"md5": hashlib.md5(f.read_bytes()).hexdigest(), "relpath": f.relative_to(folder).as_posix()}
               for f in sorted(p for p in folder.rglob("*") if p.is_file())]
    return hashlib.md5(json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True).encode()).hexdigest() + ".dir"


def fetch(artifact: str, repo: str, folder: Path) -> dict:
    """Downloads `name@version` (or `name`: its latest registered version) of a DVC artifact of `repo` into
    `folder` with `dvc artifacts get`; -> what /info reports of it."""
    name, _, rev = artifact.partition("@")
    cmd = [sys.executable, "-m", "dvc", "artifacts", "get", repo, name, "-o", str(folder), "--force"] + (["--rev", rev] if rev else [])
    got = subprocess.run(cmd, capture_output=True, text=True)
    if got.returncode:
        raise UserError(f"dvc artifacts get {repo} {name}{' --rev ' + rev if rev else ''} failed: "
                        f"{got.stderr.strip()[-600:]}. A version is a git tag that `gto register {name}` makes")
    return {"artifact": name, "artifact_version": rev or "latest", "artifact_repo": repo}


def version(folder: Path) -> dict:
    """What is served: DVC's hash of the export folder; where it lies in a git repository, the commit checked out
    and whether that commit's dvc.lock records this very export (false: it was changed or rebuilt since)."""
    folder = folder.resolve()
    v = {"dvc_md5": export_hash(folder), "git_commit": None, "matches_dvc_lock": None}
    git = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=folder, capture_output=True, text=True)
    if git.returncode == 0:
        top, v["git_commit"] = git.stdout.splitlines()
        lock = Path(top) / "dvc.lock"
        if lock.is_file():
            rel = folder.relative_to(top).as_posix()
            outs = [o for stage in yaml.safe_load(lock.read_text()).get("stages", {}).values() for o in stage.get("outs", [])]
            v["matches_dvc_lock"] = any(o.get("path") == rel and o.get("md5") == v["dvc_md5"] for o in outs)
    return v


def warm_up(predictor: Predictor) -> str | None:
    """Runs the task on its export's check.safetensors (a held-out batch and the eager model's outputs): None if
    every output is within the recorded atol, else what is wrong."""
    path = predictor.folder / "check.safetensors"
    if not path.is_file():
        return f"{path}: missing; re-run `tessera export` (or `dvc repro`) to write it"
    with safe_open(str(path), "np") as f:
        atol = float(f.metadata()["atol"])
    tensors = load_file(str(path))
    feed = {n: tensors[f"input.{n}"] for n in predictor.input_names}
    got = predictor.session.run(None, feed)
    names = [o.name for o in predictor.session.get_outputs()]
    worst = max(float(np.abs(g.astype(np.float64) - tensors[f"output.{n}"].astype(np.float64)).max()) for n, g in zip(names, got))
    return None if worst <= atol else f"outputs differ from the exported model's by {worst:.3g} (atol {atol:g})"


def task_folders(folder: Path) -> list[Path]:
    """The exported tasks in `folder` (each a folder with config.json); UserError, with the fix, if none."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; run `tessera export` (or `dvc repro`) first, or pass the "
                        "folder `dvc artifacts get` wrote")
    tasks = sorted(p for p in folder.iterdir() if (p / "config.json").is_file())
    if not tasks:
        raise UserError(f"{folder}: no exported task in it (a folder with config.json and model.onnx); run "
                        "`tessera export` first")
    return tasks


class Served:
    """One export folder, loaded: a Predictor and a Batcher per task, their warm-up results, and the version."""

    def __init__(self, folder: Path, cfg: ServeConfig, metrics: Metrics, fetched: dict | None = None):
        self.folder = Path(folder)
        tasks = task_folders(self.folder)
        limits = replace(InputLimits.of_prepare(PrepareConfig()), max_pixels=cfg.max_image_pixels, max_seconds=cfg.max_audio_seconds,
                         pixels_key="serve.max_image_pixels", seconds_key="serve.max_audio_seconds")
        self.predictors = {p.name: Predictor(p, limits, spin=False) for p in tasks}
        self.problems = {name: problem for name, p in self.predictors.items() if (problem := warm_up(p))}
        self.batchers = {name: Batcher(name, p, cfg, metrics) for name, p in self.predictors.items()}
        self.version = version(self.folder) | (fetched or {})
        card = self.folder / "README.md"
        self.card = card.read_text() if card.is_file() else None

    def info(self) -> dict:
        tasks = {name: {"modality": p.config["modality"], "head": p.config["head"], "classes": p.config["classes"],
                        "inputs": p.config["inputs"], "outputs": p.config.get("outputs"),
                        "files": sorted(p.modality.suffixes), "ready": name not in self.problems,
                        "json": dict(zip(("one", "several"), p.modality.json_input[:2])) if p.modality.json_input else None}
                 for name, p in self.predictors.items()}
        return {"folder": str(self.folder.resolve()), "version": self.version, "tasks": tasks, "model_card": self.card}

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.batchers.values()))


async def read_inputs(predictor: Predictor, scratch: Path, uploads: list[tuple[str, bytes]], rows: list[dict] | None,
                      size: int) -> list[tuple]:
    """`_read_inputs` on the event loop for a body of `size` <= INLINE_BYTES bytes, in a thread for a larger one."""
    if size <= INLINE_BYTES:
        return _read_inputs(predictor, scratch, uploads, rows)
    return await asyncio.to_thread(_read_inputs, predictor, scratch, uploads, rows)


def _read_inputs(predictor: Predictor, scratch: Path, uploads: list[tuple[str, bytes]], rows: list[dict] | None) -> list[tuple]:
    """Uploaded files (name, bytes), or JSON rows (texts and table rows, as JSONL lines), -> (source, item, error)
    per input, each read by the modality's own reader from a file in `scratch` (the same checks as `tessera predict`),
    removed once read."""
    files = [(f"{uuid.uuid4().hex}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())] if rows is not None else \
        [(f"{uuid.uuid4().hex}{Path(name).suffix.lower()}", data) for name, data in uploads]
    out = []
    for k, (file, data) in enumerate(files):
        path = scratch / file
        path.write_bytes(data)
        try:
            found = list(predictor.read(path))
        finally:
            path.unlink()
        if rows is not None:
            out += [(f"input {n}", item, error) for n, (_, item, error) in enumerate(found)]
        else:  # the upload's own name in place of the scratch file's, in sources and messages
            name = uploads[k][0]
            out += [(name + source.removeprefix(str(path)), item, error and error.replace(str(path), name))
                    for source, item, error in found]
    return out


def scratch_folder() -> Path:
    """Where uploads are written to be read: in memory (/dev/shm) where there is one (a file there costs a quarter
    of one on disk: 0.1 ms against 0.3 ms an image here), else the temporary folder."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="tessera-serve-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))


def check_suffix(task: str, predictor: Predictor, name: str) -> None:
    suffix = Path(name).suffix.lower()
    if suffix and suffix not in predictor.modality.suffixes:
        others = sorted(m for m, spec in READERS.items() if suffix in spec.suffixes)
        raise Refused(415, "wrong_modality" if others else "unsupported_type",
                      f"{name}: task {task} reads {', '.join(sorted(predictor.modality.suffixes))} files"
                      + (f"; {suffix} is an input of {', '.join(others)}" if others else ""))


async def read_body(request: Request, max_mb: float) -> bytes:
    """The request's body, refused (413) as soon as it passes `max_mb` MB."""
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_mb * 2**20:
            raise Refused(413, "too_large", f"the body passed serve.max_body_mb ({max_mb:g} MB)")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_request(request: Request, task: str, predictor: Predictor, many: bool, max_mb: float) -> list[tuple]:
    """The request's inputs as (source, item, error) each; Refused for a request that holds none we can read."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await read_body(request, max_mb)
    if kind == "application/json":
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
        rows = [to_row(v) for v in values]
        return await read_inputs(predictor, request.app.state.scratch, [], rows, len(raw))
    if kind == "multipart/form-data":
        async def one_chunk():
            yield raw

        try:
            form = await MultiPartParser(request.headers, one_chunk(), max_files=MAX_FILES, max_fields=16).parse()
        except MultiPartException as e:
            raise Refused(400, "bad_multipart", f"an unreadable multipart body ({e.message})") from None
        uploads = []
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                check_suffix(task, predictor, value.filename or "")
                uploads.append((value.filename or "upload", await value.read()))
        if not uploads:
            raise Refused(400, "no_input", "no file in the multipart form: send each input as field `file`")
        if not many and len(uploads) > 1:
            raise Refused(400, "one_input", f"{len(uploads)} files sent to /predict/{task}, which takes one; "
                          f"use /predict/{task}/batch")
        if any(not data for _, data in uploads):
            raise Refused(400, "empty_input", f"{next(n for n, d in uploads if not d)}: an empty file")
        return await read_inputs(predictor, request.app.state.scratch, uploads, None, len(raw))
    if not kind or not raw:
        raise Refused(400, "no_input", "an empty request: send a file as multipart field `file`, or JSON for text")
    raise Refused(415, "unsupported_type", f"content type {kind}: send multipart/form-data (files) or application/json (text)")


class Accounting:
    """ASGI middleware: each request's id (in its state, and the X-Request-ID header), its count and latency in the
    metrics, and a body whose Content-Length passes serve.max_body_mb refused unread (413; one sent without a
    length is stopped by read_body). Plain ASGI: Starlette's BaseHTTPMiddleware costs a task group per request."""

    def __init__(self, app, metrics: Metrics, max_body_mb: float):
        self.app, self.metrics, self.max_body_mb = app, metrics, max_body_mb

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid, start, status = os.urandom(6).hex(), time.perf_counter(), 500
        scope.setdefault("state", {})["id"] = rid

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length", b"")
        try:
            if length.isdigit() and int(length) > self.max_body_mb * 2**20:
                self.metrics.errors.labels("too_large").inc()
                await JSONResponse({"error": "too_large", "detail": f"a body of {int(length):,} bytes; serve.max_body_mb "
                                    f"is {self.max_body_mb:g} MB", "request_id": rid}, status_code=413)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            endpoint = route.path if route else "unknown"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def build_app(folder: Path, cfg: ServeConfig, fetched: dict | None = None) -> FastAPI:
    """The service, which loads `folder` in the background as it starts (/health answers at once, /ready after).
    fetched: the DVC artifact version the folder was downloaded at (`fetch`), reported in /info."""
    metrics = Metrics()

    async def load(path: Path) -> Served:
        return await asyncio.to_thread(Served, path, cfg, metrics, fetched)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loading, app.state.scratch = asyncio.create_task(load(folder)), scratch_folder()
        yield
        if app.state.served:
            await app.state.served.close()
        shutil.rmtree(app.state.scratch, ignore_errors=True)

    app = FastAPI(title="Tessera", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = None

    async def current(request: Request) -> Served:
        if request.app.state.served is None:
            task = request.app.state.loading
            if not task.done():
                raise Refused(503, "loading", "the models are loading; GET /ready says when they are in")
            try:
                request.app.state.served = task.result()
            except UserError as e:
                raise Refused(503, "not_loaded", str(e)) from None
        return request.app.state.served

    def refusal(request: Request, e: Refused) -> JSONResponse:
        metrics.errors.labels(e.kind).inc()
        return JSONResponse({"error": e.kind, "detail": e.detail, "request_id": request.state.id}, status_code=e.status)

    @app.exception_handler(Refused)
    async def _refused(request: Request, e: Refused):
        return refusal(request, e)

    @app.exception_handler(StarletteHTTPException)  # the router's own 404 and 405, in the same form
    async def _http(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return refusal(request, Refused(e.status_code, kind, f"{request.method} {request.url.path}: {e.detail}; "
                                        "GET /info lists the tasks, docs/serving.md the endpoints"))

    @app.exception_handler(Exception)
    async def _failed(request: Request, e: Exception):
        log.exception("request %s failed", getattr(request.state, "id", "?"))
        metrics.errors.labels("internal").inc()
        return JSONResponse({"error": "internal", "detail": "the server failed on this request; its log says why "
                             "under the request id", "request_id": getattr(request.state, "id", None)}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text()

    @app.get("/health")
    async def health():
        return {"status": "alive"}

    @app.get("/ready")
    async def ready(request: Request):
        served = await current(request)
        if served.problems:
            raise Refused(503, "warm_up_failed", "; ".join(f"{t}: {p}" for t, p in served.problems.items()))
        return {"status": "ready", "tasks": sorted(served.predictors)}

    @app.get("/info")
    async def info(request: Request):
        return (await current(request)).info()

    @app.get("/metrics")
    async def metrics_():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def predict(request: Request, task: str, many: bool):
        served = await current(request)
        if task not in served.predictors:
            raise Refused(404, "unknown_task", f"no task {task!r}; the tasks are {', '.join(sorted(served.predictors))}")
        if task in served.problems:
            raise Refused(503, "warm_up_failed", f"{task}: {served.problems[task]}")
        predictor, batcher = served.predictors[task], served.batchers[task]
        batcher.coming += 1
        try:
            inputs = await parse_request(request, task, predictor, many, cfg.max_body_mb)
        finally:
            batcher.coming -= 1
        if not inputs:
            raise Refused(422, "no_input", "the upload holds no input (no non-empty line or row; a .csv/.jsonl of "
                          "text needs a `text` column)")
        if not many and len(inputs) > 1:
            raise Refused(400, "one_input", f"the file holds {len(inputs)} inputs; use /predict/{task}/batch")
        good = [(s, item) for s, item, error in inputs if not error]
        if not good:
            raise Refused(422, "unreadable", "; ".join(f"{s}: {error}" for s, _, error in inputs))
        records = iter(await batcher.predict(*map(list, zip(*good))))
        results = [{"source": s, "error": error} if error else next(records) for s, _, error in inputs]
        return {"task": task, "version": served.version["dvc_md5"], "results": results}

    @app.post("/predict/{task}")
    async def predict_one(request: Request, task: str):
        answer = await predict(request, task, many=False)
        return JSONResponse({"task": task, "version": answer["version"], **answer["results"][0]})

    @app.post("/predict/{task}/batch")
    async def predict_batch(request: Request, task: str):
        return JSONResponse(await predict(request, task, many=True))

    @app.post("/admin/reload")
    async def reload(request: Request):
        if not cfg.admin:
            raise Refused(404, "not_found", "reloading is off; set serve.admin: true to enable POST /admin/reload")
        if request.client is None or request.client.host not in ("127.0.0.1", "::1"):
            raise Refused(403, "forbidden", "POST /admin/reload is taken from localhost only")
        old = await current(request)
        try:
            new = await load(old.folder)
        except UserError as e:
            raise Refused(409, "reload_failed", f"kept serving {old.version['dvc_md5']}: {e}") from None
        if new.problems:
            raise Refused(409, "reload_failed", f"kept serving {old.version['dvc_md5']}: "
                          + "; ".join(f"{t}: {p}" for t, p in new.problems.items()))
        request.app.state.served = new  # new requests go to the new models; queued ones finish on the old

        async def retire():  # once no request of the old models is still being read, answer what they queued
            while any(b.coming for b in old.batchers.values()):
                await asyncio.sleep(0.05)
            await old.close()

        request.app.state.retiring = asyncio.create_task(retire())
        return {"status": "reloaded", "version": new.version, "was": old.version}

    app.add_middleware(Accounting, metrics=metrics, max_body_mb=cfg.max_body_mb)
    return app


def serve(folder: Path, cfg: ServeConfig, artifact: str | None = None, repo: str = ".") -> None:
    """Runs the service until SIGINT or SIGTERM, which stop new connections and let requests in flight finish.
    artifact: `name@version` of a DVC artifact of `repo`, downloaded into `folder` first."""
    import uvicorn

    fetched = fetch(artifact, repo, folder) if artifact else None
    task_folders(folder)  # refuse a folder without models here, with its message, before the server starts
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(build_app(folder, cfg, fetched), host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=30)
