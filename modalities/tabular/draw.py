"""Drawing a table row's relevance for explanations: one bar per column."""

from __future__ import annotations

import numpy as np

from tessera.core.modality import Drawing


def draw_relevance(ax, inputs: dict, grid: np.ndarray, out: dict, net, cfg, assets) -> None:
    """One bar per column: its feature token's relevance."""
    names = list(cfg.tabular.numeric) + list(cfg.tabular.categorical)
    ax.barh(range(len(grid)), grid, color="tab:red")
    ax.set(yticks=range(len(grid)), yticklabels=names[: len(grid)], xlabel="relevance")
    ax.invert_yaxis()


DRAWING = Drawing(name="tabular", draw_relevance=draw_relevance)
