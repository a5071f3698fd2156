"""Metrics of every task on a split, as training validates and `tessera evaluate` reports: each task's kind's own
(core/kinds/: a classifier's accuracy and macro-F1, a regression's R², MAE and RMSE, detection's COCO mAP, a
contrastive task's retrieval recall@k and median rank both ways over the whole held-out gallery), and
missing-modality robustness of the contrastive tasks paired by label. Keys are `<task>.<metric>`."""

from __future__ import annotations

import torch

from tessera.core.config import ModelConfig, by_sample
from tessera.core.data.batching import to_device
from tessera.core.kinds.contrastive import RetrievalMetric, headline_key, metric_keys
from tessera.core.tasks.datasets import TaskData, collate_side, collate_task, in_order
from tessera.core.tasks.multitask import MultiTaskModel
from tessera.modalities import task_kind


def task_metric(model: MultiTaskModel, task: str, keep: bool = False):
    if task in model.pairs:
        return RetrievalMetric(tuple(model.sides(task)))
    return task_kind(task, model.cfg).metric(model.cfg, task, len(model.classes[task]), keep)


def side_names(pair: tuple[str, str]) -> tuple[str, str]:
    """The side names of a contrastive task over inputs `pair`: a modality's name, or a records input's own."""
    return tuple(i.split(".")[-1] for i in pair)


def batches(dataset, task: str, sides, batch_size: int, inputs: dict[str, str] | None = None):
    """Every sample of `dataset` once, in order, collated for `task` (a fused task's: its `inputs`)."""
    return in_order(dataset, batch_size, lambda b: collate_task(task, sides, b, inputs))


@torch.no_grad()
def embed_side(model: MultiTaskModel, task: str, side: str, split, device, batch_size: int) -> torch.Tensor:
    """Every sample of one side's gallery -> unit embeddings [N, P], on the CPU."""
    net, m = model.embedder(task, side), model.sides(task)[side]
    chunks = [net(**to_device(x, device))["pred_embed"].float().cpu()
              for x in in_order(split, batch_size, lambda b: collate_side(m, b))]
    return torch.cat(chunks) if chunks else torch.zeros(0, model.cfg.proj_dim)


@torch.no_grad()
def evaluate(model: MultiTaskModel, tasks: dict[str, TaskData], split: str, device, batch_size: int,
             keep: dict | None = None) -> dict:
    """Metrics of every task on `split`. `keep`, when given, receives each task's metric object for the report."""
    model.eval()
    metrics = {}
    for name, task in tasks.items():
        data = getattr(task, split)
        if data is None or len(data) == 0:
            continue
        metric = task_metric(model, name, keep is not None)
        if name in model.pairs:  # each side's whole gallery, then every query ranked against the other's
            for side, (gallery, labels) in zip(model.sides(name), data.sides()):
                metric.update({side: embed_side(model, name, side, gallery, device, batch_size)}, {side: labels})
        else:
            net = model.task_model(name)
            for inputs, targets in batches(data, name, None, batch_size, model.inputs(name)):
                metric.update(net(**to_device(inputs, device)), targets)
            if keep is not None:
                keep[name] = metric
        metrics.update({f"{name}.{k}": v for k, v in metric.compute().items()})
    return metrics


DELETION_AREAS = ("deletion_auc", "deletion_auc_random")
"""The keys the held-out report adds per explained task (core/stages/explanations.py: the deletion curves' areas)"""


def robustness_keys(pair: tuple[str, str]) -> tuple[str, str, str]:
    """The keys `robustness` returns for the pair (a, b): accuracy with both, with a alone, with b alone."""
    a, b = pair
    return f"robustness.{a}+{b}_accuracy", f"robustness.{a}_only_accuracy", f"robustness.{b}_only_accuracy"


def robust_pairs(tasks: list[str], pairs: dict[str, tuple[str, str]], cfg: ModelConfig = ModelConfig()) -> list[str]:
    """The contrastive tasks whose missing-modality robustness the held-out report measures: paired by label, with
    a classifier trained on each side (late fusion sums their log-probabilities). A pair by sample has none: a
    records source's fused task answers from whichever inputs a record has, which its own accuracy measures."""
    return [t for t, pair in pairs.items()
            if not by_sample(pair[0]) and all(m in tasks and task_kind(m, cfg).name == "classification" for m in pair)]


def explained(tasks: list[str], pairs: dict[str, tuple[str, str]]) -> list[str]:
    """The explanations' names, each with deletion areas: every task (a fused one over its whole sequence), and each
    side of a contrastive task paired by label (`<task>.<side>`)."""
    return [*tasks,
            *(f"{t}.{m}" for t, pair in pairs.items() if not by_sample(pair[0]) for m in pair)]


def reported_metrics(tasks: list[str], pairs: dict[str, tuple[str, str]] | None, held_out: bool,
                     cfg: ModelConfig = ModelConfig()) -> set[str]:
    """The keys `evaluate` returns for these tasks and contrastive `pairs` (task -> its two inputs; training's
    validation), and with `held_out` also those the held-out report adds (faithfulness of every task's explanations
    and missing-modality robustness): what metrics/eval.json can hold, known before anything runs (`tessera sweep`
    checks its objective against it). Built from the names the producers use: each task kind's `metric_names` under
    the model config `cfg`, the contrastive kind's `metric_keys`, `DELETION_AREAS`, `robustness_keys`."""
    pairs = pairs or {}
    keys = {f"{t}.{k}" for t in tasks for k in task_kind(t, cfg).metric_names}
    keys |= {f"{t}.{k}" for t, pair in pairs.items() for k in metric_keys(side_names(pair))}
    if held_out:
        keys |= {f"{name}.{k}" for name in explained(tasks, pairs) for k in DELETION_AREAS}
        keys |= {k for t in robust_pairs(tasks, pairs, cfg) for k in robustness_keys(pairs[t])}
    return keys


def headline(metrics: dict, tasks: list[str], pairs: dict[str, tuple[str, str]] | None, cfg: ModelConfig) -> float:
    """The one number early stopping and "best" checkpoints follow, higher is better: the mean of each task's
    headline metric (its kind's; a contrastive task's: recall@1 from its first side to its second)."""
    keys = [f"{t}.{task_kind(t, cfg).headline}" for t in tasks]
    keys += [f"{t}.{headline_key(side_names(pair))}" for t, pair in (pairs or {}).items()]
    return sum(metrics[k] for k in keys) / len(keys)


@torch.no_grad()
def robustness(model: MultiTaskModel, task: str, pairs, device, batch_size: int) -> dict:
    """Missing-modality robustness on the pairs of by-label contrastive task `task` (a, b), whose two modalities
    both have a classifier: accuracy with both (late fusion: summed log-probabilities) and with each alone, on the
    same samples."""
    a, b = sides = model.sides(task)
    if len(pairs) == 0:  # a held-out split whose two modalities share no class
        return {}
    logp = {a: [], b: []}
    for inputs, _ in batches(pairs, task, sides, batch_size):
        for m in (a, b):
            logits = model.task_model(m)(**to_device(inputs[m], device))["pred_logits"].float().cpu()
            logp[m].append(logits.log_softmax(1))
    labels = pairs.labels()  # pair i holds two samples of this class
    la, lb = torch.cat(logp[a]), torch.cat(logp[b])
    acc = lambda lp: (lp.argmax(1) == labels).float().mean().item()  # noqa: E731
    return dict(zip(robustness_keys((a, b)), (acc(la + lb), acc(la), acc(lb))))
