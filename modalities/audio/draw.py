"""Drawing a clip's relevance for explanations: its log-mel spectrogram with the patches' relevance over it."""

from __future__ import annotations

import numpy as np
import torch

from tessera.core.modality import Drawing


def draw_relevance(ax, inputs: dict, grid: np.ndarray, out: dict, net, cfg, assets) -> None:
    """The clip's normalised log-mel spectrogram (frequency up, time across) with its patches' relevance over it."""
    with torch.no_grad():
        spec, valid = net.adapter.spectrogram(inputs["waveform"][:1], inputs["lengths"][:1])
    spec, frames, p = spec[0].cpu().numpy(), int(valid[0]), net.adapter.patch_size
    ax.imshow(spec[:, :frames], origin="lower", aspect="auto", cmap="magma", extent=(0, frames, 0, spec.shape[0]))
    fp, tp = grid.shape
    ax.imshow(grid, origin="lower", aspect="auto", cmap="jet", alpha=0.45, extent=(0, tp * p, 0, fp * p),
              interpolation="bilinear")
    ax.set(xlim=(0, frames), ylim=(0, spec.shape[0]), xlabel="frame", ylabel="mel band")


DRAWING = Drawing(
    name="audio",
    # frequency-major patches: (frequency rows, time columns)
    token_grid=lambda adapter, n: (adapter.freq_pos.shape[2], n // adapter.freq_pos.shape[2]),
    draw_relevance=draw_relevance,
)
