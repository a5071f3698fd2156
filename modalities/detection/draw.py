"""Explaining detection: each box by its query's cross-attention over the encoder's tokens, drawn over the canvas
with the boxes."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.patches import Rectangle
from torchvision.ops import box_convert

from tessera.core.modality import Drawing
from tessera.core.nn.backbone import AttentionRecorder, positive_score_gradient
from tessera.modalities.image import draw as image_draw


def relevance(net, inputs: dict, method: str = "grad"):
    """Each box by its query's cross-attention over the encoder tokens in the last decoder layer, averaged over
    heads ("rollout"), or weighted by the gradient of the box's class logit with respect to the attention scores,
    negatives dropped ("grad", as core/tasks/explain.py does for the encoder). -> (the best box's relevance
    [B, 1 + N], [CLS] 0; outputs with "query_relevance" [B, Q, 1 + N], every box's; None)."""
    layers = {block.cross_attn for block in net.head.decoder.blocks}
    with torch.enable_grad(), AttentionRecorder() as rec:
        tokens, pad_mask = net.adapter(**inputs)
        out = net.head(net.backbone(tokens, pad_mask), pad_mask)
        A = [w for module, w in rec.maps if module in layers][-1]  # [B, H, Q, 1 + N]
        probs = out["pred_logits"].softmax(-1)[..., :-1]  # [B, Q, C]
        if method == "grad":
            logits = out["pred_logits"].gather(2, probs.argmax(-1, keepdim=True))[..., 0]  # [B, Q]: each box's class
            maps = []
            for q in range(A.shape[2]):
                G = torch.autograd.grad(logits[:, q].sum(), A, retain_graph=True)[0]
                maps.append(positive_score_gradient(A[:, :, q: q + 1], G[:, :, q: q + 1])[:, 0])  # [B, 1 + N]
            per_query = torch.stack(maps, 1)
        else:
            per_query = A.detach().mean(1)
    per_query = per_query.detach().clone()
    per_query[..., 0] = 0
    best = probs.detach().amax(-1).argmax(-1)  # [B]
    outputs = {k: v.detach() for k, v in out.items() if torch.is_tensor(v)}
    return per_query[torch.arange(len(best)), best], {**outputs, "query_relevance": per_query}, pad_mask


def draw_relevance(ax, inputs: dict, grid: np.ndarray, out: dict, net, cfg, assets, threshold: float = 0.5) -> None:
    """The canvas with every box scoring at least `threshold` (the best one at least), each with its own query's
    map (`relevance`; each scaled to its peak, their maximum shown)."""
    probs = out["pred_logits"][0].softmax(-1)[:, :-1]  # [Q, C]
    best = probs.amax(-1)
    kept = [q for q in best.argsort(descending=True).tolist() if best[q] >= threshold] or [int(best.argmax())]
    maps = out["query_relevance"][0, kept, 1:]  # [K, N]
    maps = maps / maps.amax(-1, keepdim=True).clamp(min=1e-12)
    image_draw.draw_relevance(ax, inputs, maps.amax(0).reshape(grid.shape).cpu().numpy(), out, net, cfg, assets)
    side = inputs["images"].shape[-1]
    for q in kept:  # each box with its score (the title names the best one's class), clipped to the image
        x0, y0, x1, y1 = (box_convert(out["pred_boxes"][0, q], "cxcywh", "xyxy") * side).clamp(0, side).tolist()
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
        ax.text(x0, y0 + 1.5, f"{float(best[q]):.2f}", color="lime", fontsize=7, va="top")


DRAWING = Drawing(
    name="detection",
    token_grid=lambda adapter, n: adapter.grid_size,
    draw_relevance=draw_relevance,
    relevance=relevance,
)
