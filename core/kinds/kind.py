"""What a task kind is: what a task of that kind trains, measures, exports and answers, whatever its inputs. Each
kind is one file in core/kinds/ ending in `KIND` (`KINDS` in core/kinds/__init__.py); a modality's own task names
its kind (`Modality.kind`), and code outside asks the kind. Detection's kind lives with its head in
modalities/detection/, where its matcher and criterion are."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from tessera.core.config import ModelConfig

Records = Callable[[list[str], list[np.ndarray], dict, int], list[dict]]
"""predict: (sources, the ONNX session's outputs in `outputs` order, export's config.json, top_k) -> a record each"""


@dataclass(frozen=True, kw_only=True)
class TaskKind:
    name: str  # what params.yaml, config.json ("head") and the model card call it

    # -- tessera prepare: a listed label -> the stored target
    target: Callable[[Any, list[str]], np.ndarray] | None
    """(the entry's label, the task's classes or target names) -> its `label` field, or BadSample with the reason;
    None: the targets live inside the sample (detection's boxes)."""
    statistics: Callable[[], Callable[[np.ndarray | None], dict | None]] | None = None
    """A fresh accumulator over the training split's targets: called with each, then with None for what meta.json
    keeps as `target_stats` and training puts in `model.targets.<task>` (regression: mean and std)."""

    # -- training
    head: Callable[[ModelConfig, str, int], nn.Module]  # (cfg, task, outputs) -> states [B, L, D] -> {"pred_*"}
    criterion: Callable[[ModelConfig, str, int], nn.Module]  # (cfg, task, outputs) -> (outputs, targets) -> {"loss_*"}
    metric: Callable[[ModelConfig, str, int, bool], Any]
    """(cfg, task, outputs, keep) -> update(outputs, targets), compute() -> {name: value}, and with keep=True
    details(classes, pr_points) -> the report's data: "pr" draws a precision-recall curve, "confusion" a confusion
    matrix, "scatter" predicted against true values."""
    metric_names: tuple[str, ...]  # the keys compute() returns
    headline: str  # the metric early stopping and the best checkpoint follow: higher is better

    # -- export, predict
    outputs: tuple[str, ...]  # the exported model's output names
    export_outputs: Callable[[dict, ModelConfig, tuple], tuple]  # (head outputs, cfg, exported inputs) -> outputs
    records: Records | None = None  # None: the modality's own (ModalityIO.records; detection's boxes in pixels)
    argmax: bool = True  # export's parity also checks that the first output's argmax agrees (a class per sample)
