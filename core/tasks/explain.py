"""Explanations: which parts of an input a task's prediction rests on, read from the shared backbone's own
attention (core/nn/backbone.py's AttentionRecorder: the plain attention path of the very model that trained).

Two maps over the encoder's tokens, [CLS] left out and padding zero:
- rollout (Abnar & Zuidema 2020, arXiv:2005.00928): per layer the attention [B, H, L, L] averaged over heads,
  the identity added for the residual path, rows renormalised: Â = norm(mean_h A + I); R = Â_depth ... Â_1.
- grad (Chefer, Gur & Wolf 2021, arXiv:2103.15679): class-specific; per layer Ā = mean_h relu(∂y/∂A ⊙ A) and
  R <- R + Ā R from R = I, where y is the explained score (a pair's similarity; for a class, its log-probability
  rather than the paper's logit: a log-probability moves only with what tells the class from the others).
  ∂y/∂A ⊙ A is taken as the gradient of the pre-softmax scores, A ⊙ (∂y/∂A - <A, ∂y/∂A>): an attention row sums
  to 1, so only differences of its gradient mean anything, and a token attended to with weight ~1 otherwise gets
  the sign of an arbitrary offset. Measured on tests/test_explain.py's tasks (the share of inputs whose top token
  is the marked image patch / the text's keyword): the paper's form with the logit 100% / 14%, with the
  log-probability 0% / 86%; this form with the logit 100% / 13%, with the log-probability 100% / 87% (used).
A token's relevance is the row of R that the head pools ([CLS]; the mean of the real tokens' rows for a
mean-pooling head). A modality lays the tokens back out over its input (`Drawing.token_grid`, its draw.py) and
draws them (`Drawing.draw_relevance`); detection explains each box by its query's cross-attention (`Drawing.relevance`).

A fused task (core/nn/fusion.py: one sequence of [CLS] and each input's tokens, its own [CLS] first) is explained
by the same map over that whole sequence: `input_spans` says which tokens are whose, `input_shares` gives each
input's share of the relevance (the fraction of the sample's total relevance on its tokens), and each input's tokens
are laid out over that input as its modality lays out its own task's. An absent input's tokens are masked, so it
gets no relevance and a share of 0.

Faithfulness (deletion, Petsiuk et al. 2018, arXiv:1806.07421): the input's tokens are removed most relevant
first (marked as padding, so that nothing attends to them) and the explained score read after each step; the
area under that curve against the same with the tokens removed in a random order. Lower falls faster: the map
ranks what the model uses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tessera.core.nn.backbone import AttentionRecorder, positive_score_gradient
from tessera.core.nn.fusion import FusedAdapter
from tessera.core.nn.task_model import TaskModel

METHODS = ("grad", "rollout")
FRACTIONS = tuple(i / 10 for i in range(11))  # shares of an input's tokens removed, for the deletion curve


def reference(out: dict) -> dict:
    """What a prediction is, to explain and to follow under deletion: a classifier's class [B]; detection's best
    box, as (query [B], class [B]); an embedding, itself [B, P]; a regression's value [B, T]."""
    if "pred_embed" in out:
        return {"embed": out["pred_embed"].detach()}
    if "pred_value" in out:
        return {"value": out["pred_value"].detach()}
    logits = out["pred_logits"].detach()
    if logits.dim() == 2:
        return {"cls": logits.argmax(-1)}
    probs = logits.softmax(-1)[..., :-1]  # [B, Q, C]: the last class is "no object"
    best = probs.amax(-1).argmax(-1)  # [B]
    return {"query": best, "cls": probs[torch.arange(len(best)), best].argmax(-1)}


def score(out: dict, ref: dict, partner: torch.Tensor | None = None, prob: bool = False) -> torch.Tensor:
    """The explained score [B] of `out` for the prediction `ref`: the class's log-probability (its probability
    with prob=True); for detection, the class's best probability over the boxes (removing tokens changes which
    queries the decoder starts from, so a box is followed by its class); for an embedding, its similarity to
    `partner` [B, P] (the other side of a matched pair), or to its own reference without one; for a regression,
    the first target's value (in its units: no probability)."""
    if "value" in ref:
        return out["pred_value"][:, 0]
    if "embed" in ref:
        return (out["pred_embed"] * (ref["embed"] if partner is None else partner)).sum(-1)
    logits = out["pred_logits"]
    if logits.dim() == 3:  # [B, Q, C + 1]
        probs = logits.softmax(-1)
        return probs.gather(2, ref["cls"][:, None, None].expand(-1, probs.shape[1], 1))[..., 0].amax(1)
    values = logits.softmax(-1) if prob else logits.log_softmax(-1)
    return values.gather(1, ref["cls"][:, None])[:, 0]


def pooled_rows(net: TaskModel, pad_mask: torch.Tensor | None, B: int, L: int, device) -> torch.Tensor:
    """[B, L] weights over the rows of R that the head reads: [CLS] alone, or the mean of the real tokens."""
    if getattr(net.head, "pool", "cls") == "mean":
        w = torch.ones(B, L, device=device)
        w[:, 0] = 0
        if pad_mask is not None:
            w = w.masked_fill(pad_mask, 0)
        return w / w.sum(1, keepdim=True).clamp(min=1)
    w = torch.zeros(B, L, device=device)
    w[:, 0] = 1
    return w


def encode(net: TaskModel, inputs: dict):
    """(tokens [B, L, D], pad_mask [B, L] or None, outputs)."""
    tokens, pad_mask = net.adapter(**inputs)
    return tokens, pad_mask, read_tokens(net, tokens, pad_mask)


def read_tokens(net: TaskModel, tokens: torch.Tensor, pad_mask: torch.Tensor | None,
                drop: torch.Tensor | None = None) -> dict:
    """The outputs on the adapter's tokens [B, L, D] with the `drop` [B, L] tokens removed (marked as padding)."""
    if drop is not None:
        pad_mask = drop if pad_mask is None else pad_mask | drop
    return net.head(net.backbone(tokens, pad_mask), pad_mask)


def token_relevance(net: TaskModel, inputs: dict, method: str = "grad",
                    target: Callable[[dict], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """-> (relevance [B, L] of each encoder token, [CLS] and padding 0; the outputs; pad_mask [B, L] or None).
    target(outputs) -> [B]: the score explained (grad); default: the predicted class's log-probability."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    layers = {block.attn for block in net.backbone.blocks}
    with torch.enable_grad(), AttentionRecorder() as rec:
        tokens, pad_mask, out = encode(net, inputs)
        maps = [w for module, w in rec.maps if module in layers]  # [B, H, L, L] each, first layer first
        B, L = tokens.shape[:2]
        eye = torch.eye(L, device=tokens.device).expand(B, L, L)
        if method == "rollout":
            R = eye
            for A in maps:
                A = A.detach().mean(1) + eye
                R = (A / A.sum(-1, keepdim=True)) @ R
        else:
            y = (target or (lambda o: score(o, reference(o))))(out)
            grads = torch.autograd.grad(y.sum(), maps)
            R = eye
            for A, G in zip(maps, grads):
                R = R + positive_score_gradient(A, G) @ R
    rel = (pooled_rows(net, pad_mask, B, L, tokens.device)[:, None, :] @ R)[:, 0]  # [B, L]
    rel[:, 0] = 0
    if pad_mask is not None:
        rel = rel.masked_fill(pad_mask, 0)
    return rel, {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}, pad_mask


@torch.no_grad()
def deletion(net: TaskModel, inputs: dict, relevance: torch.Tensor, partner: torch.Tensor | None = None,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deletion curves [len(FRACTIONS)], the mean over the batch of the explained probability (for an embedding:
    its similarity to `partner`) as each share of the real tokens is removed: most relevant first, and in a random
    order (seeded)."""
    tokens, pad_mask, out = encode(net, inputs)
    ref = reference(out)
    B, L = tokens.shape[:2]
    real = torch.ones(B, L, dtype=torch.bool, device=tokens.device)
    real[:, 0] = False
    if pad_mask is not None:
        real &= ~pad_mask
    n = real.sum(1)  # [B]
    g = torch.Generator().manual_seed(seed)
    curves = []
    for ranks in (relevance.masked_fill(~real, -torch.inf),
                  torch.rand(B, L, generator=g).to(tokens.device).masked_fill(~real, -torch.inf)):
        order = ranks.argsort(1, descending=True)  # real tokens first, most relevant first
        position = torch.empty_like(order)
        position.scatter_(1, order, torch.arange(L, device=order.device).expand(B, L))  # rank of each token
        curve = []
        for f in FRACTIONS:
            drop = (position < (f * n).round().long()[:, None]) & real
            out_f = read_tokens(net, tokens, pad_mask, drop)  # the adapter ran once: a spectrogram, not eleven
            curve.append(score(out_f, ref, partner, prob=partner is None).mean().item())
        curves.append(np.array(curve))
    return curves[0], curves[1]


def area(curve: np.ndarray) -> float:
    """The area under a deletion curve over FRACTIONS (trapezoids)."""
    x = np.asarray(FRACTIONS)
    return float(((curve[1:] + curve[:-1]) / 2 * np.diff(x)).sum())


@torch.no_grad()
def input_spans(adapter: FusedAdapter, inputs: dict) -> dict[str, slice]:
    """Where each input's tokens lie in a fused task's sequence [B, 1 + sum_k L_k] (FusedAdapter's order: the fused
    [CLS], then each input's tokens, its own [CLS] first): input name -> slice. Each input's adapter runs once more
    for its token count L_k, which a text's padding makes depend on the batch."""
    spans, start = {}, 1
    for name in adapter.names:
        n = adapter.adapters[name](**inputs[name])[0].shape[1]
        spans[name] = slice(start, start + n)
        start += n
    return spans


def input_shares(relevance: torch.Tensor, spans: dict[str, slice]) -> torch.Tensor:
    """Each input's share of a fused prediction's relevance: relevance [B, L] (token_relevance over the fused
    sequence) -> shares [B, K] in `spans`' order, the fraction of a sample's total |relevance| on each input's
    tokens. An input's own [CLS] is left out, as from its map: it holds nothing of the sample but that the input is
    there. A row sums to 1 over the inputs present; an absent input's tokens are masked, so its share is 0."""
    rel = relevance.abs()
    per_input = torch.stack([rel[:, s.start + 1: s.stop].sum(1) for s in spans.values()], dim=1)  # [B, K]
    return per_input / per_input.sum(1, keepdim=True).clamp(min=1e-12)
