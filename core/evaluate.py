"""Metrics per task on a split: accuracy and macro-F1 (torchmetrics), COCO mAP (torchmetrics, pycocotools
backend), and cross-modal retrieval recall@k and median rank. Keys are `<task>.<metric>`."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.detection import MeanAveragePrecision

from core.tasks import MultiTaskModel, TaskData, collate_task, to_device
from modalities.detection import cxcywh_to_xyxy, postprocess


def loader(task: TaskData, split: str, batch_size: int, model: MultiTaskModel) -> DataLoader:
    dataset = getattr(task, split)
    modality_of = {task.name: task.modality}
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator(),  # spares the global RNG
                      collate_fn=lambda s: collate_task(task.name, modality_of, model.align, s))


@torch.no_grad()
def predict_classes(model: MultiTaskModel, task: TaskData, split: str, device, batch_size: int = 256):
    """(logits [N, C], labels [N]) of a classification task."""
    net = model.task_model(task.name)
    logits, labels = [], []
    for inputs, targets in loader(task, split, batch_size, model):
        logits.append(net(**to_device(inputs, device))["pred_logits"].float().cpu())
        labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def retrieval_metrics(query: torch.Tensor, gallery: torch.Tensor, q_labels: torch.Tensor, g_labels: torch.Tensor) -> dict:
    """Rank of the first gallery item with the query's label, for unit embeddings [Nq, P] and [Ng, P]."""
    order = (query @ gallery.T).argsort(dim=1, descending=True)  # [Nq, Ng]
    hits = g_labels[order] == q_labels[:, None]
    first = hits.float().argmax(dim=1) + 1  # 1-based rank of the first match
    return {"r1": (first <= 1).float().mean().item(), "r5": (first <= 5).float().mean().item(),
            "median_rank": first.float().median().item()}


@torch.no_grad()
def evaluate(model: MultiTaskModel, tasks: dict[str, TaskData], split: str, device, batch_size: int = 256) -> dict:
    model.eval()
    metrics = {}
    for name, task in tasks.items():
        if getattr(task, split) is None or len(getattr(task, split)) == 0:
            continue
        if name == "align":
            a, b = model.align
            split_a, split_b = getattr(task, split).a, getattr(task, split).b
            emb = {}
            for m, ds in ((a, split_a), (b, split_b)):
                dl = DataLoader(ds, batch_size=batch_size, generator=torch.Generator(),
                                collate_fn=lambda s, m=m: collate_task(m, {m: m}, None, s))
                emb[m] = torch.cat([model.embed(m, to_device(x, device)).float().cpu() for x, _ in dl])
            la, lb = split_a.labels(), split_b.labels()
            for (q, g, lq, lg) in ((a, b, la, lb), (b, a, lb, la)):
                for k, v in retrieval_metrics(emb[q], emb[g], lq, lg).items():
                    metrics[f"align.{q}_to_{g}_{k}"] = v
        elif name == "detection":
            net = model.task_model(name)
            mean_ap = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
            size = model.cfg.detection.img_size
            for inputs, targets in loader(task, split, batch_size, model):
                out = net(**to_device(inputs, device))
                sizes = torch.tensor([[size, size]] * len(targets), device=out["pred_boxes"].device)
                preds = [{k: v.cpu() for k, v in p.items()} for p in postprocess(out, sizes)]
                gts = [{"labels": t["labels"], "boxes": cxcywh_to_xyxy(t["boxes"]) * size} for t in targets]
                mean_ap.update(preds, gts)
            r = mean_ap.compute()
            metrics.update({"detection.map": r["map"].item(), "detection.map_50": r["map_50"].item(),
                            "detection.map_75": r["map_75"].item()})
        else:
            logits, labels = predict_classes(model, task, split, device, batch_size)
            C = len(model.classes[name])
            metrics[f"{name}.accuracy"] = MulticlassAccuracy(C, average="micro")(logits, labels).item()
            metrics[f"{name}.macro_f1"] = MulticlassF1Score(C, average="macro")(logits, labels).item()
    return metrics


# The one number early stopping and "best" checkpoints follow: the mean of each task's headline metric.
HEADLINE = {"image": "image.accuracy", "audio": "audio.accuracy", "text": "text.accuracy",
            "detection": "detection.map_50", "align": "align.{a}_to_{b}_r1"}


def headline(metrics: dict, tasks: list[str], align: tuple[str, str] | None) -> float:
    keys = [HEADLINE[t].format(a=align[0], b=align[1]) if t == "align" else HEADLINE[t] for t in tasks]
    return sum(metrics[k] for k in keys) / len(keys)
