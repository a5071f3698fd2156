"""Reading inputs to predict on (each modality's infer.py): an upload's bytes read exactly as the same file does, a
truncated clip refused as truncated, and an image checked against Tessera's own pixel limit alone."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from helpers import png_header_only
from tessera.core.config import ModelConfig, PrepareConfig, TabularConfig
from tessera.core.data.files import BadSample
from tessera.core.modality import InputLimits
from tessera.modalities.image import load_image
from tessera.modalities.io import READERS
from tessera.modalities.tabular import infer_columns
from tessera.modalities.text import train_tokenizer

LIMITS = InputLimits.of_prepare(PrepareConfig())
ROWS = [{"size": 1.5, "colour": "red"}, {"size": "n/a", "colour": "blue"}, {"size": 3, "colour": "green"}]


def clip(seconds: float = 0.5, sr: int = 16000) -> np.ndarray:
    return np.random.default_rng(0).uniform(-0.5, 0.5, int(seconds * sr)).astype(np.float32)


def encoded(samples: np.ndarray, fmt: str, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt)
    return buf.getvalue()


def image_bytes(mode: str, fmt: str) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 255, (20, 30, 3) if mode == "RGB" else (20, 30), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def config_for(modality: str, folder: Path) -> dict:
    """An export's config.json as far as the modality's reader reads it (with its tokenizer.json in `folder`)."""
    cfg = ModelConfig(image={"img_size": 8, "in_chans": 1, "patch_size": 4},
                      detection={"img_size": 32, "in_chans": 3, "patch_size": 8})
    if modality == "text":
        (folder / "tokenizer.json").write_text(train_tokenizer(["seven", "three nine", "one two"], 300).to_str())
    if modality == "tabular":
        cfg.tabular = infer_columns(TabularConfig(), ROWS)
    return {"model": cfg.model_dump()}


# (modality, file name, its bytes): every format each reader takes, and inputs it refuses
FILES = [
    ("image", "grey.png", image_bytes("L", "PNG")),
    ("image", "photo.jpg", image_bytes("RGB", "JPEG")),
    ("image", "bomb.png", None),  # a header of 20000 x 20000 pixels: refused
    ("image", "notes.png", b"not an image"),
    ("detection", "canvas.webp", image_bytes("RGB", "WEBP")),
    ("audio", "clip.wav", encoded(clip(), "WAV")),
    ("audio", "clip.flac", encoded(clip(), "FLAC")),
    ("audio", "clip.ogg", encoded(clip(), "OGG")),
    ("audio", "cut.wav", encoded(clip(), "WAV")[:-4000]),  # truncated: refused
    ("text", "lines.txt", "seven\n\n  three nine \nuna ñ\n".encode()),
    ("text", "latin.txt", "caf\xe9".encode("latin-1")),  # not UTF-8: refused
    ("text", "rows.jsonl", b'{"text": "seven"}\n{"text": 7}\nnot json\n{"text": "one two"}\n'),
    ("text", "rows.csv", b"\xef\xbb\xbftext,label\nseven,7\n,3\none two,1\n"),
    ("tabular", "rows.csv", b"size,colour\n2.5,red\nlots,blue\n4,purple\n"),
    ("tabular", "rows.jsonl", b'{"size": 2.5, "colour": "green"}\n{"colour": "red"}\n'),
    ("tabular", "rows.parquet", None),
]


def same(a, b) -> bool:
    """Equal values, arrays equal in dtype, shape and every element."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("modality, name, data", FILES, ids=[f"{m}-{n}" for m, n, _ in FILES])
def test_reading_an_uploads_bytes_gives_exactly_what_reading_the_same_file_gives(tmp_path, modality, name, data):
    path = tmp_path / name
    if name == "bomb.png":
        png_header_only(path, 20000, 20000)
    elif name == "rows.parquet":
        pq.write_table(pa.Table.from_pylist([{"size": 2.5, "colour": "red"}, {"size": 1.0, "colour": "mauve"}]), path)
    else:
        path.write_bytes(data)
    read, batch = READERS[modality].predict_io(config_for(modality, tmp_path), tmp_path, LIMITS)
    from_file = list(read(path))
    from_bytes = list(read(path.read_bytes(), str(path)))
    assert from_file, "the reader gave nothing"
    assert [(s, e) for s, _, e in from_bytes] == [(s, e) for s, _, e in from_file]
    assert all(same(a, b) for (_, a, _), (_, b, _) in zip(from_file, from_bytes))
    items = [item for _, item, error in from_file if error is None]
    if items:  # and the model's inputs built from them
        assert same(batch(items), batch([item for _, item, error in from_bytes if error is None]))


def test_an_uploads_name_names_its_inputs_and_gives_its_format(tmp_path):
    read, _ = READERS["text"].predict_io(config_for("text", tmp_path), tmp_path, LIMITS)
    assert [s for s, _, _ in read(b'{"text": "seven"}\n{"text": "one"}\n', "upload.jsonl")] == ["upload.jsonl:1", "upload.jsonl:2"]
    assert list(read(b'{"text": "seven"}\n', "upload.txt")) == [("upload.txt:1", '{"text": "seven"}', None)]


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_a_clip_that_holds_fewer_frames_than_its_header_claims_is_refused_as_truncated(tmp_path, fmt):
    """libsndfile reads a cut WAV short without a word (it counts the frames the file holds), and stops a cut FLAC
    with a decoder error: either way the reader says the clip is truncated, so serve answers 422, not a prediction
    on half a clip."""
    whole = encoded(clip(1.0), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(whole[: len(whole) * 2 // 3])
    read, _ = READERS["audio"].predict_io({"model": ModelConfig().model_dump()}, tmp_path, LIMITS)
    for source in (path, path.read_bytes()):
        [(_, item, error)] = read(source, str(path))
        assert item is None and error.startswith("truncated audio: the header claims 16,000 frames, the file holds "), error
    (tmp_path / "whole.wav").write_bytes(whole)
    [(_, item, error)] = read(tmp_path / "whole.wav")
    assert error is None and len(item) == 16000


def test_an_image_is_held_to_tesseras_pixel_limit_and_not_to_pillows_process_wide_one(tmp_path, monkeypatch):
    """Pillow's Image.MAX_IMAGE_PIXELS is the process's (here a strict 1,000 pixels, whose double Image.open
    refuses with DecompressionBombError): Tessera neither changes it nor is stopped by it, and refuses from the
    header what passes its own limit (prepare.max_image_pixels, serve.max_image_pixels)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(tmp_path / "wide.png")  # 2,500 pixels
    assert load_image(tmp_path / "wide.png", 8, 1, max_pixels=10_000).shape == (1, 8, 8)
    with pytest.raises(BadSample, match="image of 50 x 50 pixels exceeds serve.max_image_pixels \\(2,000\\)"):
        load_image(tmp_path / "wide.png", 8, 1, max_pixels=2000, key="serve.max_image_pixels")
    assert Image.MAX_IMAGE_PIXELS == 1000
