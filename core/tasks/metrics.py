"""Metrics of every task on a split, as training validates and `tessera evaluate` reports: each task's kind's own
(core/kinds/: a classifier's accuracy and macro-F1, a regression's R², MAE and RMSE, detection's COCO mAP),
cross-modal retrieval recall@k and median rank, and missing-modality robustness on paired samples. Keys are
`<task>.<metric>`."""

from __future__ import annotations

import torch

from tessera.core.config import ModelConfig
from tessera.core.data.batching import to_device
from tessera.core.tasks.datasets import TaskData, collate_task, in_order
from tessera.core.tasks.multitask import MultiTaskModel
from tessera.modalities import task_kind


def task_metric(model: MultiTaskModel, task: str, keep: bool = False):
    return task_kind(task, model.cfg).metric(model.cfg, task, len(model.classes[task]), keep)


RETRIEVAL = ("r1", "r5", "median_rank", "unmatched")
"""The keys `retrieval_metrics` returns"""


def retrieval_metrics(query: torch.Tensor, gallery: torch.Tensor, q_labels: torch.Tensor, g_labels: torch.Tensor) -> dict:
    """Rank of the first gallery item with the query's label, for unit embeddings [Nq, P] and [Ng, P].

    A query whose label no gallery item has cannot be retrieved right or wrong: it is left out of r1, r5 and
    the median rank and counted in `unmatched` (with none left, the rates are 0 and the median rank None)."""
    matched = (g_labels[None, :] == q_labels[:, None]).any(dim=1)  # [Nq]; all False for an empty gallery
    if not matched.any():
        return dict(zip(RETRIEVAL, (0.0, 0.0, None, len(q_labels))))
    query, q_labels = query[matched], q_labels[matched]
    order = (query @ gallery.T).argsort(dim=1, descending=True)  # [Nm, Ng]
    hits = g_labels[order] == q_labels[:, None]
    first = (hits.float().argmax(dim=1) + 1).float()  # 1-based rank of the first match; every row has one
    return dict(zip(RETRIEVAL, ((first <= 1).float().mean().item(), (first <= 5).float().mean().item(),
                                first.median().item(), int((~matched).sum()))))


def batches(dataset, task: str, align, batch_size: int, inputs: dict[str, str] | None = None):
    """Every sample of `dataset` once, in order, collated for `task` (a fused task's: its `inputs`)."""
    return in_order(dataset, batch_size, lambda b: collate_task(task, align, b, inputs))


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
        if name == "align":
            a, b = model.align
            emb = {m: torch.cat([model.embed(m, to_device(x, device)).float().cpu()
                                 for x, _ in batches(side, m, None, batch_size)])
                   for m, side in ((a, data.a), (b, data.b))}
            la, lb = data.a.labels(), data.b.labels()
            for (q, g, lq, lg) in ((a, b, la, lb), (b, a, lb, la)):
                for k, v in retrieval_metrics(emb[q], emb[g], lq, lg).items():
                    metrics[retrieval_key(q, g, k)] = v
            continue
        net, metric = model.task_model(name), task_metric(model, name, keep is not None)
        for inputs, targets in batches(data, name, None, batch_size, model.inputs(name)):
            metric.update(net(**to_device(inputs, device)), targets)
        metrics.update({f"{name}.{k}": v for k, v in metric.compute().items()})
        if keep is not None:
            keep[name] = metric
    return metrics


DELETION_AREAS = ("deletion_auc", "deletion_auc_random")
"""The keys the held-out report adds per explained task (core/stages/explanations.py: the deletion curves' areas)"""


def retrieval_key(query: str, gallery: str, metric: str) -> str:
    """The key of a retrieval metric from modality `query` to `gallery`: align.<query>_to_<gallery>_<metric>."""
    return f"align.{query}_to_{gallery}_{metric}"


def robustness_keys(align: tuple[str, str]) -> tuple[str, str, str]:
    """The keys `robustness` returns for the pair `align` (a, b): accuracy with both, with a alone, with b alone."""
    a, b = align
    return f"robustness.{a}+{b}_accuracy", f"robustness.{a}_only_accuracy", f"robustness.{b}_only_accuracy"


def fuses(tasks: list[str], align: tuple[str, str] | None, cfg: ModelConfig = ModelConfig()) -> bool:
    """Whether the held-out report measures missing-modality robustness: late fusion needs a classifier trained on
    each side of the pair."""
    return bool(align) and all(m in tasks and task_kind(m, cfg).name == "classification" for m in align)


def reported_metrics(tasks: list[str], align: tuple[str, str] | None, held_out: bool,
                     cfg: ModelConfig = ModelConfig()) -> set[str]:
    """The keys `evaluate` returns for these tasks (training's validation), and with `held_out` also those the
    held-out report adds (faithfulness of every task's explanations, and missing-modality robustness): what metrics/eval.json can hold, known before anything runs (`tessera sweep`
    checks its objective against it). Built from the names the producers use: each task kind's `metric_names` under
    the model config `cfg`, `RETRIEVAL`, `DELETION_AREAS`, `robustness_keys`."""
    keys = {f"{t}.{k}" for t in tasks for k in task_kind(t, cfg).metric_names}
    if align:
        keys |= {retrieval_key(q, g, k) for q, g in (align, align[::-1]) for k in RETRIEVAL}
    if held_out:
        keys |= {f"{name}.{k}" for name in [*tasks, *(f"align.{m}" for m in align or ())] for k in DELETION_AREAS}
        if fuses(tasks, align, cfg):
            keys |= set(robustness_keys(align))
    return keys


def headline(metrics: dict, tasks: list[str], align: tuple[str, str] | None, cfg: ModelConfig) -> float:
    """The one number early stopping and "best" checkpoints follow, higher is better: the mean of each task's
    headline metric (its kind's; retrieval recall@1 from the first aligned modality to the second for "align")."""
    keys = [retrieval_key(*align, "r1") if t == "align" else f"{t}.{task_kind(t, cfg).headline}" for t in tasks]
    return sum(metrics[k] for k in keys) / len(keys)


@torch.no_grad()
def robustness(model: MultiTaskModel, pairs, device, batch_size: int) -> dict:
    """Missing-modality robustness on paired samples (a, b) whose two modalities both have a classifier: accuracy
    with both (late fusion: summed log-probabilities) and with each alone, on the same samples."""
    a, b = model.align
    if len(pairs) == 0:  # a held-out split whose two modalities share no class
        return {}
    logp = {a: [], b: []}
    for inputs, _ in batches(pairs, "align", model.align, batch_size):
        for m in (a, b):
            logits = model.task_model(m)(**to_device(inputs[m], device))["pred_logits"].float().cpu()
            logp[m].append(logits.log_softmax(1))
    labels = pairs.labels()  # pair i holds two samples of this class
    la, lb = torch.cat(logp[a]), torch.cat(logp[b])
    acc = lambda lp: (lp.argmax(1) == labels).float().mean().item()  # noqa: E731
    return dict(zip(robustness_keys(model.align), (acc(la + lb), acc(la), acc(lb))))
