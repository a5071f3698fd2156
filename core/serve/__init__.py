"""`tessera serve`: every exported task behind HTTP (FastAPI on uvicorn), each task's concurrent requests batched
into one ONNX Runtime call.

    GET  /                      a page to try the models (page.html: no CDN, no build step)
    GET  /health                the process is up
    GET  /ready                 every model loaded and its warm-up check passed (503 until then, or naming why not)
    GET  /info                  the tasks (classes, input contract, outputs), the model card, the version served
    GET  /metrics               Prometheus text: requests, errors by kind, latency, batch sizes, queue depth
    POST /predict/{task}        one input: a file (multipart field `file`), or JSON {"text": ...} / {"row": {...}}
    POST /predict/{task}/batch  several: files, or JSON {"texts": [...]} / {"rows": [...]}
    POST /admin/reload          (serve.admin; from localhost only) serve the export now on disk; requests in
                                flight finish on the models they started on

Either POST takes `top_k` and `threshold` as query parameters or form fields (default serve.top_k, serve.threshold).
An answer is `tessera predict`'s record for that input (core/entry/predict.py), the same whether the input was
batched with others or not: ragged inputs are padded with the masks the models take. A bad input is a 4xx JSON
error {"error": kind, "detail": what and the fix, "request_id"}; a failure of ours is a 500 whose traceback goes
to the log, once, under its request id, never to the client.

The parts, by job: app.py (the routes and how errors map to answers), requests.py (a request's body -> inputs and
options), batching.py (inputs -> ONNX Runtime calls), served.py (an export folder loaded, warmed up, versioned),
metrics.py (Prometheus accounting and the middleware that does it).
"""
