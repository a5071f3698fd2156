"""Detection, DETR-style (Carion et al., 2020, arXiv:2005.12872), on the shared encoder.

Images go through the image adapter and the shared encoder; `DetectionHead` picks object queries from the
encoder's patch proposals and runs them through a decoder that cross-attends to the encoder states, and predicts
for each query class logits (the last class is "no object") and a normalised (cx, cy, w, h) box. Training
matches predictions to targets one-to-one with the Hungarian algorithm (scipy's linear_sum_assignment) and
applies the set criterion to every decoder layer and to the proposals.

Targets: a list of B dicts {"labels": [n_i] long, "boxes": [n_i, 4] normalised cxcywh}.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.core.config import DetectionConfig, ModelConfig
from tessera.core.data.files import BadSample, Entry, resolve_inside
from tessera.core.errors import UserError
from tessera.core.kinds.kind import TaskKind
from tessera.core.modality import Modality, PrepareContext
from tessera.core.nn.backbone import BackboneConfig, Decoder, init_weights
from tessera.modalities import image
from tessera.modalities.image import ImageAdapter, load_image


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1): torchvision's box_convert, op for op (the exported
    `decode` runs it). Written here because importing torchvision costs every process that imports the modalities
    about 0.5 s of CPU; the matcher and the criterion, which need its GIoU, import it when they run."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def sine_embed(coords: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Points [..., 2] as (x, y) in [0, 1] -> [..., dim]: DETR's sine positions, dim/2 channels per axis."""
    freqs = temperature ** (torch.arange(dim // 4, device=coords.device, dtype=torch.float32) / (dim // 4))
    angles = coords[..., :, None].float() * 2 * torch.pi / freqs  # [..., 2, dim/4]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [..., dim]


def grid_centres(num_patches: int, device) -> torch.Tensor:
    """[N, 2]: the (x, y) centres in [0, 1] of a square grid of N patches, row by row."""
    g = int(round(num_patches ** 0.5))
    if g * g != num_patches:
        raise ValueError(f"detection expects a square patch grid, got {num_patches} patches")
    centres = (torch.arange(g, device=device, dtype=torch.float32) + 0.5) / g
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xx, yy], dim=-1).view(-1, 2)


def mlp(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))


class DetectionHead(nn.Module):
    """forward(x [B, 1 + N, D], pad_mask) -> {
        "pred_logits": [B, Q, num_classes + 1], "pred_boxes": [B, Q, 4] cxcywh in [0, 1],
        "aux_outputs": list of the same two keys for each earlier decoder layer,
        "enc_outputs": the same two keys, [B, N, ...], for the N patch proposals }.

    Two-stage, as Deformable DETR's (Zhu et al., 2021, arXiv:2010.04159, sec. 4.2) and DINO's query selection
    (Zhang et al., 2022, arXiv:2203.03605): every patch state proposes a class and a box around its own centre;
    the Q best-scoring proposals become the object queries (their states plus a learnt embedding per query slot), and
    their boxes the reference boxes (in logit space, as in DAB-DETR) that each decoder layer refines in turn and
    whose sine positions join the queries in cross-attention. Proposals get their own set loss. Queries that
    start where the objects are make the decoder's job refinement: on the default canvases, detection alone
    reached val mAP@0.5 0.49 in 600 steps with this head, 0.05 with learnt queries and learnt reference boxes
    (0.54 with the layer-by-layer refinement).
    """

    def __init__(self, cfg: BackboneConfig, num_classes: int, num_queries: int, depth: int, anchor_size: float = 0.3):
        super().__init__()
        D = cfg.embed_dim
        self.anchor_size = anchor_size  # proposals start as boxes of this side (a share of the image) at their patch
        self.query_embed = nn.Parameter(torch.randn(num_queries, D) * 0.02)
        self.enc_class = nn.Linear(D, num_classes + 1)
        self.enc_bbox = mlp(D, 4)
        self.decoder = Decoder(cfg, depth)
        self.class_embed = nn.Linear(D, num_classes + 1)
        self.bbox_embed = mlp(D, 4)
        self.apply(init_weights)
        # start (almost) at the anchors and reference boxes; not exactly zero, so the layers below get gradients
        for box in (self.enc_bbox, self.bbox_embed):
            nn.init.trunc_normal_(box[-1].weight, std=1e-3)
            nn.init.zeros_(box[-1].bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict:
        D = x.shape[-1]
        patches = x[:, 1:]  # [B, N, D], without [CLS]
        centres = grid_centres(patches.shape[1], x.device)  # [N, 2]
        anchors = torch.logit(torch.cat([centres, torch.full_like(centres, self.anchor_size)], -1))  # [N, 4]
        enc_logits = self.enc_class(patches)  # [B, N, C+1]
        enc_boxes = self.enc_bbox(patches) + anchors  # [B, N, 4] logits of cxcywh
        top = enc_logits.softmax(-1)[..., :-1].amax(-1).topk(self.query_embed.shape[0], dim=1).indices  # [B, Q]
        # the decoder refines the chosen boxes; gradients reach the proposals through their own loss only
        ref = enc_boxes.gather(1, top[..., None].expand(-1, -1, 4)).detach()  # [B, Q, 4]
        queries = patches.gather(1, top[..., None].expand(-1, -1, D)) + self.query_embed  # [B, Q, D]
        memory_pos = torch.cat([x.new_zeros(1, D), sine_embed(centres, D)])[None]  # [1, 1 + N, D]; none for [CLS]
        layers = []
        for block in self.decoder.blocks:
            # each layer refines the previous layer's boxes (Deformable DETR's iterative refinement); the refined
            # box's centre places the next layer's query, and its gradient stays with the layer that made it
            queries = block(queries, x, pad_mask, sine_embed(ref.sigmoid()[..., :2], D), memory_pos)
            h = self.decoder.norm(queries)
            boxes = self.bbox_embed(h) + ref  # [B, Q, 4] logits
            layers.append({"pred_logits": self.class_embed(h), "pred_boxes": boxes.sigmoid()})
            ref = boxes.detach()
        return {**layers[-1], "aux_outputs": layers[:-1],
                "enc_outputs": {"pred_logits": enc_logits, "pred_boxes": enc_boxes.sigmoid()}}


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of predictions to targets, per image.

    cost[q, t] = cost_class * -p_q(class_t) + cost_bbox * |box_q - box_t|_1 + cost_giou * -GIoU(box_q, box_t).
    forward(outputs, targets) -> list of B pairs (pred_idx [k_i], tgt_idx [k_i]) with k_i = min(Q, n_i).
    """

    def __init__(self, cost_class: float, cost_bbox: float, cost_giou: float):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from scipy.optimize import linear_sum_assignment  # late: training alone matches; scipy and torchvision
        from torchvision.ops import generalized_box_iou  # cost every other process ~1 s of CPU to import

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
    """DETR's set-prediction loss: {"loss_ce", "loss_bbox", "loss_giou"}, the same keys with suffix "_i" per
    earlier decoder layer i ("aux_outputs"), and with suffix "_enc" for the patch proposals ("enc_outputs",
    where the outputs have them). Cross-entropy weighs the no-object class by `eos_coef`; box losses are
    averaged over the number of target boxes in the batch.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, eos_coef: float, loss_ce: float, loss_bbox: float,
                 loss_giou: float, num_aux: int):
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
        self.weight_dict.update({f"{k}_enc": w for k, w in base.items()})

    def layer_losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict:
        from torchvision.ops import generalized_box_iou  # late, as in HungarianMatcher.forward

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
        # The mean over every rank's boxes, as DETR does, so that N ranks train like one with N times the batch;
        # at least one box keeps a batch with no objects finite (it then trains "no object" only).
        num_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=outputs["pred_logits"].device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_boxes)
            num_boxes = num_boxes / torch.distributed.get_world_size()
        num_boxes = num_boxes.clamp(min=1).item()
        losses = self.layer_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.layer_losses(aux, targets, num_boxes).items()})
        if "enc_outputs" in outputs:
            losses.update({f"{k}_enc": v for k, v in self.layer_losses(outputs["enc_outputs"], targets, num_boxes).items()})
        return losses


def decode(outputs: dict, image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions -> (scores [B, Q], labels [B, Q], boxes [B, Q, 4] xyxy in pixels), batched (exportable).

    image_sizes: [B, 2] as (height, width). A query's score is its best real-class probability.
    """
    prob = outputs["pred_logits"].float().softmax(-1)[..., :-1]  # drop no-object: [B, Q, C]
    scores, labels = prob.max(-1)
    h, w = image_sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1)[:, None, :].to(prob.dtype)  # [B, 1, 4]
    return scores, labels, cxcywh_to_xyxy(outputs["pred_boxes"].float()) * scale


@torch.no_grad()
def postprocess(outputs: dict, image_sizes: torch.Tensor) -> list[dict]:
    """`decode` as one {"scores": [Q], "labels": [Q], "boxes": [Q, 4]} per image, as COCO evaluators take them."""
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(*decode(outputs, image_sizes))]


def list_coco(path: Path, image_root: Path | None = None) -> tuple[list[str], Iterator[Entry]]:
    """COCO detection JSON -> (category names in id order, one entry per image).

    An entry's payload is {"width", "height", "boxes": [[x, y, w, h] pixels], "labels": [category name]}.
    Images are found under `image_root` (default: the JSON's folder). An image with any bad annotation
    (box outside the image or of non-positive size, unknown category, duplicate id) is quarantined whole:
    training on it with a box missing would teach that the object is background.
    """
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
        images, annotations, categories = coco["images"], coco.get("annotations", []), coco["categories"]
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a COCO detection file ({type(e).__name__}: {e}); it needs 'images', "
                        "'annotations' and 'categories' lists") from None
    names = {c["id"]: str(c["name"]) for c in sorted(categories, key=lambda c: c["id"])}
    root = image_root or path.parent
    by_image: dict = {}
    problems: dict = {}
    seen_ann: set = set()
    for a in annotations:
        img, where = a.get("image_id"), f"annotation {a.get('id')}"
        if a.get("id") in seen_ann:
            problems.setdefault(img, []).append(f"duplicate annotation id {a.get('id')}")
        seen_ann.add(a.get("id"))
        if a.get("category_id") not in names:
            problems.setdefault(img, []).append(f"{where}: unknown category id {a.get('category_id')}")
        by_image.setdefault(img, []).append(a)

    def entries() -> Iterator[Entry]:
        seen_img: set = set()
        for im in images:
            source = f"{path}:image {im.get('id')}"
            if im.get("id") in seen_img:
                yield Entry(source, None, error=f"duplicate image id {im.get('id')}")
                continue
            seen_img.add(im.get("id"))
            try:
                w, h = int(im["width"]), int(im["height"])
                file = resolve_inside(root, im["file_name"])
                boxes, labels = [], []
                for a in by_image.get(im["id"], []):
                    x, y, bw, bh = (float(v) for v in a["bbox"])
                    if bw <= 0 or bh <= 0:
                        raise BadSample(f"annotation {a.get('id')}: box of non-positive size {bw} x {bh}")
                    if x < 0 or y < 0 or x + bw > w + 0.5 or y + bh > h + 0.5:  # half a pixel of rounding
                        raise BadSample(f"annotation {a.get('id')}: box {[x, y, bw, bh]} lies outside the {w} x {h} image")
                    boxes.append([x, y, bw, bh])
                    labels.append(names.get(a["category_id"]))
                if problems.get(im["id"]):
                    raise BadSample("; ".join(problems[im["id"]]))
            except BadSample as e:
                yield Entry(source, None, error=str(e))
                continue
            except (KeyError, TypeError, ValueError) as e:
                yield Entry(source, None, error=f"malformed record ({type(e).__name__}: {e})")
                continue
            yield Entry(str(file), "", file, {"width": w, "height": h, "boxes": boxes, "labels": labels})
        known = {im.get("id") for im in images}
        for img in by_image.keys() - known:
            yield Entry(f"{path}:image {img}", None, error=f"annotations refer to unknown image id {img}")

    return list(names.values()), entries()


def load_canvas(entry: Entry, img_size: int, in_chans: int, classes: list[str], max_pixels: int) -> dict[str, np.ndarray]:
    """A COCO entry -> {"image": uint8 [C, S, S], "boxes": float32 [n, 4] normalised cxcywh, "labels": int64 [n]}."""
    w, h = entry.payload["width"], entry.payload["height"]
    pixels = load_image(entry.path, img_size, in_chans, max_pixels, expect_size=(w, h))
    xywh = np.asarray(entry.payload["boxes"], dtype=np.float32).reshape(-1, 4)
    cxcywh = np.stack([(xywh[:, 0] + xywh[:, 2] / 2) / w, (xywh[:, 1] + xywh[:, 3] / 2) / h,
                       xywh[:, 2] / w, xywh[:, 3] / h], axis=1)
    labels = np.asarray([classes.index(n) for n in entry.payload["labels"]], dtype=np.int64)
    return {"image": pixels, "boxes": np.clip(cxcywh, 0, 1), "labels": labels}


# -- what the rest of Tessera knows about detection (core/modality.py)

def criterion(cfg: DetectionConfig, num_classes: int) -> SetCriterion:
    matcher = HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou)
    return SetCriterion(num_classes, matcher, cfg.eos_coef, cfg.loss_ce, cfg.loss_bbox, cfg.loss_giou, cfg.decoder_depth - 1)


METRICS = ("map", "map_50", "map_75")


class DetectionMetric:
    """COCO mAP (torchmetrics, pycocotools backend) over batches of outputs and targets at the model's input size."""

    def __init__(self, cfg: DetectionConfig, keep: bool):
        from torchmetrics.detection import MeanAveragePrecision

        self.size = cfg.img_size
        self.mean_ap = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools", extended_summary=keep)

    def update(self, outputs: dict, targets: list[dict]) -> None:
        sizes = torch.tensor([[self.size, self.size]] * len(targets), device=outputs["pred_boxes"].device)
        preds = [{k: v.cpu() for k, v in p.items()} for p in postprocess(outputs, sizes)]
        self.mean_ap.update(preds, [{"labels": t["labels"], "boxes": cxcywh_to_xyxy(t["boxes"]) * self.size} for t in targets])

    def compute(self) -> dict:
        self.summary = self.mean_ap.compute()
        return {k: self.summary[k].item() for k in METRICS}

    def details(self, classes: list[str], pr_points: int) -> dict:
        """For the report, after `compute` (built with keep=True): the precision-recall curve at IoU 0.5."""
        return {"pr": pr_curve(self.summary)}


def pr_curve(summary: dict) -> dict:
    """COCO's interpolated precision at its 101 recall points, at IoU 0.5, all areas, 100 detections, averaged
    over the classes that have ground truth (COCOeval marks the others -1)."""
    p = summary["precision"][0, :, :, 0, -1]  # [R=101, K]
    present = (p > -1).all(dim=0)
    return {"recall": torch.linspace(0, 1, p.shape[0]).tolist(), "precision": p[:, present].mean(dim=1).tolist()}


def _loader(ctx: PrepareContext):
    c = ctx.params.model.detection
    return lambda e: load_canvas(e, c.img_size, c.in_chans, ctx.classes, ctx.params.prepare.max_image_pixels)


def _collate(batch: dict) -> tuple[dict, list[dict]]:
    targets = [{"labels": labels[:n], "boxes": boxes[:n]}
               for labels, boxes, n in zip(batch["labels"], batch["boxes"], batch["labels_lengths"].tolist())]
    return {"images": batch["image"]}, targets


def _export_outputs(out: dict, cfg: ModelConfig, args: tuple) -> tuple:
    sizes = torch.full((args[0].shape[0], 2), cfg.detection.img_size, device=args[0].device)
    return (out["pred_logits"], *decode(out, sizes))


KIND = TaskKind(
    name="detection",
    target=None,  # labels and boxes live inside each sample
    head=lambda cfg, task, n: DetectionHead(cfg.backbone(), n, cfg.detection.num_queries, cfg.detection.decoder_depth),
    criterion=lambda cfg, task, n: criterion(cfg.detection, n),
    metric=lambda cfg, task, n, keep: DetectionMetric(cfg.detection, keep),
    metric_names=METRICS,
    headline="map_50",
    outputs=("logits", "scores", "labels", "boxes"),
    export_outputs=_export_outputs,
)
"""Detection as a task kind: its head, criterion and mAP are here, beside the matcher; its records, in each image's
own pixels, are its reader's (infer.py)."""

MODALITY = Modality(
    name="detection",
    kind=lambda cfg: KIND,
    formats=("coco",),
    list_source=lambda src, path, params: list_coco(Path(path), Path(src.images) if src.images else None),
    prepare_keys=("model.detection.img_size", "model.detection.in_chans", "prepare.max_image_pixels"),
    loader=_loader,
    collate=_collate,
    ragged=("boxes", "labels"),
    adapter=lambda cfg: ImageAdapter(cfg.backbone().embed_dim, cfg.detection, cfg.drop_rate),
    inputs=lambda cfg: image.contract(cfg.detection),
    to_inputs=lambda x: (x["images"],),
    from_inputs=lambda cfg, args: image.from_inputs(*args),
    example=lambda cfg, batch: image.example(cfg.detection, batch),
)
