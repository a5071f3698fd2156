"""The service's accounting: Prometheus metrics, and the ASGI middleware that gives each request its id, counts
it, times it, and answers a failure of ours with a 500."""

from __future__ import annotations

import logging
import os
import time

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("tessera.serve")


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


class Accounting:
    """ASGI middleware: each request's id (in its state, and the X-Request-ID header), its count and latency in the
    metrics, a body whose Content-Length passes serve.max_body_mb refused unread (413; one sent without a length is
    stopped as it is read), and an exception of ours answered with a 500 whose traceback is logged here, once.

    The 500 is made here rather than by an exception handler of the app: Starlette re-raises what such a handler
    answered, and uvicorn logs it a second time. Plain ASGI: Starlette's BaseHTTPMiddleware costs a task group per
    request."""

    def __init__(self, app, metrics: Metrics, max_body_mb: float):
        self.app, self.metrics, self.max_body_mb = app, metrics, max_body_mb

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid, start, status = os.urandom(6).hex(), time.perf_counter(), None
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
        except Exception:
            log.exception("request %s failed", rid)
            self.metrics.errors.labels("internal").inc()
            if status is None:  # else the answer is under way: the client sees it cut short
                await JSONResponse({"error": "internal", "detail": "the server failed on this request; its log says "
                                    "why under the request id", "request_id": rid}, status_code=500)(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            endpoint = route.path if route else "unknown"
            self.metrics.requests.labels(endpoint, str(status or 500)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
