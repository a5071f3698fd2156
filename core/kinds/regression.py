"""Regression: one number per sample (or several, one per target name) to predict.

Targets are standardised with the training split's mean and standard deviation (prepare's `target_stats`, which
training keeps in `model.targets.<task>` and so in model.json and export's config.json, never in params.yaml): the
head's linear layer predicts the standardised value z, and returns z x std + mean, so that every output (metrics,
the exported model, predictions) is in the target's own units. The criterion is the mean squared error of the
standardised values: the headline R² is 1 - MSE / variance on the same scale, so MSE is what it rewards (smooth L1
would trade R² for robustness to outliers the data has not shown). Metrics (torchmetrics): R², MAE, RMSE in target
units; R² is the headline (higher is better, as early stopping and the best checkpoint assume).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.core.config import ModelConfig
from tessera.core.data.files import BadSample
from tessera.core.kinds.kind import TaskKind
from tessera.core.nn.heads import pool


def target(label, names: list[str]) -> np.ndarray:
    """A label -> float32 [T]: one number, or (several targets) a list of as many."""
    values = label if isinstance(label, (list, tuple)) else [label]
    try:
        x = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise BadSample(f"target {label!r} is not a number") from None
    if len(x) != len(names) or not np.isfinite(x).all() or np.abs(x).max() > np.finfo(np.float32).max:
        raise BadSample(f"target {label!r} is not {len(names)} finite number(s) that float32 holds")
    return x.astype(np.float32)


def statistics():
    """The training targets' mean and standard deviation per target (a constant target: std 1)."""
    n, total, squares = 0, 0.0, 0.0

    def add(y: np.ndarray | None) -> dict | None:
        nonlocal n, total, squares
        if y is None:
            mean = total / max(n, 1)
            var = np.maximum(squares / max(n, 1) - mean ** 2, 0.0)
            std = np.sqrt(var)
            return {"mean": np.atleast_1d(mean).tolist(), "std": np.where(std > 0, std, 1.0).tolist()}
        y = np.asarray(y, dtype=np.float64)
        n, total, squares = n + 1, total + y, squares + y ** 2
        return None

    return add


def stats_of(cfg: ModelConfig, task: str, n: int) -> tuple[list[float], list[float]]:
    s = cfg.targets.get(task, {})
    return s.get("mean", [0.0] * n), s.get("std", [1.0] * n)


class RegressionHead(nn.Module):
    """Pooled states -> {"pred_value": [B, T]} in the target's units: a linear layer predicts the standardised
    value, then x std + mean (buffers from the training split, rebuilt from the config)."""

    def __init__(self, embed_dim: int, num_outputs: int, pool: str, drop: float, mean: list[float], std: list[float]):
        super().__init__()
        self.pool = pool
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(embed_dim, num_outputs)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict:
        z = self.fc(self.drop(pool(x, pad_mask, self.pool)))  # [B, T], standardised
        return {"pred_value": z * self.std + self.mean}


class RegressionCriterion(nn.Module):
    """{"pred_value": [B, T]}, targets [B, T] -> {"loss_mse"}: the mean squared error of the standardised values,
    mean over (B, T) of ((pred - mean) / std - (target - mean) / std)²."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.weight_dict = {"loss_mse": 1.0}

    def forward(self, outputs: dict, targets: torch.Tensor) -> dict:
        z = lambda y: (y - self.mean) / self.std  # noqa: E731
        return {"loss_mse": F.mse_loss(z(outputs["pred_value"].float()), z(targets.float().view_as(outputs["pred_value"])))}


class RegressionMetric:
    """R², MAE and RMSE (torchmetrics, in target units, averaged over targets) over batches of {"pred_value":
    [B, T]} and targets [B, T]."""

    def __init__(self, num_outputs: int):
        self.num_outputs, self.preds, self.targets = num_outputs, [], []

    def update(self, outputs: dict, targets: torch.Tensor) -> None:
        self.preds.append(outputs["pred_value"].float().cpu())
        self.targets.append(targets.float().cpu().view_as(self.preds[-1]))

    def compute(self) -> dict:
        from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score  # late: see classification

        p, t = torch.cat(self.preds), torch.cat(self.targets)
        if self.num_outputs == 1:
            p, t = p[:, 0], t[:, 0]
        r2 = R2Score(multioutput="uniform_average")(p, t).item() if len(p) > 1 else math.nan
        return {"r2": r2, "mae": MeanAbsoluteError()(p, t).item(), "rmse": MeanSquaredError(squared=False)(p, t).item()}

    def details(self, names: list[str], pr_points: int) -> dict:
        """For the report: predicted against true values of the first target."""
        p, t = torch.cat(self.preds), torch.cat(self.targets)
        return {"scatter": {"name": names[0], "actual": t[:, 0].tolist(), "predicted": p[:, 0].tolist()}}


def records(sources: list[str], outputs: list[np.ndarray], config: dict, top_k: int) -> list[dict]:
    """values [B, T] (the exported model's, already in target units) -> {"source", "value"}: a number, or with
    several targets {name: number}."""
    names = config["classes"]
    return [{"source": s, "value": round(float(v[0]), 6) if len(names) == 1
             else {n: round(float(x), 6) for n, x in zip(names, v)}} for s, v in zip(sources, outputs[0])]


KIND = TaskKind(
    name="regression",
    target=target,
    statistics=statistics,
    head=lambda cfg, task, n: RegressionHead(cfg.backbone().embed_dim, n, cfg.pool, cfg.drop_rate, *stats_of(cfg, task, n)),
    criterion=lambda cfg, task, n: RegressionCriterion(*stats_of(cfg, task, n)),
    metric=lambda cfg, task, n, keep: RegressionMetric(n),
    metric_names=("r2", "mae", "rmse"),
    headline="r2",
    outputs=("value",),
    export_outputs=lambda out, cfg, args: (out["pred_value"],),
    records=records,
    argmax=False,
)
