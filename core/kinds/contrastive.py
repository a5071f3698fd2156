"""Contrastive alignment: two inputs embedded into one space where a sample's two sides lie close (CLIP, Radford et
al. 2021, arXiv:2103.00020; ImageBind, Girdhar et al. 2023, arXiv:2305.05665, aligns several pairs in one model).

A contrastive task names two inputs, its sides, each embedded by its own adapter, the shared backbone and a
ContrastiveHead ({"pred_embed": [B, P]}, unit norm). Its positive pairs come one of two ways
(core/tasks/datasets.py):

- by sample: two inputs of one records source (`shop.photo`, `shop.caption`): a record's photo with its own
  caption. Records lacking either input are left out of the task.
- by label: two modalities' own datasets with the same classes (PairedByLabel): a spoken "seven" with a written 7.

The criterion is symmetric InfoNCE over the batch, every rank's pairs all-gathered as negatives. Retrieval
(`retrieval_metrics`) ranks the whole held-out gallery of the other side for each query, both ways: by sample, a
hit is the query's own partner only; by label, any gallery item of the query's class. Recall@1, recall@5 and the
median rank (1 is best); the headline is recall@1 from the first side to the second.
"""

from __future__ import annotations

import torch

from tessera.core.kinds.kind import TaskKind
from tessera.core.nn.heads import ContrastiveCriterion, ContrastiveHead

RETRIEVAL = ("r1", "r5", "median_rank", "unmatched")
"""The keys `retrieval_metrics` returns"""


def retrieval_key(query: str, gallery: str, metric: str) -> str:
    """A retrieval metric's name from side `query` to side `gallery` (under its task: align.audio_to_image_r1)."""
    return f"{query}_to_{gallery}_{metric}"


def retrieval_metrics(query: torch.Tensor, gallery: torch.Tensor, q_labels: torch.Tensor, g_labels: torch.Tensor) -> dict:
    """Rank of the first gallery item that matches each query (the same label), for unit embeddings [Nq, P] and
    [Ng, P]. Pairs by sample match by their record: labels are the record numbers, so only the own partner counts.

    A query whose label no gallery item has cannot be retrieved right or wrong: it is left out of r1, r5 and
    the median rank and counted in `unmatched` (with none left, the rates are 0 and the median rank None)."""
    matched = (g_labels[None, :] == q_labels[:, None]).any(dim=1)  # [Nq]; all False for an empty gallery
    if not matched.any():
        return dict(zip(RETRIEVAL, (0.0, 0.0, None, len(q_labels))))
    query, q_labels = query[matched], q_labels[matched]
    order = (query @ gallery.T).argsort(dim=1, descending=True, stable=True)  # [Nm, Ng]
    hits = g_labels[order] == q_labels[:, None]
    first = (hits.float().argmax(dim=1) + 1).float()  # 1-based rank of the first match; every row has one
    return dict(zip(RETRIEVAL, ((first <= 1).float().mean().item(), (first <= 5).float().mean().item(),
                                first.median().item(), int((~matched).sum()))))


class PairCriterion(ContrastiveCriterion):
    """Symmetric InfoNCE between a task's two sides: {side: {"pred_embed": [B, P]}} (row i of each a positive
    pair), targets None -> {"loss_contrastive"}. Under several processes every rank's pairs are negatives for every
    other's, as in CLIP; gradients flow back through the gather."""

    def forward(self, outputs: dict, targets=None) -> dict:
        a, b = (o["pred_embed"] for o in outputs.values())
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            from torch.distributed.nn.functional import all_gather

            a, b = torch.cat(all_gather(a)), torch.cat(all_gather(b))
        return super().forward(a, b)


class RetrievalMetric:
    """Retrieval both ways over a whole held-out gallery. update({side: embeddings [B, P]}, {side: labels [B]})
    takes batches of either side or both (the sides of a by-label task are separate datasets); compute() ranks every
    query of each side against every item of the other -> {"<a>_to_<b>_r1", ...}."""

    def __init__(self, sides: tuple[str, str]):
        self.sides = sides
        self.embeds = {s: [] for s in sides}
        self.labels = {s: [] for s in sides}

    def update(self, outputs: dict, targets: dict) -> None:
        for s, e in outputs.items():
            self.embeds[s].append(e.float().cpu())
            self.labels[s].append(targets[s].cpu())

    def compute(self) -> dict:
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0)  # noqa: E731
        e = {s: cat(self.embeds[s]) for s in self.sides}
        lab = {s: cat(self.labels[s]).long() for s in self.sides}
        a, b = self.sides
        return {retrieval_key(q, g, k): v for q, g in ((a, b), (b, a))
                for k, v in retrieval_metrics(e[q], e[g], lab[q], lab[g]).items()}


KIND = TaskKind(
    name="contrastive",
    target=None,  # pairs are their own targets
    head=lambda cfg, task, n: ContrastiveHead(cfg.backbone().embed_dim, cfg.proj_dim, cfg.pool),
    criterion=lambda cfg, task, n: PairCriterion(),
    metric=lambda cfg, task, n, keep: None,  # needs the task's sides: RetrievalMetric(sides), built by the caller
    metric_names=RETRIEVAL,  # each both ways: metric_keys
    headline="r1",  # from the first side to the second
    outputs=("embedding",),
    export_outputs=lambda out, cfg, args: (out["pred_embed"],),
    argmax=False,
)


def metric_keys(sides: tuple[str, str]) -> list[str]:
    """The metric names of a contrastive task with these sides (the task's name goes before them)."""
    a, b = sides
    return [retrieval_key(q, g, k) for q, g in ((a, b), (b, a)) for k in RETRIEVAL]


def headline_key(sides: tuple[str, str]) -> str:
    return retrieval_key(*sides, KIND.headline)
