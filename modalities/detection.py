"""Detection, DETR-style (Carion et al., 2020, arXiv:2005.12872), on the shared encoder.

Images go through the image adapter and the shared encoder; `DetectionHead` runs learnt object queries through
a decoder that cross-attends to the encoder states, and predicts for each query class logits (the last class
is "no object") and a normalised (cx, cy, w, h) box. Training matches predictions to targets one-to-one with
the Hungarian algorithm (scipy's linear_sum_assignment) and applies the set criterion to every decoder layer.

Targets: a list of B dicts {"labels": [n_i] long, "boxes": [n_i, 4] normalised cxcywh}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from core.backbone import BackboneConfig, Decoder, init_weights


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


class DetectionHead(nn.Module):
    """forward(x [B, L, D], pad_mask [B, L]) -> {
        "pred_logits": [B, Q, num_classes + 1], "pred_boxes": [B, Q, 4] cxcywh in [0, 1],
        "aux_outputs": list of the same two keys for each earlier decoder layer }.
    """

    def __init__(self, cfg: BackboneConfig, num_classes: int, num_queries: int = 20, depth: int = 2):
        super().__init__()
        D = cfg.embed_dim
        self.query_embed = nn.Parameter(torch.randn(num_queries, D) * 0.02)
        self.decoder = Decoder(cfg, depth)
        self.class_embed = nn.Linear(D, num_classes + 1)
        self.bbox_embed = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 4))
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict:
        queries = self.query_embed.expand(len(x), -1, -1)  # [B, Q, D]
        hs = self.decoder(queries, x, pad_mask)  # [depth, B, Q, D]
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        aux = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "aux_outputs": aux}


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of predictions to targets, per image.

    cost[q, t] = cost_class * -p_q(class_t) + cost_bbox * |box_q - box_t|_1 + cost_giou * -GIoU(box_q, box_t).
    forward(outputs, targets) -> list of B pairs (pred_idx [k_i], tgt_idx [k_i]) with k_i = min(Q, n_i).
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        B, Q = outputs["pred_logits"].shape[:2]
        prob = outputs["pred_logits"].flatten(0, 1).float().softmax(-1)  # [B*Q, C+1]
        boxes = outputs["pred_boxes"].flatten(0, 1).float()  # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()  # [T, 4], T = sum n_i
        cost = (
            self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
            - self.cost_class * prob[:, tgt_ids]
            - self.cost_giou * generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes))
        )
        cost = cost.view(B, Q, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        indices = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.long), torch.as_tensor(j, dtype=torch.long)) for i, j in indices]


class SetCriterion(nn.Module):
    """DETR's set-prediction loss: {"loss_ce", "loss_bbox", "loss_giou"} and, per earlier decoder layer i,
    the same keys with suffix "_i". Cross-entropy weighs the no-object class by `eos_coef`; box losses are
    averaged over the number of target boxes in the batch.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, eos_coef: float = 0.1,
                 loss_ce: float = 1.0, loss_bbox: float = 5.0, loss_giou: float = 2.0, num_aux: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)
        base = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        self.weight_dict = dict(base)
        for i in range(num_aux):
            self.weight_dict.update({f"{k}_{i}": w for k, w in base.items()})

    def layer_losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict:
        indices = self.matcher(outputs, targets)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        logits = outputs["pred_logits"]  # [B, Q, C+1]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        target_classes[batch_idx, src_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        src_boxes = outputs["pred_boxes"][batch_idx, src_idx]  # [K, 4]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        # Averaging over at least one box keeps a batch with no objects finite; it then trains "no object" only.
        num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
        losses = self.layer_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.layer_losses(aux, targets, num_boxes).items()})
        return losses


@torch.no_grad()
def postprocess(outputs: dict, image_sizes: torch.Tensor) -> list[dict]:
    """Predictions -> per image {"scores": [Q], "labels": [Q], "boxes": [Q, 4] xyxy in pixels}.

    image_sizes: [B, 2] as (height, width). A query's score is its best real-class probability.
    """
    prob = outputs["pred_logits"].float().softmax(-1)[..., :-1]  # drop no-object: [B, Q, C]
    scores, labels = prob.max(-1)
    h, w = image_sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1)[:, None, :].to(prob.dtype)  # [B, 1, 4]
    boxes = cxcywh_to_xyxy(outputs["pred_boxes"].float()) * scale
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
