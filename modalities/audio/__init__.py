"""Audio adapter, AST-style (Gong et al., 2021, arXiv:2104.01778).

Waveform [B, T] -> log-mel spectrogram [B, F, frames] computed by torchaudio on the model's device -> dataset
normalisation -> SpecAugment (Park et al., 2019, arXiv:1904.08779) in training only -> 16 x 16 patches ->
[CLS] + tokens with learnt frequency and time position embeddings. Clips of any length share a batch through a
padding mask; any input sample rate is resampled to the configured one.

A clip's tokens never depend on the batch around it: resampled clips are cut back to their own length (the
resampling filter rings past the end), the STFT pads with zeros (pad_mode="constant", as librosa does), so a
clip's frames are the same alone or zero-padded in a longer batch, frames past the clip's end are zeroed after
normalisation, and time positions follow from the clip's own length (`time_positions`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from tessera.core.config import AudioConfig, ModelConfig, Params
from tessera.core.data.batching import pcm_to_float, to_int16
from tessera.core.data.files import (BadSample, Entry, field, list_class_folders, list_flat_folder, open_binary,
                                     read_rows, refuse_label, resolve_inside, source_file, split_column)
from tessera.core.modality import Modality, PrepareContext
from tessera.modalities.image import PatchEmbed

SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".mp3"})  # what audio files end in


class LogMel(nn.Module):
    """waveform [B, T] in [-1, 1] -> log mel power [B, n_mels, frames(T)] (natural log, floor 1e-6).

    The STFT (periodic Hann window, centred, zero padding, as librosa's pad_mode="constant") is a strided conv1d
    with a DFT basis, and the Slaney mel filter bank (librosa's) a matmul: plain ops that every runtime computes
    alike, so an exported model keeps its log-mel to float precision (ONNX's own STFT is ~1e-2 off in log
    space). The bases follow from the parameters and stay out of the state dict.
    """

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        freqs = n_fft // 2 + 1
        angle = 2 * torch.pi * torch.arange(freqs, dtype=torch.float64)[:, None] * torch.arange(n_fft) / n_fft
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        basis = torch.cat([angle.cos(), -angle.sin()]) * window  # [2 * freqs, n_fft]: real rows, then imaginary
        self.register_buffer("dft", basis.float()[:, None, :], persistent=False)
        fbank = torchaudio.functional.melscale_fbanks(freqs, f_min, f_max if f_max is not None else sample_rate / 2,
                                                      n_mels, sample_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("fbank", fbank.T.contiguous(), persistent=False)  # [n_mels, freqs]

    def frames(self, samples: torch.Tensor) -> torch.Tensor:
        """STFT frames of clips of `samples` samples (any shape), counted from the padding `forward` applies:
        T // hop + 1 for an even n_fft, (T - 1) // hop + 1 for an odd one (librosa's count, center=True)."""
        return (samples + 2 * (self.n_fft // 2) - self.n_fft) // self.hop_length + 1

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = F.pad(waveform.float()[:, None, :], (self.n_fft // 2, self.n_fft // 2))  # [B, 1, T + 2 * (n_fft // 2)]
        spec = F.conv1d(x, self.dft, stride=self.hop_length)  # [B, 2 * freqs, frames]
        re, im = spec.chunk(2, dim=1)
        return torch.log(torch.matmul(self.fbank, re * re + im * im) + 1e-6)


class AudioAdapter(nn.Module):
    """forward(waveform [B, T], lengths [B] samples or None, sample_rate Hz or None) -> (tokens, pad_mask).

    tokens: [B, 1 + F/p * ceil(frames/p), D], frequency-major; pad_mask: [B, same], True where the patch
    column lies wholly past the clip's end. `norm_mean` / `norm_std` are the training set's log-mel statistics.
    `max_frames` is the length the learnt time positions cover; longer clips take them stretched.
    """

    def __init__(self, embed_dim: int, c: AudioConfig, drop_rate: float):
        super().__init__()
        self.sample_rate = c.sample_rate
        self.patch_size = p = c.patch_size
        self.logmel = LogMel(c.sample_rate, c.n_fft, c.hop_length, c.n_mels)
        self.register_buffer("norm_stats", torch.tensor([c.norm_mean, c.norm_std]))
        self.spec_augment = nn.Sequential(
            torchaudio.transforms.FrequencyMasking(c.freq_mask, iid_masks=True),
            torchaudio.transforms.TimeMasking(c.time_mask, iid_masks=True),
        )
        self.patch_embed = PatchEmbed(p, 1, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.freq_pos = nn.Parameter(torch.zeros(1, embed_dim, c.n_mels // p, 1))
        self.time_pos = nn.Parameter(torch.zeros(1, embed_dim, 1, -(-c.max_frames // p)))
        self.pos_drop = nn.Dropout(drop_rate)
        for p in (self.freq_pos, self.time_pos):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def spectrogram(self, waveform: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised log-mel [B, F, frames] with padded frames zeroed, and the valid frame counts [B]."""
        spec = self.logmel(waveform)
        mean, std = self.norm_stats
        spec = (spec - mean) / (2 * std)  # AST's normalisation: roughly zero mean, std 0.5
        if self.training:
            spec = self.spec_augment(spec)
        valid = self.logmel.frames(lengths)  # [B]
        frame_pad = torch.arange(spec.shape[-1], device=spec.device) >= valid[:, None]  # [B, frames]
        return spec.masked_fill(frame_pad[:, None, :], 0.0), valid

    def time_positions(self, cols: torch.Tensor, tp: int) -> torch.Tensor:
        """Time position embeddings [B, tp, D] of clips that fill `cols` [B] of `tp` patch columns.

        A clip of c <= T columns (T: the learnt table's length, from max_frames) takes positions 0..c-1 of the
        table; a longer one takes the table stretched to c columns (linear, as F.interpolate with
        align_corners=False). Each clip's positions follow from its own length alone, never from the batch's.
        """
        table = self.time_pos[0, :, 0].T  # [T, D]
        T = table.shape[0]
        stretch = cols.clamp(min=T).to(table.dtype)[:, None] / T  # [B, 1], 1 for clips that fit the table
        u = (torch.arange(tp, device=cols.device, dtype=table.dtype) + 0.5) / stretch - 0.5  # [B, tp], table index
        u = u.clamp(0, T - 1)
        lo = u.floor().long()
        hi = (lo + 1).clamp(max=T - 1)
        w = (u - lo.to(u.dtype))[..., None]  # [B, tp, 1]; exactly 0 where a clip fits the table
        return table[lo] * (1 - w) + table[hi] * w

    def forward(
        self, waveform: torch.Tensor, lengths: torch.Tensor | None = None, sample_rate: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B = waveform.shape[0]
        if lengths is None:
            lengths = torch.full((B,), waveform.shape[-1], device=waveform.device, dtype=torch.long)
        if sample_rate is not None and sample_rate != self.sample_rate:
            waveform = torchaudio.functional.resample(waveform, sample_rate, self.sample_rate)
            # as long as each clip resampled alone (torchaudio's ceil(T * new / old), in integers: float32 is off
            # by one for some lengths); the filter rings on past the end, into the padding
            g = math.gcd(sample_rate, self.sample_rate)
            up, down = self.sample_rate // g, sample_rate // g
            lengths = (lengths * up + down - 1) // down
            waveform = waveform.masked_fill(torch.arange(waveform.shape[-1], device=waveform.device) >= lengths[:, None], 0.0)
        spec, valid = self.spectrogram(waveform, lengths)
        p = self.patch_size
        spec = F.pad(spec, (0, -spec.shape[-1] % p))  # frames up to a multiple of p
        x, (fp, tp) = self.patch_embed(spec[:, None])  # [B, fp * tp, D], frequency-major
        cols = (valid + p - 1) // p  # [B] patch columns holding at least one real frame
        freq_pos = self.freq_pos[0, :, :, 0].T  # [fp, D]
        pos = freq_pos[None, :, None, :] + self.time_positions(cols, tp)[:, None, :, :]  # [B, fp, tp, D]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x + pos.reshape(B, fp * tp, -1)], dim=1)
        col_pad = torch.arange(tp, device=x.device) >= cols[:, None]  # [B, tp]
        pad_mask = torch.cat([col_pad.new_zeros(B, 1), col_pad[:, None, :].expand(B, fp, tp).reshape(B, -1)], dim=1)
        return self.pos_drop(x), pad_mask


def list_audio_manifest(path: Path, unlabelled: bool = False) -> Iterator[Entry]:
    """Rows with `path` (relative to the manifest's folder), `label`, and optionally `split` (train / val / test);
    any other columns are ignored. Unlabelled (prepare.sources.audio.unlabelled): `path` alone, a `label` refused."""
    root = path.parent
    for n, row, error in read_rows(path):
        source = f"{path}:{n}"
        if unlabelled and row is not None:
            refuse_label(row, "label", source, "audio")
        try:
            if error:
                raise BadSample(error)
            clip = resolve_inside(root, field(row, "path"))
            yield (Entry(str(clip), None, clip) if unlabelled else
                   Entry(str(clip), field(row, "label"), clip, split=split_column(row)))
        except BadSample as e:
            yield Entry(source, None, error=str(e))


def riff_frames(f: BinaryIO) -> int | None:
    """The frames a RIFF WAV's header claims: its data chunk's size over a frame's (the fmt chunk's block align).
    None where it states none (not RIFF; a size of 0 or 0xFFFFFFFF, as recorders that stream write). libsndfile
    counts the frames the file holds instead, so that a cut file reads short without a word."""
    f.seek(0)
    if f.read(4) != b"RIFF":
        return None
    f.seek(12)  # past "RIFF", the file's size and "WAVE"
    align = None
    while len(head := f.read(8)) == 8:
        chunk, size = head[:4], int.from_bytes(head[4:], "little")
        if chunk == b"data":
            return size // align if align and size not in (0, 0xFFFFFFFF) else None
        body = f.read(min(size, 16)) if chunk == b"fmt " else b""
        if chunk == b"fmt " and len(body) >= 14:
            align = int.from_bytes(body[12:14], "little")
        f.seek(size - len(body) + (size & 1), 1)  # chunks are padded to an even size
    return None


def decoder_message(e: Exception) -> str:
    """libsndfile's own words, without soundfile's "Error opening <_io.BufferedReader name='/abs/path'>: " in front:
    a report names the file already, relative to prepare.root."""
    return e.error_string if isinstance(e, sf.LibsndfileError) else str(e)


def load_audio(source: Path | bytes, sample_rate: int, max_seconds: float, rates: tuple[int, int],
               section: str = "prepare") -> np.ndarray:
    """A WAV / FLAC / OGG / MP3 file, or its bytes -> mono float32 [T] in [-1, 1] at `sample_rate` Hz.

    The header is read first and the sample refused before decoding when it would cost more than `max_seconds` of
    audio or its rate lies outside `rates` (Hz), both set in params section `section` (prepare, serve), which the
    refusal names: a 16 KB file can claim hours, or a rate of 1 Hz. A WAV or FLAC that holds fewer frames than its
    header claims is refused as truncated. Resampling is soxr's, whose memory stays proportional to the clip for any
    rate ratio.
    """
    with open_binary(source) as f:
        try:
            info = sf.info(f)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise BadSample(f"undecodable audio ({decoder_message(e)})") from None
        if not rates[0] <= info.samplerate <= rates[1]:
            raise BadSample(f"sample rate {info.samplerate} Hz outside {section}.audio_rates {list(rates)}")
        claimed = max(info.frames, (riff_frames(f) or 0) if info.format in ("WAV", "WAVEX") else 0)
        if claimed > max_seconds * info.samplerate:
            raise BadSample(f"{claimed / info.samplerate:.1f} s of audio; {section}.max_audio_seconds is {max_seconds:g} s "
                            "(cut the file, or raise the limit)")
        f.seek(0)
        blocks, error = [], None
        try:  # block by block to mono: memory is one mono clip, however many channels the file has
            for b in sf.blocks(f, blocksize=1 << 16, dtype="float32", always_2d=True):
                blocks.append(b.mean(axis=1))
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            error = decoder_message(e)
    wave = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if info.format in ("WAV", "WAVEX", "FLAC") and len(wave) < claimed:  # both headers state their length
        raise BadSample(f"truncated audio: the header claims {claimed:,} frames, the file holds {len(wave):,}"
                        + (f" ({error})" if error else ""))
    if error:
        raise BadSample(f"undecodable audio ({error})")
    if not np.isfinite(wave).all():
        raise BadSample("NaN or Inf samples")
    if info.samplerate != sample_rate and len(wave):
        wave = soxr.resample(wave, info.samplerate, sample_rate, quality="HQ").astype(np.float32)
    if len(wave) == 0:  # after resampling too: a few samples at 192 kHz can come out as none at 16 kHz
        raise BadSample("zero-length audio")
    return np.clip(wave, -1.0, 1.0)


# -- what the rest of Tessera knows about audio (core/modality.py)

def _list_source(src, path: str, params):
    if src.format == "folder":
        return list_class_folders(Path(path))
    return None, list_audio_manifest(source_file(path, "audio"))


def _list_unlabelled(src, path: str, params) -> Iterator[Entry]:
    if src.format == "folder":
        return list_flat_folder(Path(path), "audio")
    return list_audio_manifest(source_file(path, "audio.unlabelled"), unlabelled=True)


def _loader(ctx: PrepareContext):
    c, p = ctx.params.model.audio, ctx.params.prepare
    return lambda e: {"waveform": to_int16(load_audio(e.path, c.sample_rate, p.max_audio_seconds, p.audio_rates))}


def _statistics(params: Params):
    """The training set's log-mel mean and std (AST normalises by them), accumulated one clip at a time."""
    c = params.model.audio
    logmel = LogMel(c.sample_rate, c.n_fft, c.hop_length, c.n_mels)
    moments = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares of log-mel values

    def add(fields: dict | None = None) -> dict | None:
        nonlocal moments
        if fields is not None:
            spec = logmel(pcm_to_float(torch.from_numpy(fields["waveform"]))[None]).double()
            moments += torch.stack([torch.tensor(spec.numel(), dtype=torch.float64), spec.sum(), (spec**2).sum()])
            return None
        if moments[0] == 0:
            return {}
        mean = moments[1] / moments[0]
        return {"norm_mean": mean.item(), "norm_std": (moments[2] / moments[0] - mean**2).clamp(min=1e-12).sqrt().item()}

    return add


def _from_data(cfg: ModelConfig, folder: Path, meta: dict) -> None:
    cfg.audio.norm_mean, cfg.audio.norm_std = meta["stats"]["norm_mean"], meta["stats"]["norm_std"]


def _collate(batch: dict) -> tuple[dict, torch.Tensor]:
    return {"waveform": batch["waveform"], "lengths": batch["waveform_lengths"]}, batch["label"]


def _from_inputs(c: AudioConfig, waveform: torch.Tensor, lengths: torch.Tensor) -> dict:
    # torch.export takes a dynamic size to be at least 2, and a clip of one patch column (0.16 s by default) would
    # fail the program's guards. A column of zeros past every clip keeps it at two or more; `lengths` masks it, so
    # no output changes (tests/test_batch_independence.py holds every format to that).
    return {"waveform": F.pad(waveform, (0, c.patch_size * c.hop_length)), "lengths": lengths}


def _example(c: AudioConfig, batch: int, seconds: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise clips as long as max_frames ((frames - 1) hops), or `seconds` long."""
    n = (c.max_frames - 1) * c.hop_length if seconds is None else int(seconds * c.sample_rate)
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, n, generator=g) * 0.2 - 0.1, torch.full((batch,), n, dtype=torch.long)


MODALITY = Modality(
    name="audio",
    formats=("manifest", "folder"),
    list_source=_list_source,
    list_unlabelled=_list_unlabelled,
    prepare_keys=("model.audio.sample_rate", "model.audio.n_mels", "model.audio.n_fft", "model.audio.hop_length",
                  "prepare.max_audio_seconds", "prepare.audio_rates"),
    loader=_loader,
    collate=_collate,
    ragged=("waveform",),
    statistics=_statistics,
    adapter=lambda cfg: AudioAdapter(cfg.backbone().embed_dim, cfg.audio, cfg.drop_rate),
    from_data=_from_data,
    inputs=lambda cfg: [{"name": "waveform", "dtype": "float32", "shape": ["batch", "samples"],
                         "meaning": f"mono, {cfg.audio.sample_rate} Hz, in [-1, 1], zero-padded to the longest clip"},
                        {"name": "lengths", "dtype": "int64", "shape": ["batch"], "meaning": "samples of each clip before padding"}],
    to_inputs=lambda x: (pcm_to_float(x["waveform"]), x["lengths"]),
    from_inputs=lambda cfg, args: _from_inputs(cfg.audio, *args),
    example=lambda cfg, batch: _example(cfg.audio, batch),
)
