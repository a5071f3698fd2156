"""Drawing an image's relevance for explanations: the picture with its patches' relevance over it."""

from __future__ import annotations

import numpy as np

from tessera.core.modality import Drawing


def draw_relevance(ax, inputs: dict, grid: np.ndarray, out: dict, net, cfg, assets) -> None:
    """The image (grey or RGB, from [-1, 1]) with its patches' relevance over it."""
    image = (inputs["images"][0].detach().cpu().float().permute(1, 2, 0).numpy() + 1) / 2  # [H, W, C] in [0, 1]
    h, w = image.shape[:2]
    ax.imshow(image[..., 0] if image.shape[2] == 1 else image.clip(0, 1), cmap="gray", vmin=0, vmax=1)
    ax.imshow(grid, cmap="jet", alpha=0.45, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
    ax.set_axis_off()


DRAWING = Drawing(
    name="image",
    token_grid=lambda adapter, n: adapter.grid_size,
    draw_relevance=draw_relevance,
)
