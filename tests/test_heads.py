"""Heads and criteria against their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from tessera.core.nn.heads import ContrastiveCriterion, LinearHead, pool, weighted_loss


def test_mean_pool_leaves_out_cls_and_padding_and_cls_takes_the_first_token():
    """timm's avg pooling: the mean of the tokens after [CLS]; padded ones are not averaged in either."""
    x = torch.tensor([[[100.0], [1.0], [2.0], [3.0], [4.0]],
                      [[100.0], [5.0], [7.0], [-50.0], [-50.0]]])  # [B=2, L=5, D=1]; position 0 is [CLS]
    pad_mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    assert pool(x, pad_mask, "mean")[:, 0].tolist() == [2.5, 6.0]
    assert pool(x, None, "mean")[:, 0].tolist() == [2.5, (5 + 7 - 100) / 4]
    assert pool(x, pad_mask, "cls")[:, 0].tolist() == [100.0, 100.0]


def test_pre_logits_returns_the_pooled_features():
    head = LinearHead(8, 3, "cls", 0.0)
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


def test_the_logit_scale_is_a_trained_parameter_below_the_clamp():
    """CLIP learns its temperature: the scale must get a gradient (not be detached or a buffer) and move."""
    from tessera.core.stages.train import param_groups

    crit = ContrastiveCriterion()
    assert any(p is crit.logit_scale for p in crit.parameters())
    a, b = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    crit(a, b)["loss_contrastive"].backward()
    assert crit.logit_scale.grad is not None and crit.logit_scale.grad.abs().item() > 1e-4
    before = crit.logit_scale.item()
    torch.optim.AdamW(param_groups(crit, weight_decay=0.05), lr=1e-2).step()
    assert abs(crit.logit_scale.item() - before) > 5e-3
    # clamped at 100: no gradient pushes it further
    with torch.no_grad():
        crit.logit_scale.fill_(math.log(200.0))
    crit.logit_scale.grad = None
    crit(a, b)["loss_contrastive"].backward()
    assert crit.logit_scale.grad.abs().item() == 0.0