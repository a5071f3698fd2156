"""Reading a clip to predict on (`tessera predict`, `tessera serve`, `tessera explain`): a file or its bytes, decoded
as prepare decodes it (`load_audio`), refused past the caller's length limit or when truncated."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tessera.core.config import AudioConfig
from tessera.core.data.files import BadSample
from tessera.core.modality import InputLimits, ModalityIO
from tessera.modalities.audio import SUFFIXES, load_audio


def predict_io(config: dict, folder: Path, limits: InputLimits):
    c = AudioConfig.model_validate(config["model"]["audio"])

    def read(source: Path | bytes, name: str | None = None):
        """One clip -> (name, float32 [T] at the model's rate, error)."""
        name = name or str(source)
        try:
            yield name, load_audio(source, c.sample_rate, limits.max_audio_seconds, limits.audio_rates, limits.section), None
        except BadSample as e:
            yield name, None, str(e)

    def batch(waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Clips -> (waveform [B, longest] zero-padded, lengths [B] samples)."""
        lengths = np.array([len(w) for w in waves], dtype=np.int64)
        out = np.zeros((len(waves), lengths.max()), dtype=np.float32)
        for i, w in enumerate(waves):
            out[i, : len(w)] = w
        return out, lengths

    return read, batch


IO = ModalityIO(
    name="audio",
    suffixes=SUFFIXES,
    predict_io=predict_io,
)
