"""Metrics per task on a split: accuracy, macro-F1, per-class precision / recall and confusion matrices
(torchmetrics), COCO mAP (torchmetrics, pycocotools backend), cross-modal retrieval recall@k and median rank,
and missing-modality robustness on paired samples. Keys are `<task>.<metric>`.

`evaluate` is what training validates with; `tessera evaluate` (`run`) adds the curves and tables of the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import DataLoader
from torchmetrics.classification import (BinaryPrecisionRecallCurve, MulticlassAccuracy, MulticlassConfusionMatrix,
                                         MulticlassF1Score, MulticlassPrecision, MulticlassRecall)
from torchmetrics.detection import MeanAveragePrecision

from core.config import Params
from core.data import atomic_write_text
from core.tasks import MultiTaskModel, TaskData, collate_task, load_task_data, load_trained, to_device
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
    """Rank of the first gallery item with the query's label, for unit embeddings [Nq, P] and [Ng, P].

    A query whose label no gallery item has cannot be retrieved right or wrong: it is left out of r1, r5 and
    the median rank and counted in `unmatched` (with none left, the rates are 0 and the median rank None)."""
    matched = (g_labels[None, :] == q_labels[:, None]).any(dim=1)  # [Nq]; all False for an empty gallery
    if not matched.any():
        return {"r1": 0.0, "r5": 0.0, "median_rank": None, "unmatched": len(q_labels)}
    query, q_labels = query[matched], q_labels[matched]
    order = (query @ gallery.T).argsort(dim=1, descending=True)  # [Nm, Ng]
    hits = g_labels[order] == q_labels[:, None]
    first = (hits.float().argmax(dim=1) + 1).float()  # 1-based rank of the first match; every row has one
    return {"r1": (first <= 1).float().mean().item(), "r5": (first <= 5).float().mean().item(),
            "median_rank": first.median().item(), "unmatched": int((~matched).sum())}


@torch.no_grad()
def evaluate(model: MultiTaskModel, tasks: dict[str, TaskData], split: str, device, batch_size: int = 256,
             keep: dict | None = None) -> dict:
    """Metrics of every task on `split`. `keep`, when given, receives each task's raw outputs for the report:
    (logits [N, C], labels [N]) for classification, the MeanAveragePrecision state for detection."""
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
            mean_ap = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools",
                                           extended_summary=keep is not None)
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
            if keep is not None:
                keep[name] = r
        else:
            logits, labels = predict_classes(model, task, split, device, batch_size)
            C = len(model.classes[name])
            metrics[f"{name}.accuracy"] = MulticlassAccuracy(C, average="micro")(logits, labels).item()
            metrics[f"{name}.macro_f1"] = MulticlassF1Score(C, average="macro")(logits, labels).item()
            if keep is not None:
                keep[name] = (logits, labels)
    return metrics


# The one number early stopping and "best" checkpoints follow: the mean of each task's headline metric.
HEADLINE = {"image": "image.accuracy", "audio": "audio.accuracy", "text": "text.accuracy",
            "detection": "detection.map_50", "align": "align.{a}_to_{b}_r1"}


def headline(metrics: dict, tasks: list[str], align: tuple[str, str] | None) -> float:
    keys = [HEADLINE[t].format(a=align[0], b=align[1]) if t == "align" else HEADLINE[t] for t in tasks]
    return sum(metrics[k] for k in keys) / len(keys)


def classification_details(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], pr_points: int) -> dict:
    """Per-class precision and recall, the confusion matrix [C, C] (rows: true class), and the micro-averaged
    one-vs-rest precision-recall curve over `pr_points` score thresholds."""
    C = len(classes)
    precision = MulticlassPrecision(C, average=None, zero_division=0)(logits, labels)
    recall = MulticlassRecall(C, average=None, zero_division=0)(logits, labels)
    # micro-averaging = one binary curve over every (sample, class) pair
    curve_p, curve_r, _ = BinaryPrecisionRecallCurve(thresholds=pr_points)(
        logits.softmax(1).flatten(), torch.nn.functional.one_hot(labels, C).flatten())
    return {"per_class": [{"class": c, "precision": p.item(), "recall": r.item(), "support": int((labels == i).sum())}
                          for i, (c, p, r) in enumerate(zip(classes, precision, recall))],
            "confusion": MulticlassConfusionMatrix(C)(logits, labels).tolist(),
            "predicted": logits.argmax(1).tolist(), "actual": labels.tolist(),
            "pr": {"recall": curve_r.tolist(), "precision": curve_p.tolist()}}


def detection_pr_curve(summary: dict) -> dict:
    """COCO's interpolated precision at its 101 recall points, at IoU 0.5, all areas, 100 detections, averaged
    over the classes that have ground truth (COCOeval marks the others -1)."""
    p = summary["precision"][0, :, :, 0, -1]  # [R=101, K]
    present = (p > -1).all(dim=0)
    return {"recall": torch.linspace(0, 1, p.shape[0]).tolist(), "precision": p[:, present].mean(dim=1).tolist()}


@torch.no_grad()
def robustness(model: MultiTaskModel, pairs, device, batch_size: int) -> dict:
    """Missing-modality robustness on paired samples (a, b) whose two modalities both have a classifier: accuracy
    with both (late fusion: summed log-probabilities) and with each alone, on the same samples."""
    a, b = model.align
    if len(pairs) == 0:  # a held-out split whose two modalities share no class
        return {}
    logp = {a: [], b: []}
    dl = DataLoader(pairs, batch_size=batch_size, generator=torch.Generator(),
                    collate_fn=lambda s: collate_task("align", {}, model.align, s))
    for inputs, _ in dl:
        for m in (a, b):
            logits = model.task_model(m)(**to_device(inputs[m], device))["pred_logits"].float().cpu()
            logp[m].append(logits.log_softmax(1))
    labels = pairs.labels()  # pair i holds two samples of this class
    la, lb = torch.cat(logp[a]), torch.cat(logp[b])
    acc = lambda lp: (lp.argmax(1) == labels).float().mean().item()  # noqa: E731
    return {f"robustness.{a}+{b}_accuracy": acc(la + lb), f"robustness.{a}_only_accuracy": acc(la),
            f"robustness.{b}_only_accuracy": acc(lb)}


def run(params: Params, console: Console | None = None) -> dict:
    """`tessera evaluate`: the trained model on the held-out split -> metrics JSON, DVC plots, PNGs, eval.md."""
    from core.report import write_report

    console = console or Console()
    cfg = params.evaluate
    model = load_trained(params.train.out)
    tasks = [t for t in model.classes if t != "align"]
    data = load_task_data(Path(params.prepare.out), tasks, model.align, params.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    raw: dict = {}
    metrics = evaluate(model, data, cfg.split, device, cfg.batch_size, keep=raw)
    details = {t: classification_details(*raw[t], model.classes[t], cfg.pr_points) for t in tasks if t != "detection"}
    if "detection" in raw:
        details["detection"] = {"pr": detection_pr_curve(raw["detection"])}
    if model.align and all(m in tasks for m in model.align):
        metrics.update(robustness(model, getattr(data["align"], cfg.split), device, cfg.batch_size))
    write_report(metrics, details, model.classes, Path(cfg.out), cfg.split)
    Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(cfg.metrics), json.dumps(metrics, indent=1))
    console.print(f"evaluated {', '.join(model.classes)} on {cfg.split}: {cfg.metrics}, {cfg.out}/eval.md")
    return metrics
