"""Heads and criteria against their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.heads import ContrastiveCriterion, LinearHead, pool, weighted_loss


def test_mean_pool_ignores_padding_and_cls_takes_the_first_token():
    x = torch.randn(2, 5, 3)
    pad_mask = torch.tensor([[False] * 5, [False, False, True, True, True]])
    pooled = pool(x, pad_mask, "mean")
    assert torch.allclose(pooled[1], x[1, :2].mean(0)) and torch.allclose(pooled[0], x[0].mean(0))
    assert torch.equal(pool(x, pad_mask, "cls"), x[:, 0])


def test_pre_logits_returns_the_pooled_features():
    head = LinearHead(8, 3)
    x = torch.randn(2, 4, 8)
    feats = head(x, pre_logits=True)["pred_features"]
    assert torch.equal(feats, x[:, 0])
    assert torch.allclose(head(x)["pred_logits"], head.fc(feats))


def test_clip_temperature_starts_at_0_07_and_is_clamped_at_100():
    crit = ContrastiveCriterion()
    assert crit.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert crit.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        crit.logit_scale.fill_(10.0)
    assert crit.scale().item() == pytest.approx(100.0)


def test_clip_loss_is_symmetric_infonce():
    a = F.normalize(torch.randn(6, 8), dim=-1)
    b = F.normalize(torch.randn(6, 8), dim=-1)
    crit = ContrastiveCriterion()
    s = 1 / 0.07
    sim = s * a @ b.T
    expect = 0.0
    for i in range(6):  # -log softmax of the positive, each direction, averaged
        expect += -torch.log_softmax(sim[i], 0)[i] - torch.log_softmax(sim[:, i], 0)[i]
    expect = expect / 12
    assert crit(a, b)["loss_contrastive"].item() == pytest.approx(expect.item(), rel=1e-5)
    assert crit(a, b)["loss_contrastive"].item() == pytest.approx(crit(b, a)["loss_contrastive"].item(), rel=1e-6)


def test_weighted_loss_uses_only_named_weights():
    losses = {"loss_ce": torch.tensor(2.0), "loss_bbox": torch.tensor(3.0), "loss_extra": torch.tensor(100.0)}
    assert weighted_loss(losses, {"loss_ce": 1.0, "loss_bbox": 5.0}).item() == 17.0
