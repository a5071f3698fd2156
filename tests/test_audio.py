"""The audio adapter: librosa-equal log-mel, exact padding, resampling, SpecAugment in training only."""

import librosa
import numpy as np
import pytest
import torch

from tessera.core.config import AudioConfig, ModelConfig
from tessera.modalities import build_task_model
from tessera.modalities.audio import AudioAdapter, LogMel

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
    adapter = AudioAdapter(16, AudioConfig(n_mels=32, patch_size=8, hop_length=160), 0.0).eval()
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
    model = build_task_model("audio", small_audio_cfg(), 10).eval()
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
    adapter = AudioAdapter(16, AudioConfig(sample_rate=SR, n_mels=32, patch_size=8), 0.0).eval()
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
    adapter = AudioAdapter(16, AudioConfig(n_mels=32, patch_size=8, freq_mask=8, time_mask=20), 0.0)
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
    a = AudioAdapter(16, AudioConfig(n_mels=32, patch_size=8), 0.0).eval()
    b = AudioAdapter(16, AudioConfig(n_mels=32, patch_size=8, norm_mean=-5.0, norm_std=3.0), 0.0).eval()
    wave, lengths = chirp()[None], torch.tensor([SR])
    raw, _ = a.spectrogram(wave, lengths)
    normed, _ = b.spectrogram(wave, lengths)
    log_mel = 2 * raw  # a: mean 0, std 1, so raw = log_mel / 2
    assert torch.allclose(normed, (log_mel + 5.0) / 6.0, atol=1e-5)


@pytest.mark.parametrize("n_fft", [400, 401, 511, 512])
def test_valid_frames_are_counted_as_the_stft_counts_them_for_odd_and_even_n_fft(n_fft):
    logmel = LogMel(SR, n_fft, 160, 32)
    for T in (159, 160, 161, 4000, 7999, 8000, 8001):
        frames = logmel(torch.zeros(1, T)).shape[-1]
        ref = librosa.feature.melspectrogram(y=np.zeros(T), sr=SR, n_fft=n_fft, hop_length=160, n_mels=32,
                                             center=True, pad_mode="constant").shape[-1]
        assert logmel.frames(torch.tensor(T)).item() == frames == ref, (T, frames, ref)


def tokens_alone_and_in_batch(adapter, clips, sample_rate=None):
    """(tokens, pad_mask) of each clip alone, and of all of them zero-padded into one batch."""
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    with torch.no_grad():
        alone = [adapter(c[None], sample_rate=sample_rate) for c in clips]
        together = adapter(batch, lengths, sample_rate)
    return alone, together


@pytest.mark.parametrize("n_fft", [400, 401])
@pytest.mark.parametrize("sample_rate", [SR, 22050, 8000])
def test_each_clip_has_the_tokens_it_has_alone_whatever_else_is_in_its_batch(n_fft, sample_rate):
    """Clips shorter and longer than max_frames (32 frames = 0.32 s at 16 kHz), at rates that need resampling: a
    clip's unpadded tokens, their number and their positions come from that clip alone."""
    adapter = AudioAdapter(16, AudioConfig(sample_rate=SR, n_mels=32, patch_size=8, n_fft=n_fft, max_frames=32), 0.0).eval()
    g = torch.Generator().manual_seed(n_fft + sample_rate)
    seconds = [0.05, 0.2, 0.31, 0.33, 0.9, 2.5]
    clips = [chirp(s, sample_rate, f0=100 + 300 * i) * (0.5 + torch.rand(1, generator=g)) for i, s in enumerate(seconds)]
    alone, (tokens, pad_mask) = tokens_alone_and_in_batch(adapter, clips, sample_rate)
    for i, (t1, m1) in enumerate(alone):
        assert not m1.any()
        keep = ~pad_mask[i]
        assert int(keep.sum()) == t1.shape[1], (i, int(keep.sum()), t1.shape[1])  # no column too many or too few
        assert (tokens[i][keep] - t1[0]).abs().max() < 1e-5, i


def test_resampled_clips_are_zero_past_their_own_end():
    adapter = AudioAdapter(16, AudioConfig(sample_rate=SR, n_mels=32, patch_size=8), 0.0).eval()
    calls = []
    adapter.spectrogram = lambda wave, lengths: calls.append((wave, lengths)) or AudioAdapter.spectrogram(adapter, wave, lengths)
    clips = [chirp(s, 22050) for s in (0.1, 0.5, 0.3)]
    tokens_alone_and_in_batch(adapter, clips, 22050)
    wave, lengths = calls[-1]  # the batch, after resampling
    assert lengths.tolist() == [-(-len(c) * SR // 22050) for c in clips]
    assert wave.shape[1] == max(lengths)
    for w, n in zip(wave, lengths):
        assert w[n:].abs().sum() == 0 and w[n - 50: n].abs().max() > 0


def test_padding_mask_marks_exactly_the_columns_past_the_clip_end():
    """Patch columns of 8 frames, hop 160: a clip of 8 * 160 - 1 samples has 8 frames (1 column), one more sample
    9 frames (2 columns); written out by hand, so an off-by-one in either direction fails."""
    adapter = AudioAdapter(16, AudioConfig(n_mels=32, patch_size=8, hop_length=160, n_fft=400), 0.0).eval()
    lengths = torch.tensor([1279, 1280, 2559, 2560, 4000])  # frames 8, 9, 16, 17, 26
    expect_cols = [1, 2, 2, 3, 4]
    _, pad_mask = adapter(torch.randn(5, 4000) * 0.1, lengths)
    cols = pad_mask.shape[1] // 4  # 4 frequency rows; [CLS] adds one
    for i, n in enumerate(expect_cols):
        assert (~pad_mask[i, 1:].view(4, cols)).sum(1).tolist() == [n] * 4, i


def test_long_clips_take_their_time_positions_stretched_by_their_own_length():
    adapter = AudioAdapter(16, AudioConfig(n_mels=32, patch_size=8, max_frames=64), 0.0)  # a table of 8 columns
    table = adapter.time_pos[0, :, 0].T
    pos = adapter.time_positions(torch.tensor([3, 8, 16]), 16)
    assert torch.equal(pos[0, :3], table[:3]) and torch.equal(pos[1, :8], table)
    stretched = torch.nn.functional.interpolate(adapter.time_pos, size=(1, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(pos[2], stretched[0, :, 0].T, atol=1e-6)



def test_resampled_lengths_are_exact_where_float32_rounds_wrong():
    """134,223 samples at 48 kHz are 44,741 at 16 kHz; float32 arithmetic said 44,742 and kept one sample of the
    filter's ringing in the batch."""
    adapter = AudioAdapter(16, AudioConfig(sample_rate=SR, n_mels=32, patch_size=8), 0.0).eval()
    clips = [chirp(3.0, 48000)[:134223], chirp(0.3, 48000), chirp(3.5, 48000)]  # not the longest: padding follows
    alone, (tokens, pad_mask) = tokens_alone_and_in_batch(adapter, clips, 48000)
    for i, (t1, _) in enumerate(alone):
        assert (tokens[i][~pad_mask[i]] - t1[0]).abs().max() < 1e-5, i


def test_a_clip_too_short_to_survive_resampling_is_a_bad_sample(tmp_path):
    import soundfile as sf

    from tessera.core.data.files import BadSample
    from tessera.modalities.audio import load_audio

    sf.write(tmp_path / "blip.wav", np.full(5, 0.1), 192000)
    with pytest.raises(BadSample, match="zero-length audio"):
        load_audio(tmp_path / "blip.wav", SR, 60.0, (4000, 192000))