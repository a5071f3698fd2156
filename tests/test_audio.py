"""The audio adapter: librosa-equal log-mel, exact padding, resampling, SpecAugment in training only."""

import librosa
import numpy as np
import pytest
import torch

from core.config import AudioConfig, ModelConfig
from modalities import build_task_model
from modalities.audio import AudioAdapter, LogMel

SR = 16000


def chirp(seconds=1.0, sr=SR, f0=200.0, f1=3000.0):
    t = torch.arange(int(seconds * sr)) / sr
    return 0.5 * torch.sin(2 * torch.pi * (f0 + (f1 - f0) * t / (2 * seconds)) * t) + 0.01 * torch.randn(len(t))


@pytest.mark.parametrize("n_fft,hop,n_mels", [(400, 160, 64), (512, 128, 128)])
def test_logmel_agrees_with_librosa(n_fft, hop, n_mels):
    y = chirp()
    ours = LogMel(SR, n_fft, hop, n_mels)(y[None])[0].double()
    ref = librosa.feature.melspectrogram(y=y.numpy().astype(np.float64), sr=SR, n_fft=n_fft, hop_length=hop,
                                         n_mels=n_mels, power=2.0, center=True, pad_mode="constant")
    ref_power = torch.from_numpy(ref)
    assert ours.shape == ref_power.shape == (n_mels, len(y) // hop + 1)
    rel_power = (ours.exp() - 1e-6 - ref_power).norm() / ref_power.norm()
    ref_log = torch.log(ref_power + 1e-6)
    rel_log = (ours - ref_log).norm() / ref_log.norm()
    assert rel_power < 1e-3 and rel_log < 1e-3


def small_audio_cfg(**kw):
    return ModelConfig(size="debug", audio=AudioConfig(n_mels=32, patch_size=8, **kw))


def test_tokens_and_padding_mask_follow_clip_lengths():
    adapter = AudioAdapter(16, n_mels=32, patch_size=8, hop_length=160).eval()
    lengths = torch.tensor([16000, 4000])  # 101 and 26 frames
    tokens, pad_mask = adapter(torch.randn(2, 16000) * 0.1, lengths)
    cols = -(-101 // 8)  # 13 patch columns, 4 frequency rows
    assert tokens.shape == (2, 1 + 4 * cols, 16)
    assert not pad_mask[0].any()
    valid_cols = -(-26 // 8)  # 4 columns hold at least one real frame
    expect = torch.arange(cols) >= valid_cols
    assert torch.equal(pad_mask[1, 1:].view(4, cols), expect.expand(4, cols))
    assert not pad_mask[1, 0]  # [CLS] is never padding


def test_a_clip_gives_the_same_prediction_alone_and_padded_in_a_batch():
    model = build_task_model("audio", "classification", small_audio_cfg(), 10).eval()
    short = chirp(0.4)
    batch = torch.zeros(2, SR)
    batch[0, : len(short)] = short
    batch[1] = chirp(1.0, f0=500)
    with torch.no_grad():
        alone = model(waveform=short[None])["pred_logits"]
        padded = model(waveform=batch, lengths=torch.tensor([len(short), SR]))["pred_logits"][:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_any_sample_rate_is_resampled_to_the_configured_one():
    """A 1 kHz tone recorded at 22.05 kHz gives the tokens of the same tone recorded at 16 kHz."""
    adapter = AudioAdapter(16, sample_rate=SR, n_mels=32, patch_size=8).eval()
    tone = lambda sr: torch.sin(2 * torch.pi * 1000 * torch.arange(sr) / sr)[None]  # noqa: E731
    tokens_16k, _ = adapter(tone(SR))
    tokens_22k, _ = adapter(tone(22050), sample_rate=22050)
    tokens_8k, _ = adapter(tone(8000), sample_rate=8000)
    assert tokens_22k.shape == tokens_8k.shape == tokens_16k.shape  # one second each
    for other in (tokens_22k, tokens_8k):
        assert (other - tokens_16k).abs().mean() < 0.05 * tokens_16k.abs().mean()
    # without resampling the 22.05 kHz tone would be read as 1000 * 16000 / 22050 Hz: far off
    misread, _ = adapter(tone(22050)[:, :SR])  # same token layout, tone read as 726 Hz
    assert (misread - tokens_16k).abs().mean() > 0.2 * tokens_16k.abs().mean()


def test_specaugment_masks_in_training_only():
    adapter = AudioAdapter(16, n_mels=32, patch_size=8, freq_mask=8, time_mask=20)
    wave, lengths = chirp()[None].repeat(4, 1), torch.full((4,), SR)
    adapter.eval()
    clean, _ = adapter.spectrogram(wave, lengths)
    assert torch.equal(clean, adapter.spectrogram(wave, lengths)[0])
    adapter.train()
    augmented, _ = adapter.spectrogram(wave, lengths)
    changed = augmented != clean
    assert changed.any()
    # masks are whole frequency rows or whole time columns, different per sample (iid)
    assert (augmented[changed] == 0).all()
    assert not torch.equal(changed[0], changed[1])


def test_dataset_normalisation_is_applied():
    a = AudioAdapter(16, n_mels=32, patch_size=8).eval()
    b = AudioAdapter(16, n_mels=32, patch_size=8, norm_mean=-5.0, norm_std=3.0).eval()
    wave, lengths = chirp()[None], torch.tensor([SR])
    raw, _ = a.spectrogram(wave, lengths)
    normed, _ = b.spectrogram(wave, lengths)
    log_mel = 2 * raw  # a: mean 0, std 1, so raw = log_mel / 2
    assert torch.allclose(normed, (log_mel + 5.0) / 6.0, atol=1e-5)
