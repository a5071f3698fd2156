"""Evaluate, export and predict on a briefly trained small model, with real onnxruntime and torch.export."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import torch

from tessera.core.config import Params
from tessera.core.kinds.classification import top_k_records
from tessera.core.stages.export import (FORMATS, VERSION, check_parity, content_hash, eager_outputs, load_deployable,
                                        parity_batches, parity_failure, write_version)
from tessera.core.data.shards import ShardedSplit
from tessera.modalities.audio import load_audio
from helpers import run as sh, tessera

TASKS = ["image", "audio", "text", "detection", "align_audio", "align_image"]


def test_top_k_records_are_the_softmax_probabilities_of_the_best_classes_in_order():
    logits = np.random.default_rng(0).normal(0, 8, (64, 10)).astype(np.float32)  # large: overflows a naive exp
    logits[0] = 1000.0  # all tied: the first classes, each 1/10
    classes = [f"c{i}" for i in range(10)]
    want = torch.from_numpy(logits).softmax(-1).topk(3, dim=1)
    got = top_k_records([f"s{i}" for i in range(64)], logits, classes, 3)
    assert got[0]["top"] == [{"label": c, "score": 0.1} for c in ("c0", "c1", "c2")]
    for g, v, i in zip(got[1:], want.values[1:].tolist(), want.indices[1:].tolist()):
        assert [t["label"] for t in g["top"]] == [classes[j] for j in i] and g["label"] == classes[i[0]]
        assert np.allclose([t["score"] for t in g["top"]], v, atol=1e-6) and g["score"] == g["top"][0]["score"]
    assert len(top_k_records(["s"], logits[:1, :2], classes[:2], 3)[0]["top"]) == 2  # top_k past the classes: all
    assert len(top_k_records(["s"], logits[:1], classes, 1)[0]["top"]) == 1


def test_the_export_records_its_content_hash_commit_and_params_and_git_is_never_a_failure(tmp_path, monkeypatch):
    folder = tmp_path / "project/export"
    (folder / "image").mkdir(parents=True)
    (folder / "image/model.onnx").write_bytes(b"weights")
    (folder / "README.md").write_text("card")
    monkeypatch.chdir(tmp_path / "project")  # no git repository here
    params = Params()
    version = write_version(folder, params)
    assert json.loads((folder / VERSION).read_text()) == version
    assert version["git_commit"] is None and version["params"] == params.model_dump(mode="json")
    assert content_hash(folder) == version["content_hash"]  # version.json itself is not hashed
    (folder / "image/model.onnx").write_bytes(b"retrained")
    assert content_hash(folder) != version["content_hash"]
    (folder / "image/model.onnx").write_bytes(b"weights")
    (folder / "image/model.onnx").rename(folder / "image/other.onnx")  # the same bytes under another name
    assert content_hash(folder) != version["content_hash"]
    shutil.copytree(folder, tmp_path / "copy")
    assert content_hash(tmp_path / "copy") == content_hash(folder)  # wherever it lies

    sh(["git", "init", "-q"], tmp_path / "project")
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "code"], tmp_path / "project")
    assert write_version(folder, params)["git_commit"] == sh(["git", "rev-parse", "HEAD"], tmp_path / "project").strip()
    monkeypatch.setenv("PATH", str(tmp_path))  # git not installed
    assert write_version(folder, params)["git_commit"] is None


@pytest.mark.slow
def test_evaluation_report_has_every_metric_and_plot_data_that_agrees_with_them(run):
    metrics = json.loads((run / "eval.json").read_text())
    for task in ("image", "audio", "text"):
        for key in ("accuracy", "macro_f1"):
            assert 0 <= metrics[f"{task}.{key}"] <= 1
        rows = json.loads((run / f"reports/plots/confusion/{task}.json").read_text())
        assert abs(np.mean([r["actual"] == r["predicted"] for r in rows]) - metrics[f"{task}.accuracy"]) < 1e-6
        assert (run / f"reports/figures/confusion_{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("map", "map_50", "map_75"):
        assert 0 <= metrics[f"detection.{key}"] <= 1
    for q, g in (("audio", "image"), ("image", "audio")):
        assert {f"align.{q}_to_{g}_{k}" for k in ("r1", "r5", "median_rank")} <= metrics.keys()
    for key in ("audio+image_accuracy", "audio_only_accuracy", "image_only_accuracy"):
        assert 0 <= metrics[f"robustness.{key}"] <= 1
    pr = json.loads((run / "reports/plots/pr/detection.json").read_text())
    assert len(pr) == 101 and {"recall", "precision"} == set(pr[0])
    report = (run / "reports/eval.md").read_text()
    assert "![confusion matrix](figures/confusion_audio.png)" in report and "![precision-recall curves](figures/pr.png)" in report
    log = (run / "evaluate.log").read_text()  # not a terminal: a line per unit, the last when the report is written
    assert re.search(r"^evaluating (\d+)/\1 \(100%\) \| .*, ETA 0s \| report done$", log, re.M), log
    assert "| explain detection done" in log


@pytest.mark.slow
def test_every_artifact_of_every_task_matches_the_eager_model(run):
    parity = json.loads((run / "export.json").read_text())
    for task in TASKS:
        for fmt in ("onnx", "pt2", "safetensors"):
            assert parity[f"{task}.{fmt}_max_abs_diff"] < 1e-4
            if not task.startswith("align"):
                assert parity[f"{task}.{fmt}_argmax_agree"] == 1.0
        assert {"model.onnx", "model.pt2", "model.safetensors", "config.json"} <= {p.name for p in (run / "export" / task).iterdir()}
    card = (run / "export/README.md").read_text()
    assert "| waveform | float32 | [batch, samples] |" in card and "### detection" in card
    units = len(TASKS) * len(FORMATS)  # a unit per task and format
    assert f"exporting {units}/{units} (100%) | " in (run / "export.log").read_text()


@pytest.mark.slow
def test_audio_onnx_takes_any_batch_and_clip_length_including_ones_never_exported_with(run):
    folder = run / "export/audio"
    session = ort.InferenceSession(str(folder / "model.onnx"))
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape)  # batch and samples are dynamic
    eager = load_deployable(folder)
    g = torch.Generator().manual_seed(1)
    for batch, samples in ((1, 3000), (5, 16000), (3, 20479), (2, 48000), (1, 100)):  # below and above max_frames
        wave = torch.rand(batch, samples, generator=g) * 0.2 - 0.1
        lengths = torch.randint(samples // 2, samples + 1, (batch,), generator=g)
        lengths[0] = samples
        got = session.run(None, {"waveform": wave.numpy(), "lengths": lengths.numpy()})[0]
        with torch.no_grad():
            want = eager(wave, lengths)[0].numpy()
        assert np.abs(got - want).max() < 1e-4


@pytest.mark.slow
def test_predict_takes_clips_longer_than_the_training_clips_and_batches_them_with_short_ones(run, data_dir, tmp_path):
    """A 3 s recording (max_frames covers 1.28 s) beside a short clip: each gets the eager model's answer alone."""
    clip = next((data_dir / "raw/audio/wav").glob("*.wav"))
    wave, sr = sf.read(clip, dtype="float32")
    long = np.concatenate([np.zeros(sr // 2, np.float32), wave, np.zeros(3 * sr - len(wave) - sr // 2, np.float32)])
    sf.write(tmp_path / "long.wav", long, sr)
    result = tessera("predict", str(run / "export/audio"), str(tmp_path / "long.wav"), str(clip), "--json")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert "Traceback" not in result.stderr and len(records) == 2
    eager = load_deployable(run / "export/audio")
    rate = json.loads((run / "export/audio/config.json").read_text())["model"]["audio"]["sample_rate"]
    for record, path in zip(records, (tmp_path / "long.wav", clip)):
        w = load_audio(path, rate, 60.0, (4000, 192000))  # as predict reads it: resampled to the model's rate
        with torch.no_grad():
            probs = eager(torch.from_numpy(w)[None], torch.tensor([len(w)]))[0].softmax(-1)[0]
        assert record["label"] == eager_classes(run)[int(probs.argmax())]
        assert abs(record["score"] - float(probs.max())) < 1e-4


def eager_classes(run: Path) -> list[str]:
    return json.loads((run / "export/audio/config.json").read_text())["classes"]


@pytest.mark.slow
def test_parity_check_fails_when_the_artifact_computes_something_else(run, data_dir, tmp_path):
    folder = tmp_path / "image"
    shutil.copytree(run / "export/image", folder)
    other = load_deployable(folder)
    with torch.no_grad():
        other.net.head.fc.weight.mul_(1.01)  # a slightly different model stands in as "the eager model"
    batches = parity_batches(ShardedSplit(data_dir / "prepared/image", "test"), "image", 20)
    for fmt in ("onnx", "pt2"):
        figures = {f"image.{k}": v for k, v in check_parity(fmt, folder, other, batches, eager_outputs(other, batches)).items()}
        assert parity_failure("image", fmt, figures, atol=1e-4).startswith(f"image {fmt}: max |diff| ")


@pytest.mark.slow
def test_predict_labels_good_files_and_names_the_bad_one(run, data_dir, tmp_path):
    images = sorted((data_dir / "raw/images/test/3").iterdir())[:2]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = tessera("predict", str(run / "export/image"), str(images[0]), str(bad), str(images[1]), "--json", check=False)
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["source"] for r in records] == [str(images[0]), str(images[1])]
    assert all(r["label"] in [str(d) for d in range(10)] and 0 < r["score"] <= 1 for r in records)
    assert "bad.png" in result.stderr and "not a readable image" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_predict_reads_audio_text_and_detection_inputs(run, data_dir, tmp_path):
    clip = next((data_dir / "raw/audio/wav").glob("*.wav"))
    wave, sr = sf.read(clip)
    sf.write(tmp_path / "clip44k.wav", np.interp(np.arange(0, len(wave), sr / 44100), np.arange(len(wave)), wave), 44100)
    audio = tessera("predict", str(run / "export/audio"), str(clip), str(tmp_path / "clip44k.wav"), "--json")
    assert len(audio.stdout.splitlines()) == 2  # any sample rate: resampled to the model's
    (tmp_path / "s.txt").write_text("the number seven\n\nfour\n")
    text = [json.loads(line) for line in tessera("predict", str(run / "export/text"), str(tmp_path / "s.txt"), "--json").stdout.splitlines()]
    assert [r["source"] for r in text] == [f"{tmp_path / 's.txt'}:1", f"{tmp_path / 's.txt'}:3"]
    canvas = next((data_dir / "raw/detection").rglob("*.png"))
    boxes = json.loads(tessera("predict", str(run / "export/detection"), str(canvas), "--json", "--threshold", "0").stdout)
    assert len(boxes["boxes"]) == 5 and all(len(b["box"]) == 4 for b in boxes["boxes"])  # one per query
