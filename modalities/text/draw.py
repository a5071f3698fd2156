"""Drawing a text's relevance for explanations: the sentence, each token on a background as strong as its
relevance."""

from __future__ import annotations

import matplotlib.cm as cm
import numpy as np

from tessera.core.modality import Drawing
from tessera.modalities.text import load_tokenizer


def draw_relevance(ax, inputs: dict, grid: np.ndarray, out: dict, net, cfg, assets) -> None:
    """The sentence, each token on a background as strong as its relevance, wrapped to the panel's width (which
    needs a figure with a renderer: core/stages/report.py's `new_figure`)."""
    tok = load_tokenizer(assets / "tokenizer.json")
    ids = inputs["input_ids"][0].cpu()
    if inputs.get("pad_mask") is not None:
        ids = ids[~inputs["pad_mask"][0].cpu()]
    ids = ids.tolist()
    text = tok.decode(ids)
    again = tok.encode(text)  # each token's own characters (byte-level pieces decode to halves of letters alone)
    weights = grid[: len(ids)] / max(float(grid.max()), 1e-12)
    if again.ids == ids:  # the byte-level pieces of one character share its span: one piece, their largest weight
        spans: dict[tuple[int, int], float] = {}
        for span, w in zip(again.offsets, weights):
            spans[span] = max(spans.get(span, 0.0), float(w))
        pieces, weights = [text[a:b] for a, b in spans], list(spans.values())
    else:
        pieces = [tok.id_to_token(i) for i in ids]
    if len(ids) == cfg.text.max_len:  # the model reads no further: say so
        pieces, weights = pieces + ["…"], list(weights) + [0.0]
    renderer = ax.figure.canvas.get_renderer()
    x, y = 0.0, 0.9
    for piece, w in zip(pieces, weights):
        for _ in range(2):  # placed; moved to the next line if it runs past the panel's edge
            label = ax.text(x, y, piece.strip() or "_", fontsize=9, transform=ax.transAxes, va="center",
                            color="white" if w > 0.6 else "black",
                            bbox={"facecolor": cm.Reds(0.1 + 0.9 * float(w)), "edgecolor": "none", "pad": 1.5})
            box = label.get_window_extent(renderer).transformed(ax.transAxes.inverted())
            if box.x1 <= 1 or x == 0:
                break
            label.remove()
            x, y = 0.0, y - 0.15
        x = box.x1 + 0.02
    ax.set_axis_off()


DRAWING = Drawing(name="text", draw_relevance=draw_relevance)
