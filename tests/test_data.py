"""Data: deterministic generation, standard formats round-tripping, quarantine with nothing lost, the cache."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from rich.console import Console

from helpers import png_header_only
from tessera.core.config import Params, parse_params
from tessera.core.data.shards import read_shards, unflatten
from tessera.core.config import GenerateParams
from tessera.core.data.digits import generate
from tessera.core.errors import UserError
from tessera.core.data.files import SPLITS, BadSample
from tessera.core.stages.prepare import prepare_data as prepare
from tessera.modalities.audio import load_audio
from tessera.modalities.image import load_image
from tessera.modalities.text import load_tokenizer

SMALL = GenerateParams(seed=3, languages=("en", "de"), train_voices=("", "+m3"), test_voices=("+f2",),
                       text_per_split=(40, 10), detection_per_split=(12, 4), records_per_split=(40, 10))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, dict]:
    """SMALL generated once for the tests that only read it (a generation takes several seconds): (folder, counts)."""
    out = tmp_path_factory.mktemp("generated")
    return out, generate(SMALL.model_copy(update={"out": str(out)}))


def test_generation_is_deterministic_and_the_seed_matters(generated, tmp_path):
    folder, counts = generated
    generate(SMALL.model_copy(update={"out": str(tmp_path / "b")}))
    a, b = tree_bytes(folder), tree_bytes(tmp_path / "b")
    assert a == b
    assert counts["audio"] == {"train": 80, "test": 20} and len(a) > 1797
    generate(SMALL.model_copy(update={"out": str(tmp_path / "c"), "seed": 4}))
    c = tree_bytes(tmp_path / "c")
    assert c.keys() != a.keys() or any(c[k] != a[k] for k in a)


def test_default_dataset_has_the_promised_splits(generated):
    root = generated[0]
    voices = {split: {r.split(",")[2] for r in (root / f"audio/{split}.csv").read_text().splitlines()[1:]}
              for split in ("train", "test")}
    assert voices["train"].isdisjoint(voices["test"])  # held-out voices
    texts = {s: [json.loads(line)["text"] for line in open(root / f"text/{s}.jsonl")] for s in ("train", "test")}
    assert set(texts["train"]).isdisjoint(texts["test"])  # held-out templates
    train_scans = {p.name for p in (root / "images/train").rglob("*.png")}
    test_scans = {p.name for p in (root / "images/test").rglob("*.png")}
    assert train_scans.isdisjoint(test_scans) and len(train_scans) + len(test_scans) == 1797
    coco = json.loads((root / "detection/train.json").read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]])[1:]
    assert per_image.min() >= 1 and per_image.max() <= 4


def test_each_record_pairs_its_grid_caption_and_speech_and_any_two_inputs_give_its_sum(generated):
    """The records of the default dataset: every cell of a grid is a scan of the digit its caption names there, or
    occluded, or the caption hides it, never both; a record's digits are distinct and the label is their sum; the
    speech fits max_frames."""
    root = generated[0]
    scans = {split: {np.asarray(Image.open(p)).tobytes(): int(p.parent.name) for p in (root / "images" / split).rglob("*.png")}
             for split in ("train", "test")}
    words = "zero one two three four five six seven eight nine".split()
    hidden = {"image": 0, "caption": 0}
    for split, count in (("train", 40), ("test", 10)):
        rows = list(csv.DictReader(open(root / "records" / f"{split}.csv")))
        assert len(rows) == count and list(rows[0]) == ["image", "caption", "speech", "label"]
        for row in rows:
            grid = np.asarray(Image.open(root / "records" / row["image"]))
            named = row["caption"].replace(",", "").replace(" and ", " ").split()
            assert grid.shape == (16, 16) and 1 <= len(named) <= 4
            digits = []
            for k, word in enumerate(named):
                cell = grid[k // 2 * 8:k // 2 * 8 + 8, k % 2 * 8:k % 2 * 8 + 8]
                seen = scans[split].get(cell.tobytes())  # a held-out record shows held-out scans only
                assert seen is not None or word != "something", row  # never hidden by both
                hidden["image"] += seen is None
                hidden["caption"] += word == "something"
                assert word == "something" or seen is None or words[seen] == word, row
                digits.append(seen if seen is not None else words.index(word))
            for k in range(len(named), 4):  # the cells after the last digit are blank
                assert not grid[k // 2 * 8:k // 2 * 8 + 8, k % 2 * 8:k % 2 * 8 + 8].any(), row
            assert int(row["label"]) == sum(digits) and len(set(digits)) == len(digits), row  # distinct digits
            info = sf.info(root / "records" / row["speech"])
            assert info.samplerate == 16000 and info.duration <= 1.28
    assert hidden["image"] and hidden["caption"]  # each input hides digits somewhere


def params_for(tmp_path: Path, sources: dict, **model) -> Params:
    return parse_params({"model": model, "prepare": {"root": str(tmp_path), "out": str(tmp_path / "prepared"),
                                                      "metrics": str(tmp_path / "m.json"),
                                                      "val_fraction": 0.0, "sources": sources}})


def load(tmp_path: Path, modality: str, split: str) -> dict:
    folder = tmp_path / "prepared" / modality
    meta = json.loads((folder / "meta.json").read_text())
    shards = list(read_shards(folder, meta["splits"][split]))
    sources = [s for f in meta["splits"][split] for s in json.loads((folder / (f + ".json")).read_text())]
    return {"meta": meta, "shards": shards, "sources": sources}


def png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def wav(path: Path, samples: np.ndarray, sr=16000, subtype="PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sr, subtype=subtype)
    return path


def test_every_bad_sample_is_quarantined_with_its_reason_and_nothing_is_lost(tmp_path):
    rng = np.random.default_rng(0)
    # images: ImageFolder with a truncated PNG and a text file posing as an image
    img = tmp_path / "img"
    for split in ("train", "test"):
        for c in ("a", "b"):
            png(img / split / c / "ok.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    full = (img / "train/a/ok.png").read_bytes()
    (img / "train/a/truncated.png").write_bytes(full[: len(full) // 2])
    (img / "train/b/notes.png").write_text("not an image")
    # audio: manifest rows for each failure
    aud = tmp_path / "aud"
    wav(aud / "good.wav", rng.uniform(-0.5, 0.5, 8000))
    wav(aud / "empty.wav", np.zeros(0))
    wav(aud / "nan.wav", np.array([0.1, np.nan, 0.2] * 100, dtype=np.float32), subtype="FLOAT")
    (aud / "garbage.wav").write_bytes(b"RIFF....this is not audio" * 10)
    wav(tmp_path / "outside.wav", rng.uniform(-0.5, 0.5, 800))
    for name in ("cut.wav", "cut.flac"):  # headers that claim 8,000 frames, cut to two thirds
        whole = wav(aud / name, rng.uniform(-0.5, 0.5, 8000)).read_bytes()
        (aud / name).write_bytes(whole[: len(whole) * 2 // 3])
    (aud / "train.csv").write_text("path,label\ngood.wav,yes\nempty.wav,yes\nnan.wav,no\ngarbage.wav,no\n"
                                   "missing.wav,yes\n../outside.wav,no\ngood.wav,\ncut.wav,yes\ncut.flac,no\n")
    (aud / "test.csv").write_text("path,label\ngood.wav,yes\ngood.wav,zebra\n")
    # text: invalid UTF-8, empty text, broken JSON, unknown label
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "train.jsonl").write_bytes(b'{"text": "seven", "label": "7"}\n{"text": "bad \xff\xfe bytes", "label": "7"}\n'
                                      b'{"text": "   ", "label": "3"}\n{"text": "three", "label": "3"}\n{"text": oops}\n')
    (txt / "test.jsonl").write_text('{"text": "three", "label": "3"}\n{"text": "nine", "label": "9"}\n')
    # detection: COCO with every kind of bad record
    det = tmp_path / "det"
    for i in range(1, 8):
        png(det / f"{i}.png", np.zeros((20, 30), np.uint8))
    png(det / "small.png", np.zeros((10, 10), np.uint8))
    coco = {"categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "images": [{"id": i, "file_name": f"{i}.png", "width": 30, "height": 20} for i in range(1, 8)]
            + [{"id": 1, "file_name": "1.png", "width": 30, "height": 20},  # duplicate image id
               {"id": 8, "file_name": "gone.png", "width": 30, "height": 20},
               {"id": 9, "file_name": "small.png", "width": 30, "height": 20}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
                            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [25, 2, 10, 10]},  # outside
                            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [2, 2, 0, 10]},  # zero width
                            {"id": 4, "image_id": 4, "category_id": 7, "bbox": [2, 2, 5, 5]},  # unknown category
                            {"id": 5, "image_id": 5, "category_id": 1, "bbox": [2, 2, 5, 5]},
                            {"id": 5, "image_id": 6, "category_id": 1, "bbox": [2, 2, 5, 5]},  # duplicate ann id
                            {"id": 6, "image_id": 42, "category_id": 1, "bbox": [2, 2, 5, 5]}]}  # unknown image
    (det / "train.json").write_text(json.dumps(coco))
    sources = {"image": {"format": "imagefolder", "train": str(img / "train"), "test": str(img / "test")},
               "audio": {"format": "manifest", "train": str(aud / "train.csv"), "test": str(aud / "test.csv")},
               "text": {"format": "jsonl", "train": str(txt / "train.jsonl"), "test": str(txt / "test.jsonl")},
               "detection": {"format": "coco", "train": str(det / "train.json")}}
    params = params_for(tmp_path, sources, image={"img_size": 8, "patch_size": 4},
                        detection={"img_size": 16, "patch_size": 8, "num_queries": 4})
    params.prepare.test_fraction = 0.0
    printed = io.StringIO()  # a log, not a terminal: each modality's samples counted in lines
    metas = prepare(params, Console(file=printed, width=200))

    report = [json.loads(line) for line in open(tmp_path / "prepared/quarantine.jsonl")]
    reasons = {(q["modality"], Path(q["path"].split(":")[0]).name + (":" + q["path"].split(":", 1)[1] if ":" in q["path"] else "")): q["reason"] for q in report}

    def reason(modality, source):
        return reasons[(modality, source)]

    assert "not a readable image" in reason("image", "truncated.png")
    assert "not a readable image" in reason("image", "notes.png")
    assert reason("audio", "empty.wav") == "zero-length audio"
    assert reason("audio", "nan.wav") == "NaN or Inf samples"
    assert "undecodable audio" in reason("audio", "garbage.wav")
    assert reason("audio", "missing.wav") == "missing file"
    assert reason("audio", "cut.wav").startswith("truncated audio: the header claims 8,000 frames, the file holds 5,3")
    assert reason("audio", "cut.flac").startswith("truncated audio: the header claims 8,000 frames")
    assert "escapes the dataset root" in reason("audio", "train.csv:7")
    assert reason("audio", "train.csv:8") == "empty label"
    unknown = [q for q in report if q["modality"] == "audio" and q["split"] == "test"]
    assert len(unknown) == 1 and "unknown label 'zebra'" in unknown[0]["reason"]
    assert reason("text", "train.jsonl:2") == "field 'text' is not valid UTF-8"
    assert reason("text", "train.jsonl:3") == "empty text"
    assert "not valid JSON" in reason("text", "train.jsonl:5")
    assert "unknown label '9'" in reason("text", "test.jsonl:2")
    assert "lies outside the 30 x 20 image" in reason("detection", "train.json:image 2")
    assert "non-positive size" in reason("detection", "train.json:image 3")
    assert "unknown category id 7" in reason("detection", "train.json:image 4")
    assert "duplicate annotation id 5" in reason("detection", "train.json:image 6")
    assert reason("detection", "train.json:image 1") == "duplicate image id 1"
    assert reason("detection", "gone.png") == "missing file"
    assert "the annotations say 30 x 20" in reason("detection", "small.png")
    assert "unknown image id 42" in reason("detection", "train.json:image 42")

    # nothing lost: in = prepared + quarantined, and the prepared ones are the good ones
    metrics = json.loads((tmp_path / "m.json").read_text())
    for modality, by_split in metrics.items():
        for split, c in by_split.items():
            assert c["in"] == c["prepared"] + c["quarantined"], (modality, split)
    assert metrics["image"]["train"] == {"in": 4, "prepared": 2, "quarantined": 2}
    assert metrics["audio"]["train"] == {"in": 9, "prepared": 1, "quarantined": 8}
    assert metrics["text"]["train"] == {"in": 5, "prepared": 2, "quarantined": 3}
    assert metrics["detection"]["train"]["prepared"] == 3  # images 1 (first of the duplicates), 5, and 7 (no objects)
    assert sum(len(m["quarantine"]) for m in metas.values()) == len(report)
    for modality, by_split in metrics.items():
        n = sum(c["in"] for c in by_split.values())  # the last line: every sample, bad ones too
        assert f"preparing {modality} {n}/{n} (100%) | " in printed.getvalue(), printed.getvalue()


def test_each_format_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    pixels = {c: rng.integers(0, 255, (8, 8), dtype=np.uint8) for c in ("3", "10")}
    for c, p in pixels.items():
        png(tmp_path / "img" / c / "x.png", p)
    pcm = (rng.uniform(-0.5, 0.5, 4000) * 32768).astype(np.int16)
    wav(tmp_path / "aud" / "yes" / "a.wav", pcm)
    wav(tmp_path / "aud" / "no" / "b.flac", pcm[:1000], subtype="PCM_16")
    (tmp_path / "t.csv").write_text('text,label\n"Seven, as in 7",pos\nnine,neg\n')
    (tmp_path / "det").mkdir()
    png(tmp_path / "det/c.png", np.zeros((40, 20), np.uint8))
    (tmp_path / "det/c.json").write_text(json.dumps({
        "categories": [{"id": 5, "name": "five"}], "images": [{"id": 1, "file_name": "c.png", "width": 20, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 4, 10, 20]}]}))
    src = {"image": {"format": "imagefolder", "train": str(tmp_path / "img")},
           "audio": {"format": "folder", "train": str(tmp_path / "aud")},
           "text": {"format": "csv", "train": str(tmp_path / "t.csv")},
           "detection": {"format": "coco", "train": str(tmp_path / "det/c.json")}}
    params = params_for(tmp_path, src, image={"img_size": 8, "patch_size": 4}, text={"vocab_size": 300})
    params.prepare.test_fraction = 0.0
    prepare(params)

    image = load(tmp_path, "image", "train")
    assert image["meta"]["classes"] == ["3", "10"]  # numeric order
    for img, label in zip(image["shards"][0]["image"], image["shards"][0]["label"]):
        assert np.array_equal(img[0].numpy(), pixels[image["meta"]["classes"][label]])
    audio = load(tmp_path, "audio", "train")
    waves = unflatten(audio["shards"][0], "waveform")
    by_name = dict(zip((Path(s).name for s in audio["sources"]), waves))
    assert np.array_equal(by_name["a.wav"].numpy(), pcm) and np.array_equal(by_name["b.flac"].numpy(), pcm[:1000])
    assert audio["meta"]["stats"]["norm_std"] > 0
    text = load(tmp_path, "text", "train")
    tok = load_tokenizer(tmp_path / "prepared/text/tokenizer.json")
    decoded = sorted(tok.decode(ids.tolist()).strip() for ids in unflatten(text["shards"][0], "ids"))
    assert decoded == ["nine", "seven, as in 7"]
    det = load(tmp_path, "detection", "train")
    assert det["meta"]["classes"] == ["five"]
    assert np.allclose(det["shards"][0]["boxes"].numpy(), [[7 / 20, 14 / 40, 10 / 20, 20 / 40]])
    assert det["shards"][0]["image"].shape == (1, 1, 64, 64)


def test_changing_one_modalitys_preprocessing_reprepares_only_it(generated, tmp_path):
    shutil.copytree(generated[0], tmp_path / "raw")
    raw = tmp_path / "raw"
    src = {"image": {"format": "imagefolder", "train": str(raw / "images/train"), "test": str(raw / "images/test")},
           "text": {"format": "jsonl", "train": str(raw / "text/train.jsonl"), "test": str(raw / "text/test.jsonl")},
           "audio": {"format": "manifest", "train": str(raw / "audio/train.csv")}}
    first = prepare(params_for(tmp_path, src))
    assert not any(m["cached"] for m in first.values())
    again = prepare(params_for(tmp_path, src, image={"img_size": 24, "patch_size": 4}))  # the default is 16
    assert {m: meta["cached"] for m, meta in again.items()} == {"image": False, "text": True, "audio": True}
    shard = load(tmp_path, "image", "train")["shards"][0]
    assert shard["image"].shape[-1] == 24


def test_hash_splits_stay_put_when_files_are_added(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(60):
        png(tmp_path / "img" / str(i % 2) / f"{i}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    src = {"image": {"format": "imagefolder", "train": str(tmp_path / "img")}}

    def splits():
        params = params_for(tmp_path, src, image={"img_size": 8, "patch_size": 4})
        params.prepare.val_fraction = 0.2
        prepare(params)
        return {Path(s).name: split for split in SPLITS for s in load(tmp_path, "image", split)["sources"]}

    before = splits()
    assert set(before.values()) == {"train", "val", "test"}
    for i in range(60, 90):
        png(tmp_path / "img" / str(i % 2) / f"{i}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    after = splits()
    assert len(after) == 90 and all(after[k] == v for k, v in before.items())


def test_bad_configuration_stops_with_the_file_and_the_fix(tmp_path):
    png(tmp_path / "train/a/x.png", np.zeros((8, 8), np.uint8))
    png(tmp_path / "test/b/x.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(UserError, match="test classes \\['b'\\] differ from the train classes \\['a'\\]"):
        prepare(params_for(tmp_path, {"image": {"format": "imagefolder", "train": str(tmp_path / "train"),
                                                "test": str(tmp_path / "test")}}))
    with pytest.raises(UserError, match=r"nowhere.jsonl: no such file or folder \(prepare.sources.text.train\)"):  # found before image is prepared
        prepare(params_for(tmp_path, {"image": {"format": "imagefolder", "train": str(tmp_path / "train")},
                                      "text": {"format": "jsonl", "train": str(tmp_path / "nowhere.jsonl")}}))
    assert not (tmp_path / "prepared/image").exists()
    os.mkfifo(tmp_path / "fifo.jsonl")  # a text source that is a FIFO: refused, never opened (which would block)
    with pytest.raises(UserError, match="fifo.jsonl: not a regular file"):
        prepare(params_for(tmp_path, {"text": {"format": "jsonl", "train": str(tmp_path / "fifo.jsonl")}}))
    with pytest.raises(UserError, match=r"prepare.sources.image.format: 'coco' is not one of \['imagefolder'\]"):
        prepare(params_for(tmp_path, {"image": {"format": "coco", "train": str(tmp_path / "x.json")}}))
    (tmp_path / "params.yaml").write_text(f"prepare:\n  root: {tmp_path}\n  sources:\n    text: {{format: jsonl, train: {tmp_path}/none.jsonl}}\n")
    result = subprocess.run([sys.executable, "-m", "tessera.core.entry.cli", "prepare", "-p", str(tmp_path / "params.yaml")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "none.jsonl: no such file" in result.stderr and "Traceback" not in result.stderr


def hostile_corpus(tmp_path: Path) -> dict:
    """Bombs (pixels, duration, sample rate), links out of the dataset root and FIFOs, in every format, beside one
    good sample each. Returns the prepare.sources that read it."""
    import os

    rng = np.random.default_rng(7)
    outside = tmp_path / "elsewhere"
    png(outside / "secret.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    wav(outside / "secret.wav", rng.uniform(-0.5, 0.5, 800))
    img = tmp_path / "img"
    for c in ("a", "b"):
        png(img / c / "ok.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    png_header_only(img / "a" / "bomb.png", 20000, 20000)
    png_header_only(img / "b" / "big.png", 9000, 5000)  # 45 M pixels: under Pillow's own limit, over ours
    (img / "a" / "link.png").symlink_to(outside / "secret.png")
    (img / "stolen").symlink_to(outside, target_is_directory=True)  # a class folder that links out
    os.mkfifo(img / "b" / "fifo.png")
    aud = tmp_path / "aud"
    for c in ("yes", "no"):
        wav(aud / c / "ok.wav", rng.uniform(-0.5, 0.5, 4000))
    wav(aud / "yes" / "long.wav", rng.uniform(-0.1, 0.1, 61 * 4000), sr=4000)  # 61 s: over max_audio_seconds
    wav(aud / "no" / "slow.wav", rng.uniform(-0.1, 0.1, 8000), sr=1)  # claims 1 Hz: 8000 s, 128 M samples at 16 kHz
    wav(aud / "no" / "odd.wav", rng.uniform(-0.1, 0.1, 48001), sr=48001)  # an awkward ratio: soxr, not a 2 GB kernel
    (aud / "no" / "link.wav").symlink_to(outside / "secret.wav")
    os.mkfifo(aud / "yes" / "fifo.wav")
    (aud / "train.csv").write_text("path,label\nyes/ok.wav,yes\nno/ok.wav,no\nyes/fifo.wav,yes\nno/link.wav,no\n"
                                   "no/slow.wav,no\n")
    det = tmp_path / "det"
    png(det / "ok.png", np.zeros((20, 30), np.uint8))
    png_header_only(det / "bomb.png", 20000, 20000)
    os.mkfifo(det / "fifo.png")
    (det / "link.png").symlink_to(outside / "secret.png")
    names = ["ok.png", "bomb.png", "fifo.png", "link.png"]
    sizes = [(30, 20), (20000, 20000), (30, 20), (8, 8)]
    (det / "train.json").write_text(json.dumps({
        "categories": [{"id": 1, "name": "cat"}],
        "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, (w, h)) in enumerate(zip(names, sizes), 1)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 4, 4]} for i in range(1, 5)]}))
    return {"image": {"format": "imagefolder", "train": str(img)},
            "audio": {"format": "folder", "train": str(aud)},
            "manifest": {"format": "manifest", "train": str(aud / "train.csv")},
            "detection": {"format": "coco", "train": str(det / "train.json")}}


def test_bombs_links_out_of_the_root_and_fifos_are_quarantined_in_every_format_without_hanging(tmp_path):
    sources = hostile_corpus(tmp_path)
    reasons = {}
    for audio_source in ("audio", "manifest"):  # two audio formats, one after the other
        src = {k: v for k, v in sources.items() if k in ("image", "detection")} | {"audio": sources[audio_source]}
        params = params_for(tmp_path, src, image={"img_size": 8, "patch_size": 4},
                            detection={"img_size": 16, "patch_size": 8, "num_queries": 4})
        params.prepare.test_fraction = 0.0
        prepare(params)
        for q in map(json.loads, open(tmp_path / "prepared/quarantine.jsonl")):
            reasons[(q["modality"], q["path"].rsplit("/", 1)[1])] = q["reason"]
        counts = json.loads((tmp_path / "m.json").read_text())
        # yes/ok and no/ok, and in the folder source no/odd.wav (48,001 Hz: resampled, not refused)
        assert counts["audio"]["train"]["prepared"] == {"audio": 3, "manifest": 2}[audio_source], counts
    assert "exceeds prepare.max_image_pixels" in reasons[("image", "bomb.png")]
    assert "9000 x 5000 pixels exceeds prepare.max_image_pixels (40,000,000)" in reasons[("image", "big.png")]
    assert "escapes the dataset root" in reasons[("image", "link.png")]
    assert "escapes the dataset root" in reasons[("image", "secret.png")]  # through the linked class folder
    assert "not a regular file" in reasons[("image", "fifo.png")]
    assert "max_audio_seconds is 60 s" in reasons[("audio", "long.wav")]
    assert "sample rate 1 Hz outside prepare.audio_rates" in reasons[("audio", "slow.wav")]
    assert "escapes the dataset root" in reasons[("audio", "link.wav")] and reasons[("audio", "train.csv:5")]
    assert "not a regular file" in reasons[("audio", "fifo.wav")]
    assert "exceeds prepare.max_image_pixels" in reasons[("detection", "bomb.png")]
    assert "not a regular file" in reasons[("detection", "fifo.png")]
    assert "escapes the dataset root" in reasons[("detection", "train.json:image 4")]
    image = json.loads((tmp_path / "prepared/image/meta.json").read_text())
    assert image["classes"] == ["a", "b"] and image["counts"]["train"]["prepared"] == 2


@pytest.mark.slow
def test_prepare_on_the_hostile_corpus_stays_within_its_memory_bound(tmp_path):
    """Peak RSS of a `tessera prepare` process on the corpus above, over its RSS once its modules are loaded (about
    0.9 GB of torch and friends): under 256 MB. Decoded, the bombs would take 1.2 GB (pixels), 5.2 GB (the 1 Hz
    header, resampled) and 2 GB (torchaudio's kernel for the 48,001 Hz ratio) more."""
    import yaml

    sources = hostile_corpus(tmp_path)
    sources.pop("manifest")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "model": {"image": {"img_size": 8, "patch_size": 4}, "detection": {"img_size": 16, "patch_size": 8, "num_queries": 4}},
        "prepare": {"root": str(tmp_path), "out": str(tmp_path / "prepared"), "metrics": str(tmp_path / "m.json"),
                    "sources": sources}}))
    code = ("import resource, sys\nimport tessera.core.stages.prepare, tessera.core.entry.cli\n"
            "loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "sys.argv = ['tessera', 'prepare', '-p', sys.argv[1]]\n"
            "try:\n    tessera.core.entry.cli.main()\nexcept SystemExit:\n    pass\n"
            "print(loaded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "params.yaml")], capture_output=True, text=True)
    loaded, peak = (int(v) / 1024 for v in result.stdout.strip().splitlines()[-1].split())
    assert json.loads((tmp_path / "m.json").read_text())["audio"]["train"]["quarantined"] == 4
    print(f"peak RSS {peak:.0f} MB, {peak - loaded:.0f} MB over the {loaded:.0f} MB of loaded modules")
    assert peak - loaded < 256, (loaded, peak)


def test_a_crashed_prepare_leaves_no_stale_quarantine_report_and_shards_name_files_relative_to_prepare_root(tmp_path):
    png(tmp_path / "img/a/x.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "img/a/bad.png").write_text("not an image")
    params = params_for(tmp_path, {"image": {"format": "imagefolder", "train": str(tmp_path / "img")}},
                        image={"img_size": 8, "patch_size": 4})
    params.prepare.test_fraction = 0.0
    prepare(params)
    assert load(tmp_path, "image", "train")["sources"] == ["img/a/x.png"]  # not an absolute path of this machine
    assert (tmp_path / "prepared/quarantine.jsonl").read_text()
    (tmp_path / "img/a").rename(tmp_path / "img/.a")  # no class folder left: prepare stops
    with pytest.raises(UserError):
        prepare(params)
    assert not (tmp_path / "prepared/quarantine.jsonl").exists()

def test_a_split_column_in_a_manifest_puts_each_row_in_the_split_it_names(tmp_path):
    rng = np.random.default_rng(3)
    rows = ["path,label,split"]
    for i in range(12):
        wav(tmp_path / "aud" / f"{i}.wav", rng.uniform(-0.5, 0.5, 1600))
        rows.append(f"{i}.wav,{'yes' if i % 2 else 'no'},{['train', 'val', 'test'][i % 3]}")
    rows.append("0.wav,yes,holdout")
    rows.append("gone.wav,yes,val")  # quarantined, and counted in the split it names
    (tmp_path / "aud/all.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"word {i}", "label": str(i % 2), "split": s}) + "\n"
                                              for i, s in enumerate(["train", "train", "Val", "test", "train"])))
    params = params_for(tmp_path, {"audio": {"format": "manifest", "train": str(tmp_path / "aud/all.csv")},
                                   "text": {"format": "jsonl", "train": str(tmp_path / "t.jsonl")}}, text={"vocab_size": 300})
    params.prepare.val_fraction = 0.5  # the column wins over the hash
    prepare(params)
    for split in SPLITS:
        names = sorted(Path(s).name for s in load(tmp_path, "audio", split)["sources"])
        assert names == sorted(f"{i}.wav" for i in range(12) if ["train", "val", "test"][i % 3] == split)
    counts = json.loads((tmp_path / "m.json").read_text())
    assert counts["text"] == {"train": {"in": 3, "prepared": 3, "quarantined": 0}, "val": {"in": 1, "prepared": 1, "quarantined": 0},
                              "test": {"in": 1, "prepared": 1, "quarantined": 0}}
    bad = [json.loads(line) for line in open(tmp_path / "prepared/quarantine.jsonl")]
    assert [(q["split"], q["reason"]) for q in bad] == [("train", "split 'holdout' is not one of ['train', 'val', 'test']"),
                                                        ("val", "missing file")]

def test_every_format_names_its_quarantined_samples_and_its_shards_relative_to_prepare_root(tmp_path, monkeypatch):
    """One bad sample (and one good) in every format. The sources are given relative to the working directory, and
    prepare.root is reached through a link (the image source through another), so that a class folder's files (listed
    as written) and a manifest's or a COCO file's (listed resolved) all come back relative to the root, as do
    "file:line" sources."""
    rng = np.random.default_rng(11)
    store = tmp_path / "store"
    png(store / "img/a/ok.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    png(store / "img/b/ok.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    (store / "img/b/bad.png").write_text("not an image")
    for c in ("yes", "no"):
        wav(store / "aud" / c / "ok.wav", rng.uniform(-0.5, 0.5, 1600))
    (store / "aud/no/bad.wav").write_bytes(b"RIFF....this is not audio" * 10)
    (store / "aud/list.csv").write_text("path,label\nyes/ok.wav,yes\nno/ok.wav,no\nno/bad.wav,no\ngone.wav,yes\n")
    (store / "txt").mkdir()
    (store / "txt/t.jsonl").write_text('{"text": "one", "label": "1"}\n{"text": "two", "label": "2"}\n{"text": oops}\n')
    (store / "txt/t.csv").write_text("text,label\none,1\ntwo,2\n,2\n")
    (store / "tab").mkdir()
    (store / "tab/t.csv").write_text("size,label\n1.5,a\n2.5,b\n,b\n")
    (store / "tab/t.jsonl").write_text('{"size": 1.5, "label": "a"}\n{"size": 2.5, "label": "b"}\n{"label": "b"}\n')
    png(store / "det/pics/ok.png", np.zeros((20, 30), np.uint8))
    (store / "det/pics/bad.png").write_text("not an image")
    (store / "det/c.json").write_text(json.dumps({
        "categories": [{"id": 1, "name": "cat"}],
        "images": [{"id": i, "file_name": n, "width": 30, "height": 20} for i, n in enumerate(["ok.png", "bad.png", "ok.png"], 1)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]},
                        {"id": 2, "image_id": 3, "category_id": 1, "bbox": [1, 1, 40, 4]}]}))  # image 3: outside
    (tmp_path / "raw").symlink_to(store, target_is_directory=True)
    (tmp_path / "alias").symlink_to(store, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    rounds = [{"image": {"format": "imagefolder", "train": "alias/img"},
               "audio": {"format": "folder", "train": "raw/aud"},
               "text": {"format": "jsonl", "train": "raw/txt/t.jsonl"},
               "tabular": {"format": "table", "train": "raw/tab/t.csv"},
               "detection": {"format": "coco", "train": "raw/det/c.json", "images": "raw/det/pics"}},
              {"audio": {"format": "manifest", "train": "raw/aud/list.csv"},
               "text": {"format": "csv", "train": "raw/txt/t.csv"},
               "tabular": {"format": "table", "train": "raw/tab/t.jsonl"}}]
    expected = [{("image", "img/b/bad.png"), ("audio", "aud/no/bad.wav"), ("text", "txt/t.jsonl:3"),
                 ("tabular", "tab/t.csv:4"), ("detection", "det/pics/bad.png"), ("detection", "det/c.json:image 3")},
                {("audio", "aud/no/bad.wav"), ("audio", "aud/gone.wav"), ("text", "txt/t.csv:4"), ("tabular", "tab/t.jsonl:3")}]
    for sources, bad in zip(rounds, expected):
        params = parse_params({"model": {"image": {"img_size": 8, "patch_size": 4}, "text": {"vocab_size": 300},
                                         "detection": {"img_size": 16, "patch_size": 8, "num_queries": 4}},
                               "prepare": {"root": "raw", "out": "prepared", "metrics": "m.json", "val_fraction": 0.0,
                                           "test_fraction": 0.0, "sources": sources}})
        prepare(params)
        report = [json.loads(line) for line in open("prepared/quarantine.jsonl")]
        assert {(q["modality"], q["path"]) for q in report} == bad
        assert not any(str(tmp_path) in q["reason"] for q in report), report  # nor a path of this machine in a reason
        prepared = {(m, s) for m in sources for s in load(tmp_path, m, "train")["sources"]}
        assert all((tmp_path / "raw" / s.split(":")[0]).is_file() for _, s in prepared), prepared
        assert ("image", "img/a/ok.png") in prepared or "image" not in sources
        assert ("audio", "aud/yes/ok.wav") in prepared


def test_a_file_that_cannot_be_opened_is_quarantined_with_the_reason_and_no_path_of_this_machine(tmp_path):
    rng = np.random.default_rng(12)
    for c in ("yes", "no"):
        wav(tmp_path / "aud" / c / "ok.wav", rng.uniform(-0.5, 0.5, 1600))
        png(tmp_path / "img" / c / "ok.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    locked = [wav(tmp_path / "aud/no/locked.wav", rng.uniform(-0.5, 0.5, 1600)), png(tmp_path / "img/no/locked.png", np.zeros((8, 8), np.uint8))]
    for path in locked:
        path.chmod(0)
    try:
        locked[0].open("rb").close()
    except PermissionError:
        pass
    else:
        pytest.skip("this user opens a file whatever its mode (root, with CAP_DAC_OVERRIDE)")
    params = params_for(tmp_path, {"audio": {"format": "folder", "train": str(tmp_path / "aud")},
                                   "image": {"format": "imagefolder", "train": str(tmp_path / "img")}},
                        image={"img_size": 8, "patch_size": 4})
    params.prepare.test_fraction = 0.0
    try:
        prepare(params)
        unreadable = r"^cannot open the file \(Permission denied\)$"  # and the same from the readers predict uses
        with pytest.raises(BadSample, match=unreadable):
            load_audio(locked[0], 16000, 60, (4000, 192000))
        with pytest.raises(BadSample, match=unreadable):
            load_image(locked[1], 8, 1, 10**6)
    finally:
        for path in locked:
            path.chmod(0o644)
    report = {(q["modality"], q["path"]): q["reason"] for q in map(json.loads, open(tmp_path / "prepared/quarantine.jsonl"))}
    assert report.keys() == {("audio", "aud/no/locked.wav"), ("image", "img/no/locked.png")}
    assert all("cannot open the file (Permission denied)" in r and str(tmp_path) not in r for r in report.values()), report
