"""`tessera serve` as users run it: a real uvicorn on a free localhost port, real HTTP requests, real onnxruntime,
the page in headless Chromium."""

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import yaml

from tessera.core.config import ServeConfig
from tessera.core.entry.predict import Predictor
from tessera.core.config import Params
from tessera.core.serve.app import build_app
from tessera.core.serve.requests import INLINE_BYTES
from tessera.core.stages.export import VERSION, content_hash, write_version
from helpers import copy_repo, free_port, run as sh, wait_for

pytestmark = pytest.mark.slow

TASKS = {"image", "audio", "text", "detection", "align_audio", "align_image"}
SERVE = {"max_batch": 8, "max_wait_ms": 30, "max_body_mb": 1, "max_audio_seconds": 2.0, "admin": True}


def start(folder: Path, tmp_path: Path, *args: str, **serve) -> tuple[subprocess.Popen, str, Path]:
    """`tessera serve folder *args` in a process of its own, once GET /ready answers 200: (process, base URL, its log)."""
    params, log = tmp_path / "serve.yaml", tmp_path / "serve.log"
    params.write_text(yaml.safe_dump({"serve": {**SERVE, **serve}}))
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tessera.core.entry.cli", "serve", str(folder), "--port", str(port),
                                 "-p", str(params), *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"not ready in 120 s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    """One service for the module, on a copy of the export (the reload test edits it)."""
    tmp = tmp_path_factory.mktemp("serve")
    folder = shutil.copytree(run / "export", tmp / "export")
    proc, url, log = start(folder, tmp)
    yield url, folder, log
    proc.terminate()
    proc.wait(30)


def images(data_dir: Path, n: int) -> list[Path]:
    return [sorted((data_dir / f"raw/images/test/{d % 10}").iterdir())[d // 10] for d in range(n)]


def clips(data_dir: Path, n: int) -> list[Path]:
    return sorted((data_dir / "raw/audio/wav").glob("*.wav"))[:n]


def post_file(url: str, task: str, path: Path, name: str | None = None) -> httpx.Response:
    return httpx.post(f"{url}/predict/{task}", files={"file": (name or path.name, path.read_bytes())}, timeout=60)


def metric(text: str, series: str) -> float:
    """The value of `series` (name and labels, as Prometheus writes them) in a /metrics text."""
    return float(next(line for line in text.splitlines() if line.startswith(series)).split()[-1])


def assert_close(got, want, path: str = "") -> None:
    """The same record: equal strings and lengths, numbers within 1e-5 (relative beyond 1: box pixels)."""
    if isinstance(want, dict):
        assert got.keys() >= want.keys() - {"source"}, path
        for k in want.keys() - {"source"}:
            assert_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (path, got, want)
    else:
        assert got == want, path


def test_every_endpoint_answers_and_concurrent_answers_equal_each_input_alone(server, data_dir, tmp_path):
    url, folder, _ = server
    assert httpx.get(f"{url}/health").json() == {"status": "alive"}
    ready = httpx.get(f"{url}/ready").json()
    assert ready["status"] == "ready" and set(ready["tasks"]) == TASKS
    info = httpx.get(f"{url}/info").json()
    assert info["version"] == json.loads((folder / VERSION).read_text())  # what the export recorded of itself
    assert info["version"]["content_hash"] == content_hash(folder) and {"model", "train", "export"} <= info["version"]["params"].keys()
    assert info["tasks"]["image"]["classes"] == [str(d) for d in range(10)] and "### detection" in info["model_card"]
    assert info["tasks"]["audio"]["inputs"][1]["name"] == "lengths"

    # 12 clients at once per task, each input alone through `tessera predict`'s reader and session for reference
    text = tmp_path / "sentences.txt"
    text.write_text("".join(json.loads(line)["text"] + "\n" for line in (data_dir / "raw/text/test.jsonl").open().readlines()[:12]))
    cases = {"image": images(data_dir, 12), "detection": images(data_dir, 12), "audio": clips(data_dir, 12),
             "align_audio": clips(data_dir, 12)[:6], "text": [text]}
    for task, paths in cases.items():
        alone = list(Predictor(folder / task).predict(paths, 3, 0.5, batch_size=1))
        with ThreadPoolExecutor(12) as pool:
            if task == "text":
                sentences = text.read_text().splitlines()
                answers = list(pool.map(lambda s: httpx.post(f"{url}/predict/text", json={"text": s}, timeout=60), sentences))
            else:
                answers = list(pool.map(lambda p: post_file(url, task, p), paths))
        assert [a.status_code for a in answers] == [200] * len(alone)
        for answer, want in zip(answers, alone):
            assert_close(answer.json(), want, task)
    batch = httpx.post(f"{url}/predict/image/batch", files=[("file", (p.name, p.read_bytes())) for p in images(data_dir, 3)])
    assert [r["source"] for r in batch.json()["results"]] == [p.name for p in images(data_dir, 3)]
    texts = httpx.post(f"{url}/predict/text/batch", json={"texts": ["one two", "nine"]}).json()["results"]
    assert len(texts) == 2 and all(r["label"] in info["tasks"]["text"]["classes"] for r in texts)

    metrics = httpx.get(f"{url}/metrics").text
    calls, inputs = (metric(metrics, f'tessera_batch_size_{k}{{task="audio"}}') for k in ("count", "sum"))
    assert inputs == 12 and calls < 12  # concurrent clips went through in shared batches
    assert 'tessera_requests_total{endpoint="/predict/{task}",status="200"}' in metrics
    assert "tessera_request_seconds_bucket" in metrics and 'tessera_queue_depth{task="image"} 0.0' in metrics

    wave, rate = sf.read(clips(data_dir, 1)[0], dtype="float32")
    # 1.5 s of 32-bit samples: a body past INLINE_BYTES, read in a thread rather than on the event loop
    sf.write(tmp_path / "float.wav", np.tile(wave, 2)[: int(1.5 * rate)], rate, subtype="FLOAT")
    assert (tmp_path / "float.wav").stat().st_size > INLINE_BYTES
    assert_close(post_file(url, "audio", tmp_path / "float.wav").json(),
                 next(Predictor(folder / "audio").predict([tmp_path / "float.wav"], 3, 0.5)), "float.wav")


def test_top_k_and_threshold_are_set_per_request_and_requests_batched_together_keep_their_own(server, data_dir):
    url, folder, _ = server
    image = images(data_dir, 1)[0]
    want = {k: next(Predictor(folder / "image").predict([image], k, 0.5)) for k in (1, 3, 5)}
    assert_close(post_file(url, "image", image).json(), want[3], "serve.top_k")
    before = metric(httpx.get(f"{url}/metrics").text, 'tessera_batch_size_count{task="image"}')

    def ask(n: int) -> httpx.Response:  # a query parameter, a form field, or neither (serve.top_k: 3)
        query, form = [("?top_k=1", {}), ("", {"top_k": "5"}), ("", {})][n % 3]
        return httpx.post(f"{url}/predict/image{query}", files={"file": (image.name, image.read_bytes())}, data=form, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, range(12)))
    for n, answer in enumerate(answers):
        assert_close(answer.json(), want[(1, 5, 3)[n % 3]], f"request {n}")
    calls = metric(httpx.get(f"{url}/metrics").text, 'tessera_batch_size_count{task="image"}') - before
    assert calls < 12  # requests with different options shared a session call
    for threshold in (0.0, 0.9):
        got = httpx.post(f"{url}/predict/detection?threshold={threshold}", files={"file": (image.name, image.read_bytes())})
        assert_close(got.json(), next(Predictor(folder / "detection").predict([image], 3, threshold)), f"threshold {threshold}")
    assert len(httpx.post(f"{url}/predict/text/batch?top_k=2", json={"texts": ["seven", "two"]}).json()["results"][1]["top"]) == 2


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few bytes (its pixel data is empty): a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_each_bad_input_gets_its_4xx_and_the_next_request_is_served(server, data_dir, tmp_path):
    url, _, _ = server
    image, clip = images(data_dir, 1)[0], clips(data_dir, 1)[0]
    wave, rate = sf.read(clip, dtype="float32")
    sf.write(tmp_path / "long.wav", np.tile(wave, int(3 * rate / len(wave)) + 1), rate)  # past serve.max_audio_seconds (2 s)
    sf.write(tmp_path / "slow.wav", wave[:1000], 1000)  # below serve.audio_rates (4000 Hz)

    json_type = {"Content-Type": "application/json"}

    def chunks():  # a body without Content-Length, past serve.max_body_mb (1 MB)
        for _ in range(20):
            yield b"x" * 100_000

    cases = [
        (httpx.post(f"{url}/predict/nope", files={"file": (image.name, image.read_bytes())}), 404, "unknown_task", "the tasks are"),
        (httpx.post(f"{url}/predict/image", files={"file": ("bad.png", b"not an image")}), 422, "unreadable", "not a readable image"),
        (post_file(url, "image", clip), 415, "wrong_modality", ".wav is an input of audio"),
        (httpx.post(f"{url}/predict/image", json={"text": "seven"}), 415, "wrong_modality", "multipart"),
        (httpx.post(f"{url}/predict/image"), 400, "no_input", "multipart field `file`"),
        (httpx.post(f"{url}/predict/image", files={"file": ("empty.png", b"")}), 400, "empty_input", "empty.png"),
        (httpx.post(f"{url}/predict/image", files={"file": ("big.png", b"x" * 1_500_000)}), 413, "too_large", "serve.max_body_mb"),
        (httpx.post(f"{url}/predict/text", content=chunks(), headers={"Content-Type": "application/json"}), 413, "too_large", "serve.max_body_mb"),
        (post_file(url, "audio", tmp_path / "long.wav"), 422, "unreadable", "serve.max_audio_seconds is 2 s"),
        (post_file(url, "audio", tmp_path / "slow.wav"), 422, "unreadable", "1000 Hz outside serve.audio_rates [4000, 192000]"),
        (httpx.post(f"{url}/predict/image", files={"file": ("bomb.png", png_header(20000, 20000))}), 422, "unreadable", "20000 x 20000 pixels exceeds serve.max_image_pixels"),
        (httpx.post(f"{url}/predict/image", files={"file": ("wide.png", png_header(8000, 6000))}), 422, "unreadable", "serve.max_image_pixels"),
        (httpx.post(f"{url}/predict/text", json={"sentence": "x"}), 400, "bad_json", '{"text": ...}'),
        (httpx.post(f"{url}/predict/text/batch", json={"texts": "x"}), 400, "bad_json", "a non-empty list"),
        (httpx.post(f"{url}/predict/text", content=b"{not json", headers={"Content-Type": "application/json"}), 400, "bad_json", "not JSON"),
        (httpx.post(f"{url}/predict/text", json={"text": "   "}), 422, "unreadable", "not a non-empty string"),
        (httpx.post(f"{url}/predict/text", json={"text": 5}), 422, "unreadable", "not a non-empty string"),
        (httpx.post(f"{url}/predict/image", content=b"raw", headers={"Content-Type": "text/plain"}), 415, "unsupported_type", "multipart"),
        (httpx.post(f"{url}/predict/image", files=[("file", (image.name, image.read_bytes()))] * 2), 400, "one_input", "/batch"),
        (httpx.post(f"{url}/predict/text", content=b'{"text": "\\ud800"}', headers=json_type), 422, "unreadable", "lone surrogate"),
        (httpx.post(f"{url}/predict/text", content=b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers=json_type),
         400, "bad_json", "RecursionError"),
        (httpx.post(f"{url}/predict/text/batch", files={"file": ("blank.txt", b"\n\n")}), 422, "no_input", "holds no input"),
        (httpx.post(f"{url}/predict/image", files={"file": ("header.png", png_header(20, 20)[:40])}), 422, "unreadable", "header.png"),
        (httpx.get(f"{url}/predict/image"), 405, "method_not_allowed", "GET /predict/image"),
        (post_file(url, "image?top_k=0", image), 422, "bad_parameter", "top_k: a whole number"),
        (httpx.post(f"{url}/predict/image", files={"file": (image.name, image.read_bytes())}, data={"top_k": "1.5"}),
         422, "bad_parameter", "top_k: a whole number of classes, 1 or more (got '1.5')"),
        (post_file(url, "detection?threshold=nan", image), 422, "bad_parameter", "threshold: a number from 0 to 1"),
        (httpx.post(f"{url}/predict/text?threshold=2", json={"text": "one"}), 422, "bad_parameter", "threshold: a number from 0 to 1"),
        (post_file(url, "image?topk=3", image), 422, "bad_parameter", "topk: not an option"),
    ]
    for response, status, kind, detail in cases:
        body = response.json()
        assert (response.status_code, body["error"]) == (status, kind), body
        assert detail in body["detail"] and body["request_id"] == response.headers["X-Request-ID"], body
        assert "Traceback" not in response.text and "tessera-serve" not in response.text  # no scratch path either
        assert post_file(url, "image", image).status_code == 200  # and the service goes on
    mixed = httpx.post(f"{url}/predict/image/batch", files=[("file", ("bad.png", b"nope")), ("file", (image.name, image.read_bytes()))])
    results = mixed.json()["results"]
    assert mixed.status_code == 200 and "not a readable image" in results[0]["error"] and results[1]["label"]
    assert 'tessera_errors_total{kind="too_large"} 2.0' in httpx.get(f"{url}/metrics").text


def test_a_truncated_wav_or_flac_is_refused_with_a_422_naming_it(server, data_dir, tmp_path):
    """A WAV or FLAC whose header claims more frames than it holds (a copy cut short) is an unreadable input, not the
    frames that happen to be there."""
    url, _, _ = server
    wave, rate = sf.read(clips(data_dir, 1)[0], dtype="float32")
    for suffix in ("wav", "flac"):
        sf.write(tmp_path / f"whole.{suffix}", wave, rate, subtype="PCM_16")
        whole = (tmp_path / f"whole.{suffix}").read_bytes()
        cut = whole[: len(whole) * 2 // 3]  # a third of its frames gone; the header still counts them all
        response = httpx.post(f"{url}/predict/audio", files={"file": (f"cut.{suffix}", cut)})
        assert (response.status_code, response.json().get("error")) == (422, "unreadable"), response.text
        detail = response.json()["detail"]
        assert detail.startswith(f"cut.{suffix}: truncated audio: the header claims {len(wave):,} frames"), detail
        assert "tessera-serve" not in response.text
        assert post_file(url, "audio", tmp_path / f"whole.{suffix}").status_code == 200


def test_reload_under_load_swaps_the_export_and_loses_no_request(server, data_dir):
    url, folder, _ = server
    before = httpx.get(f"{url}/info").json()["version"]["content_hash"]
    image, clip = images(data_dir, 1)[0], clips(data_dir, 1)[0]
    stop, statuses = threading.Event(), []

    def client(k: int):
        while not stop.is_set():
            statuses.append(post_file(url, "image" if k % 2 else "audio", image if k % 2 else clip).status_code)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    card = folder / "README.md"
    card.write_text(card.read_text() + "\nRetrained.\n")  # a new export on disk: its hash changes
    write_version(folder, Params())
    reloaded = httpx.post(f"{url}/admin/reload", timeout=120)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["was"]["content_hash"] == before != reloaded.json()["version"]["content_hash"] == content_hash(folder)
    assert httpx.get(f"{url}/info").json()["version"]["content_hash"] == content_hash(folder)
    assert len(statuses) > 20 and set(statuses) == {200}


def test_the_page_predicts_an_image_draws_detection_boxes_and_reads_a_sentence(server, data_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _, _ = server
    browser_path = shutil.which("chromium")
    assert browser_path, "Debian's chromium is needed: apt-get install chromium (.ci/run does)"
    image = images(data_dir, 4)[3]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-sync"])
        page = browser.new_page()
        try:
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('task').options.length > 0")
            page.select_option("#task", "image")
            page.set_input_files("#file", str(image))
            page.click("#go")
            page.wait_for_selector("#result table")
            answer = json.loads(page.get_attribute("#result", "data-answer"))
            assert answer["label"] == post_file(url, "image", image).json()["label"]
            assert page.inner_text("#result table").count("\n") >= 3  # a header and the top 3

            page.select_option("#task", "detection")
            page.set_input_files("#file", str(image))
            page.click("#go")
            page.wait_for_function("document.getElementById('result').dataset.answer.includes('boxes')")
            boxes = json.loads(page.get_attribute("#result", "data-answer"))["boxes"]
            if boxes:  # drawn over the image, on a canvas of the image's own size
                assert page.is_visible("#canvas") and page.evaluate("document.getElementById('canvas').width") > 0

            page.select_option("#task", "text")
            assert page.is_visible("#text") and not page.is_visible("#file")
            page.fill("#text", "three")
            page.click("#go")
            page.wait_for_function("document.getElementById('result').dataset.answer.includes('\"task\": \"text\"') "
                                   "|| document.getElementById('result').dataset.answer.includes('\"task\":\"text\"')")
            assert page.inner_text("#error") == ""
        finally:
            page.screenshot(path=str(tmp_path / "page.png"))
            browser.close()


def test_sigterm_lets_the_request_in_flight_finish_and_reload_is_off_by_default(run, data_dir, tmp_path):
    proc, url, log = start(run / "export", tmp_path, admin=False)
    try:
        refused = httpx.post(f"{url}/admin/reload")
        assert refused.status_code == 404 and "serve.admin" in refused.json()["detail"]
        image = images(data_dir, 1)[0]
        form = httpx.Request("POST", url, files={"file": (image.name, image.read_bytes())})
        body = form.read()

        def slowly():  # half the body, then the rest 1.5 s later: the request is in flight when SIGTERM comes
            yield body[: len(body) // 2]
            time.sleep(1.5)
            yield body[len(body) // 2:]

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/predict/image", content=slowly(), timeout=60,
                                  headers={"Content-Type": form.headers["Content-Type"]})
            time.sleep(0.7)
            proc.send_signal(signal.SIGTERM)
            answer = pending.result()
        assert answer.status_code == 200 and answer.json()["label"]
        # uvicorn re-raises the signal once shut down, so the process ends by SIGTERM, as an unhandled one would
        assert proc.wait(30) in (0, -signal.SIGTERM) and "Finished server process" in log.read_text()
    finally:
        proc.kill()


def test_a_model_failure_is_a_500_with_one_traceback_logged_under_its_request_id_and_the_rest_is_answered(
        run, data_dir, caplog, tmp_path, monkeypatch):
    import uvicorn

    app = build_app(run / "export", ServeConfig(max_wait_ms=300))
    port = free_port()
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own log of an exception reaches caplog too
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

        predictor = app.state.service.served.predictors["image"]

        entered, gate = threading.Event(), threading.Event()

        class FailsOnBlack:  # the session, except that it fails on any batch holding an all-black image, and that
            def __init__(self, session):  # its first call waits for `gate`
                self.session, self.calls = session, 0

            def run(self, names, feed):
                self.calls += 1
                if self.calls == 1:
                    entered.set()
                    gate.wait(30)
                if (feed["images"].reshape(len(feed["images"]), -1).max(1) == 0).any():
                    raise RuntimeError("the session broke")
                return self.session.run(names, feed)

        predictor.session = FailsOnBlack(predictor.session)
        black = np.zeros((28, 28), np.uint8)
        from PIL import Image

        Image.fromarray(black).save(tmp_path / "black.png")
        good = images(data_dir, 5)
        with caplog.at_level(logging.ERROR), ThreadPoolExecutor(6) as pool:
            first = pool.submit(post_file, url, "image", good[0])
            assert entered.wait(30)  # the model is busy with it: the next five requests queue up for one batch
            rest = [pool.submit(post_file, url, "image", p) for p in [tmp_path / "black.png", *good[1:]]]
            wait_for(lambda: metric(httpx.get(f"{url}/metrics").text, 'tessera_queue_depth{task="image"}') == 5, 30,
                     "five requests queued", every=0.05)
            gate.set()
            answers = [f.result() for f in rest]
        failed, body = answers[0], answers[0].json()
        assert failed.status_code == 500 and body["error"] == "internal" and "Traceback" not in failed.text
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert [(r.name, body["request_id"] in r.getMessage()) for r in tracebacks] == [("tessera.serve", True)]
        # batched with the failing one (a call of 5 inputs was made), each other one was answered alone
        assert first.result().status_code == 200 and [a.status_code for a in answers[1:]] == [200] * 4
        metrics = httpx.get(f"{url}/metrics").text
        assert metric(metrics, 'tessera_batch_size_bucket{le="4.0",task="image"}') < metric(metrics, 'tessera_batch_size_count{task="image"}')
        assert post_file(url, "audio", clips(data_dir, 1)[0]).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_an_export_without_its_version_is_refused_before_the_server_starts(tmp_path):
    (tmp_path / "export/image").mkdir(parents=True)
    (tmp_path / "export/image/config.json").write_text("{}")
    for version in (None, '{"git_commit": null}'):
        if version:
            (tmp_path / "export" / VERSION).write_text(version)
        got = subprocess.run([sys.executable, "-m", "tessera.core.entry.cli", "serve", str(tmp_path / "export"),
                              "--port", str(free_port())], capture_output=True, text=True, timeout=60)
        assert got.returncode == 2 and f"{VERSION}: {'not what export writes' if version else 'missing'}; re-run `tessera export`" in got.stderr
        assert "Traceback" not in got.stderr


def test_a_registered_dvc_artifact_version_is_fetched_served_and_reported(dvc_repo, tmp_path):
    repo = copy_repo(dvc_repo, tmp_path / "repo")
    recorded = json.loads((repo / "models/export" / VERSION).read_text())
    assert recorded["content_hash"] == content_hash(repo / "models/export")
    assert recorded["git_commit"] == sh(["git", "rev-parse", "HEAD~1"], repo).strip()  # `dvc repro` ran before the commit
    who = {f"GIT_{r}_{k}": v for r in ("AUTHOR", "COMMITTER") for k, v in (("NAME", "t"), ("EMAIL", "t@t"))}
    sh(["gto", "register", "tessera-models", "--version", "v1.0.0"], repo, who)  # the tag `dvc artifacts` reads
    proc, url, log = start(tmp_path / "served", tmp_path, "--artifact", "tessera-models@v1.0.0", "--repo", str(repo))
    try:
        served = httpx.get(f"{url}/info").json()["version"]
        assert (served["artifact"], served["artifact_version"]) == ("tessera-models", "v1.0.0")
        assert {k: served[k] for k in recorded} == recorded and content_hash(tmp_path / "served") == recorded["content_hash"]
        assert httpx.get(f"{url}/ready").json()["status"] == "ready"
    finally:
        proc.terminate()
        proc.wait(30)
    missing = subprocess.run([sys.executable, "-m", "tessera.core.entry.cli", "serve", str(tmp_path / "other"),
                              "--artifact", "tessera-models@v9", "--repo", str(repo)], capture_output=True, text=True)
    assert missing.returncode == 2 and "gto register tessera-models" in missing.stderr and "Traceback" not in missing.stderr
