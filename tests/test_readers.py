"""Reading inputs to predict on (each modality's infer.py): an upload's bytes read exactly as the same file does, a
truncated clip refused as truncated, and an image checked against Tessera's own pixel limit alone."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from helpers import png_header_only
from tessera.core.config import ModelConfig, PrepareConfig, TabularConfig, parse_params
from tessera.core.data.shards import read_shards
from tessera.core.data.files import BadSample
from tessera.core.modality import InputLimits
from tessera.modalities.image import load_image
from tessera.modalities.io import READERS
from tessera.modalities.tabular import infer_columns
from tessera.core.stages.prepare import prepare_data
from tessera.modalities.text import train_tokenizer

LIMITS = InputLimits.of(PrepareConfig(), "prepare")
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


def test_the_limits_of_either_section_come_from_one_constructor_and_a_refusal_names_that_sections_keys(tmp_path):
    """InputLimits.of(section's config, its name): serve's own values, and its keys in each refusal."""
    serve = parse_params({"serve": {"max_audio_seconds": 2.0, "audio_rates": [8000, 48000]}}).serve
    limits = InputLimits.of(serve, "serve")
    assert (limits.max_audio_seconds, limits.audio_rates, limits.key("max_image_pixels")) == (
        2.0, (8000, 48000), "serve.max_image_pixels")
    read, _ = READERS["audio"].predict_io({"model": ModelConfig().model_dump()}, tmp_path, limits)
    (tmp_path / "slow.wav").write_bytes(encoded(clip(1.0, 4000), "WAV", 4000))
    (tmp_path / "long.wav").write_bytes(encoded(clip(3.0), "WAV"))
    assert next(read(tmp_path / "slow.wav"))[2] == "sample rate 4000 Hz outside serve.audio_rates [8000, 48000]"
    assert next(read(tmp_path / "long.wav"))[2].startswith("3.0 s of audio; serve.max_audio_seconds is 2 s")


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


def png_16_bit(samples: np.ndarray) -> bytes:
    """uint16 [H, W] (grey) or [H, W, 3] (RGB) as a 16-bit PNG, written by hand: Pillow writes 16-bit grey, not RGB."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)  # filter type 0 before each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if samples.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_deep_greyscale_and_16_bit_rgb_are_scaled_to_8_bits_not_clipped_in_prepare_and_every_reader(tmp_path):
    """A known 16-bit gradient (0..65520 in steps of 16, no two neighbours alike in their low byte) comes out as
    value >> 8 wherever an image is read: 16-bit grey PNG, 32-bit integer TIFF (Pillow's mode "I"), and 16-bit RGB
    PNG, through prepare and through the readers predict, serve and explain share (a path and its bytes), for grey
    and RGB models and for detection. Clipping would turn all but the first 16 values white."""
    S = 64
    gradient = (np.arange(S * S, dtype=np.uint16) * 16).reshape(S, S)  # [S, S], 0..65520
    rgb = np.stack([gradient, gradient[::-1], gradient.T], axis=-1)  # [S, S, 3], three different gradients
    files = {"grey16.png": gradient, "grey32.tif": gradient, "rgb16.png": rgb}
    (tmp_path / "img/a").mkdir(parents=True)
    Image.fromarray(gradient).save(tmp_path / "img/a/grey16.png")
    Image.fromarray(gradient.astype(np.int32)).save(tmp_path / "img/a/grey32.tif")
    (tmp_path / "img/a/rgb16.png").write_bytes(png_16_bit(rgb))
    assert [Image.open(tmp_path / "img/a" / n).mode for n in files] == ["I;16", "I", "RGB"]

    def expected(samples: np.ndarray, in_chans: int) -> np.ndarray:
        """uint8 [C, S, S]: the top byte of each sample; grey repeated as RGB, RGB as Pillow makes grey of it."""
        top = (samples >> 8).astype(np.uint8)
        if top.ndim == 2:
            return np.repeat(top[None], in_chans, axis=0)
        return top.transpose(2, 0, 1) if in_chans == 3 else np.asarray(Image.fromarray(top).convert("L"))[None]

    for section, in_chans in (("image", 1), ("image", 3), ("detection", 3)):
        config = {"model": ModelConfig(**{section: {"img_size": S, "in_chans": in_chans, "patch_size": 8}}).model_dump()}
        read, _ = READERS[section].predict_io(config, tmp_path, LIMITS)
        for name, samples in files.items():
            path = tmp_path / "img/a" / name
            for source in (path, path.read_bytes()):
                [(_, (pixels, size), error)] = read(source, name)
                assert error is None and size == (S, S)
                assert np.array_equal(pixels, expected(samples, in_chans)), (section, in_chans, name)

    params = parse_params({"model": {"image": {"img_size": S, "in_chans": 3, "patch_size": 8}},
                           "prepare": {"root": str(tmp_path), "out": str(tmp_path / "prepared"), "val_fraction": 0.0,
                                       "test_fraction": 0.0, "metrics": str(tmp_path / "m.json"),
                                       "sources": {"image": {"format": "imagefolder", "train": str(tmp_path / "img")}}}})
    meta = prepare_data(params)["image"]
    folder = tmp_path / "prepared/image"
    [shard] = meta["splits"]["train"]
    names = json.loads((folder / (shard + ".json")).read_text())
    prepared = dict(zip(names, next(read_shards(folder, [shard]))["image"].numpy()))
    assert {n: np.array_equal(prepared[f"img/a/{n}"], expected(s, 3)) for n, s in files.items()} == dict.fromkeys(files, True)
