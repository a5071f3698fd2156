"""Fusion in the shared backbone (core/nn/fusion.py): an absent input is invisible, a sample's answer does not depend
on its batch-mates, and modality dropout never leaves a sample without inputs."""

from __future__ import annotations

import torch

from tessera.core.nn.backbone import Encoder
from tessera.core.nn.fusion import FusedAdapter, drop_inputs
from tessera.core.nn.heads import LinearHead
from tessera.core.nn.task_model import TaskModel
from tessera.modalities import REGISTRY


def fused_model(cfg, dropout=None) -> TaskModel:
    """image + text -> 3 classes, from the modalities' own adapters, in eval mode."""
    adapters = {m: REGISTRY[m].adapter(cfg) for m in ("image", "text")}
    fused = FusedAdapter(adapters, cfg.embed_dim, dropout)
    return TaskModel(fused, Encoder(cfg.backbone()), LinearHead(cfg.embed_dim, 3, "cls", 0.0)).eval()


def batch(cfg, B: int, lengths: list[int], present: list[list[bool]]) -> dict:
    """B images, B texts of the given lengths (padded to the longest), and which inputs each sample has."""
    n = cfg.image.img_size
    L = max(lengths)
    ids = torch.randint(1, cfg.text.vocab_size, (B, L))
    pad = torch.arange(L) >= torch.tensor(lengths)[:, None]
    return {"present": torch.tensor(present), "image": {"images": torch.randn(B, 1, n, n)},
            "text": {"input_ids": ids.masked_fill(pad, 0), "pad_mask": pad}}


def rows(b: dict, i: list[int]) -> dict:
    """Samples `i` of a batch, the text cut to their longest (so its padding differs from the batch's)."""
    pad = b["text"]["pad_mask"][i]
    L = int((~pad).sum(1).max())
    return {"present": b["present"][i], "image": {"images": b["image"]["images"][i]},
            "text": {"input_ids": b["text"]["input_ids"][i][:, :L], "pad_mask": pad[:, :L]}}


def test_an_absent_input_is_invisible_whatever_it_holds(cfg):
    model = fused_model(cfg)
    b = batch(cfg, 4, [5, 9, 3, 7], [[True, False], [False, True], [True, False], [True, True]])
    out = model(**b)["pred_logits"]
    other = {**b, "text": {**b["text"], "input_ids": torch.randint(1, cfg.text.vocab_size, b["text"]["input_ids"].shape)}}
    other["image"] = {"images": torch.where(b["present"][:, :1, None, None], b["image"]["images"], torch.randn_like(b["image"]["images"]))}
    changed = model(**other)["pred_logits"]
    # samples 0 and 2 lack text: new words there change nothing; samples 1 and 3 have text, so theirs changed
    torch.testing.assert_close(changed[[0, 2]], out[[0, 2]], rtol=0, atol=1e-6)
    assert (changed[[1, 3]] - out[[1, 3]]).abs().max() > 1e-3
    # sample 1 lacks its image, which was replaced too: only its text counts, so its answer is the text alone's
    alone = model(**rows({**other, "image": b["image"]}, [1]))["pred_logits"]
    torch.testing.assert_close(alone, changed[[1]], rtol=0, atol=1e-5)


def test_a_samples_answer_does_not_depend_on_its_batch_mates(cfg):
    model = fused_model(cfg)
    b = batch(cfg, 6, [4, 12, 2, 8, 16, 1], [[True, True], [True, False], [False, True], [True, True],
                                             [False, True], [True, True]])
    together = model(**b)["pred_logits"]
    for i in range(6):
        torch.testing.assert_close(model(**rows(b, [i]))["pred_logits"], together[[i]], rtol=0, atol=1e-5)


def test_no_gradient_reaches_an_input_no_sample_has(cfg):
    model = fused_model(cfg).train()
    b = batch(cfg, 4, [5, 9, 3, 7], [[False, True]] * 4)
    model(**b)["pred_logits"].sum().backward()
    image = model.adapter.adapters["image"]
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in image.parameters())
    assert model.adapter.adapters["text"].tok_embed.weight.grad.abs().max() > 0


def test_modality_dropout_drops_at_its_rate_and_never_leaves_a_sample_empty():
    g = torch.Generator().manual_seed(0)
    present = torch.rand(20000, 3, generator=g) < 0.7
    present[:5] = torch.tensor([True, False, False])  # samples with one input keep it
    kept = drop_inputs(present, torch.tensor([0.5, 0.0, 0.2]), g)
    assert kept.any(1).eq(present.any(1)).all()
    assert not (kept & ~present).any()  # nothing absent comes back
    assert kept[:5].eq(present[:5]).all()
    assert not kept[:, 1].ne(present[:, 1]).any()  # probability 0 never drops
    many = present.sum(1) == 3  # where dropping never empties a sample, the rate is the probability
    rate = 1 - kept[many].float().mean(0) / present[many].float().mean(0)
    assert abs(rate[0] - 0.5) < 0.03 and abs(rate[2] - 0.2) < 0.03, rate


def test_modality_dropout_acts_in_training_only(cfg):
    model = fused_model(cfg, dropout=[0.9, 0.9])
    b = batch(cfg, 8, [4] * 8, [[True, True]] * 8)
    torch.testing.assert_close(model(**b)["pred_logits"], model(**b)["pred_logits"])
    model.train()
    torch.manual_seed(1)
    a = model(**b)["pred_logits"]
    torch.manual_seed(2)
    assert (model(**b)["pred_logits"] - a).abs().max() > 1e-4
