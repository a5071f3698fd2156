"""A sample's output never depends on the batch around it: alone, or padded among others of other lengths, each
task model gives the same answer to 1e-5, in eager PyTorch, ONNX Runtime and torch.export alike; a fused task's
also whichever inputs its batch-mates lack (an absent input's rows holding another sample's values).

Lengths are mixed on purpose: text of 1 to 16 tokens, audio below and above `max_frames` (32 frames, 0.32 s),
odd and even `n_fft`. This is the property `tessera predict` and evaluation rely on when they batch files.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tessera.core.config import AudioConfig, ModelConfig, TextConfig
from tessera.core.stages.export import Deployable, FusedDeployable, fused_net, traced, write_format
from tessera.modalities import build_task_model

SR = 16000


def config(n_fft: int = 400) -> ModelConfig:
    return ModelConfig(size="debug", text=TextConfig(vocab_size=50, max_len=16),
                       audio=AudioConfig(n_mels=32, patch_size=8, n_fft=n_fft, max_frames=32))


def inputs(modality: str, cfg: ModelConfig, g: torch.Generator) -> tuple[tuple[torch.Tensor, ...], list[int] | None]:
    """A batch of the exported model's positional inputs, and each sample's own length (None: fixed size)."""
    if modality in ("image", "detection"):
        c = cfg.image if modality == "image" else cfg.detection
        return (torch.randint(0, 256, (5, c.in_chans, c.img_size, c.img_size), generator=g, dtype=torch.uint8),), None
    if modality == "text":
        lengths = [16, 1, 7, 12, 3]
        ids = torch.randint(2, 50, (5, 16), generator=g)
        return (ids, torch.arange(16) >= torch.tensor(lengths)[:, None]), lengths
    lengths = [SR // 20, 4 * SR // 10, 3 * SR // 10 + 79, SR, 2 * SR + 123]  # 6 to 202 frames; max_frames 32
    t = torch.arange(max(lengths)) / SR
    wave = torch.stack([0.3 * torch.sin(2 * torch.pi * (200 + 400 * i) * t) for i in range(5)])
    wave = wave + 0.05 * torch.randn(wave.shape, generator=g)
    wave = wave.masked_fill(torch.arange(len(t)) >= torch.tensor(lengths)[:, None], 0.0)
    return (wave, torch.tensor(lengths)), lengths


def sample(args: tuple[torch.Tensor, ...], i: int, length: int | None) -> tuple[torch.Tensor, ...]:
    """Sample i alone, cut to its own length: the way it would arrive without a batch around it."""
    one = tuple(a[i:i + 1] for a in args)
    if length is None:
        return one
    if one[0].dtype == torch.int64 and len(one) == 2 and one[1].dtype == torch.bool:  # text: ids and pad_mask
        return one[0][:, :length], one[1][:, :length]
    return one[0][:, :length], one[1]  # audio: waveform and lengths


CASES = [("image", "classification", 400), ("text", "classification", 400), ("audio", "classification", 400),
         ("audio", "classification", 401), ("detection", "detection", 400), ("audio", "contrastive", 401)]


@pytest.mark.slow
@pytest.mark.parametrize("modality,head,n_fft", CASES, ids=[f"{m}-{h}-{n}" for m, h, n in CASES])
def test_each_sample_gets_its_own_answer_alone_and_in_a_batch_in_every_format(modality, head, n_fft, tmp_path):
    cfg = config(n_fft)
    contrastive = head == "contrastive"
    net = Deployable(build_task_model(modality, cfg, 0 if contrastive else 4, contrastive=contrastive), modality, head, cfg).eval()
    args, lengths = inputs(modality, cfg, torch.Generator().manual_seed(n_fft))
    program = traced(net, args)
    for fmt in ("pt2", "onnx"):
        write_format(fmt, tmp_path, net, args, program, 18)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(tmp_path / "model.pt2").module()
    runners = {
        "eager": lambda a: [o.numpy() for o in net(*a)],
        "onnx": lambda a: session.run(None, {n: x.numpy() for n, x in zip(net.input_names, a)}),
        "pt2": lambda a: [o.numpy() for o in program(*a)],
    }
    with torch.no_grad():
        for fmt, run in runners.items():
            together = run(args)
            for i in range(len(args[0])):
                alone = run(sample(args, i, lengths[i] if lengths else None))
                for name, a, b in zip(("first", "second", "third", "fourth"), together, alone):
                    diff = np.abs(a[i].astype(np.float64) - b[0].astype(np.float64)).max()
                    assert diff < 1e-5, f"{fmt}: sample {i}, output {name}: {diff:.2g}"


FUSED = {"photo": "image", "caption": "text", "clip": "audio"}  # input -> modality
PRESENT = [[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]]  # batch-mates lack different inputs


@pytest.mark.parametrize("formats", [("eager",), pytest.param(("pt2", "onnx"), marks=pytest.mark.slow)], ids=["eager", "exported"])
def test_a_fused_samples_answer_is_the_same_alone_and_among_batch_mates_lacking_other_inputs(formats, tmp_path):
    cfg = config(401)
    fused = [{"name": name, "modality": m, "config": getattr(cfg, m).model_dump()} for name, m in FUSED.items()]
    net = FusedDeployable(fused_net("shop", fused, cfg, 4), "shop", fused, cfg).eval()
    g = torch.Generator().manual_seed(1)
    batch = {name: inputs(m, cfg, g) for name, m in FUSED.items()}  # input -> (exported inputs, lengths)
    present = torch.tensor(PRESENT, dtype=torch.bool)
    args = (*(a for own, _ in batch.values() for a in own), present)
    runners = {"eager": lambda a: net(*a)[0].numpy()}
    if "pt2" in formats:  # traced and written as `tessera export` does (1-3 s a format)
        program = traced(net, args)
        for fmt in formats:
            write_format(fmt, tmp_path, net, args, program, 18)
        session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        loaded = torch.export.load(tmp_path / "model.pt2").module()
        runners = {"onnx": lambda a: session.run(None, {n: x.numpy() for n, x in zip(net.input_names, a)})[0],
                   "pt2": lambda a: loaded(*a)[0].numpy()}
    with torch.no_grad():
        for fmt, run in runners.items():
            together = run(args)
            for i in range(len(present)):
                alone = []
                for k, (own, lengths) in enumerate(batch.values()):
                    j = i if present[i, k] else (i + 1) % len(present)  # an absent input holds another sample's values
                    alone += sample(own, j, lengths[j] if lengths else None)
                got = run((*alone, present[i: i + 1]))
                diff = np.abs(got[0].astype(np.float64) - together[i].astype(np.float64)).max()
                assert diff < 1e-5, f"{fmt}: sample {i} (present {PRESENT[i]}): {diff:.2g}"
