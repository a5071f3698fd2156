"""Classification: one class per sample. A linear head on the pooled states, cross-entropy, accuracy and macro-F1
(torchmetrics), logits out, each prediction its top k classes with their softmax probabilities."""

from __future__ import annotations

import numpy as np
import torch

from tessera.core.data.files import BadSample
from tessera.core.kinds.kind import TaskKind
from tessera.core.nn.heads import ClassificationCriterion, LinearHead


def target(label, classes: list[str]) -> np.ndarray:
    if label not in classes:
        raise BadSample(f"unknown label {label!r}; the training split's labels are {classes}")
    return np.asarray(classes.index(label), dtype=np.int64)


class ClassificationMetric:
    """Accuracy and macro-F1 over batches of {"pred_logits": [B, C]} and class indices [B]."""

    def __init__(self, num_classes: int):
        self.num_classes, self.logits, self.labels = num_classes, [], []

    def update(self, outputs: dict, targets: torch.Tensor) -> None:
        self.logits.append(outputs["pred_logits"].float().cpu())
        self.labels.append(targets.cpu())

    def compute(self) -> dict:
        # late: torchmetrics imports torchvision and scipy, ~1.5 s of CPU that every process importing a task kind
        # (each stage, the CLI's flows, predict) paid; only the processes that score a model need it
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        logits, labels = torch.cat(self.logits), torch.cat(self.labels)
        C = self.num_classes
        return {"accuracy": MulticlassAccuracy(C, average="micro")(logits, labels).item(),
                "macro_f1": MulticlassF1Score(C, average="macro")(logits, labels).item()}

    def details(self, classes: list[str], pr_points: int) -> dict:
        return classification_details(torch.cat(self.logits), torch.cat(self.labels), classes, pr_points)


def classification_details(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], pr_points: int) -> dict:
    """Per-class precision and recall, the confusion matrix [C, C] (rows: true class), and the micro-averaged
    one-vs-rest precision-recall curve over `pr_points` score thresholds."""
    from torchmetrics.classification import (BinaryPrecisionRecallCurve, MulticlassConfusionMatrix,  # late, as above
                                             MulticlassPrecision, MulticlassRecall)

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


def top_k_records(sources: list[str], logits: np.ndarray, classes: list[str], top_k: int) -> list[dict]:
    """logits [B, C] -> each input's best `top_k` classes with their softmax probabilities. In numpy: torch's
    thread pool, woken for a [32, 10] softmax, spins on the cores a server's event loop needs (benchmarks/RESULTS.md,
    Serving: what moved the figures)."""
    z = np.exp(logits - logits.max(1, keepdims=True))
    probs = z / z.sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return [{"source": s, "label": classes[i[0]], "score": round(float(p[i[0]]), 6),
             "top": [{"label": classes[j], "score": round(float(p[j]), 6)} for j in i]}
            for s, p, i in zip(sources, probs, top)]


KIND = TaskKind(
    name="classification",
    target=target,
    head=lambda cfg, task, n: LinearHead(cfg.backbone().embed_dim, n, cfg.pool, cfg.drop_rate),
    criterion=lambda cfg, task, n: ClassificationCriterion(),
    metric=lambda cfg, task, n, keep: ClassificationMetric(n),
    metric_names=("accuracy", "macro_f1"),
    headline="accuracy",
    outputs=("logits",),
    export_outputs=lambda out, cfg, args: (out["pred_logits"],),
    records=lambda sources, outputs, config, top_k: top_k_records(sources, outputs[0], config["classes"], top_k),
)
