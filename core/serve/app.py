"""The service's routes (the endpoints are listed in core/serve/__init__.py), how a refusal or the router's own
404/405 becomes a JSON answer, and `serve`, which runs it all on uvicorn."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.core.config import ServeConfig
from tessera.core.errors import UserError
from tessera.core.serve.metrics import Accounting, Metrics
from tessera.core.serve.requests import Refused, parse_request
from tessera.core.serve.served import Served, fetch, read_version, task_folders

PAGE = Path(__file__).with_name("page.html")
routes = APIRouter()


class Service:
    """What the routes share: the config, the metrics, and the export served, loaded in the background as the
    service starts."""

    def __init__(self, folder: Path, cfg: ServeConfig, fetched: dict | None):
        self.folder, self.cfg, self.fetched, self.metrics = Path(folder), cfg, fetched, Metrics()
        self.loading: asyncio.Task | None = None
        self.served: Served | None = None
        self.retiring: asyncio.Task | None = None  # the models a reload replaced, answering what they queued

    async def load(self) -> Served:
        return await asyncio.to_thread(Served, self.folder, self.cfg, self.metrics, self.fetched)

    def current(self) -> Served:
        """The export served; Refused (503) while it loads, or if it could not be."""
        if self.served is None:
            if not self.loading.done():
                raise Refused(503, "loading", "the models are loading; GET /ready says when they are in")
            try:
                self.served = self.loading.result()
            except UserError as e:
                raise Refused(503, "not_loaded", str(e)) from None
        return self.served

    async def close(self) -> None:
        if self.served:
            await self.served.close()


def build_app(folder: Path, cfg: ServeConfig, fetched: dict | None = None) -> FastAPI:
    """The service, which loads `folder` in the background as it starts (/health answers at once, /ready after).
    fetched: the DVC artifact version the folder was downloaded at (`fetch`), reported in /info."""
    service = Service(folder, cfg, fetched)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.loading = asyncio.create_task(service.load())
        yield
        await service.close()

    app = FastAPI(title="Tessera", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.include_router(routes)
    app.add_exception_handler(Refused, refusal)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(Accounting, metrics=service.metrics, max_body_mb=cfg.max_body_mb)
    return app


def service_of(request: Request) -> Service:
    return request.app.state.service


async def refusal(request: Request, e: Refused) -> JSONResponse:
    service_of(request).metrics.errors.labels(e.kind).inc()
    return JSONResponse({"error": e.kind, "detail": e.detail, "request_id": request.state.id}, status_code=e.status)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """The router's own 404 and 405, in the form of our refusals."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return await refusal(request, Refused(e.status_code, kind, f"{request.method} {request.url.path}: {e.detail}; "
                                          "GET /info lists the tasks, docs/serving.md the endpoints"))


@routes.get("/", response_class=HTMLResponse)
async def page():
    return PAGE.read_text()


@routes.get("/health")
async def health():
    return {"status": "alive"}


@routes.get("/ready")
async def ready(request: Request):
    served = service_of(request).current()
    if served.problems:
        raise Refused(503, "warm_up_failed", "; ".join(f"{t}: {p}" for t, p in served.problems.items()))
    return {"status": "ready", "tasks": sorted(served.predictors)}


@routes.get("/info")
async def info(request: Request):
    return service_of(request).current().info()


@routes.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(service_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@routes.post("/predict/{task}")
async def predict_one(request: Request, task: str):
    answer = await predict(request, task, many=False)
    return JSONResponse({"task": task, "version": answer["version"], **answer["results"][0]})


@routes.post("/predict/{task}/batch")
async def predict_batch(request: Request, task: str):
    return JSONResponse(await predict(request, task, many=True))


async def predict(request: Request, task: str, many: bool) -> dict:
    """{"task", "version", "results": a record per input, or {"source", "error"} for one that could not be read}."""
    service = service_of(request)
    served = service.current()
    if task not in served.predictors:
        raise Refused(404, "unknown_task", f"no task {task!r}; the tasks are {', '.join(sorted(served.predictors))}")
    if task in served.problems:
        raise Refused(503, "warm_up_failed", f"{task}: {served.problems[task]}")
    predictor, batcher = served.predictors[task], served.batchers[task]
    with batcher.reading():
        inputs, options = await parse_request(request, task, predictor, many, service.cfg)
    if not inputs:
        raise Refused(422, "no_input", "the upload holds no input (no non-empty line or row; a .csv/.jsonl of "
                      "text needs a `text` column)")
    if not many and len(inputs) > 1:
        raise Refused(400, "one_input", f"the file holds {len(inputs)} inputs; use /predict/{task}/batch")
    good = [(s, item) for s, item, error in inputs if not error]
    if not good:
        raise Refused(422, "unreadable", "; ".join(f"{s}: {error}" for s, _, error in inputs))
    sources, items = map(list, zip(*good))
    records = iter(await batcher.predict(sources, items, options))
    results = [{"source": s, "error": error} if error else next(records) for s, _, error in inputs]
    return {"task": task, "version": served.version["content_hash"], "results": results}


@routes.post("/admin/reload")
async def reload(request: Request):
    """Loads the export now on disk and serves it, if every task passes its warm-up; else keeps the old (409)."""
    service = service_of(request)
    if not service.cfg.admin:
        raise Refused(404, "not_found", "reloading is off; set serve.admin: true to enable POST /admin/reload")
    if request.client is None or request.client.host not in ("127.0.0.1", "::1"):
        raise Refused(403, "forbidden", "POST /admin/reload is taken from localhost only")
    old = service.current()
    kept = f"kept serving {old.version['content_hash']}"
    try:
        new = await service.load()
    except UserError as e:
        raise Refused(409, "reload_failed", f"{kept}: {e}") from None
    if new.problems:
        raise Refused(409, "reload_failed", f"{kept}: " + "; ".join(f"{t}: {p}" for t, p in new.problems.items()))
    service.served = new  # new requests go to the new models; queued ones finish on the old

    async def retire():  # once no request of the old models is still being read, answer what they queued
        while any(b.coming for b in old.batchers.values()):
            await asyncio.sleep(0.05)
        await old.close()

    service.retiring = asyncio.create_task(retire())
    return {"status": "reloaded", "version": new.version, "was": old.version}


def serve(folder: Path, cfg: ServeConfig, artifact: str | None = None, repo: str = ".") -> None:
    """Runs the service until SIGINT or SIGTERM, which stop new connections and let requests in flight finish.
    artifact: `name@version` of a DVC artifact of `repo`, downloaded into `folder` first."""
    import uvicorn

    fetched = fetch(artifact, repo, folder) if artifact else None
    task_folders(folder)  # refuse a folder without models, or without its version, here, before the server starts
    read_version(folder)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(build_app(folder, cfg, fetched), host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=30)
