"""DETR pieces against their definitions: GIoU by hand, the matcher by brute force, the criterion, post-processing."""

import itertools

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from tessera.core.config import ModelConfig
from tessera.core.nn.backbone import CrossAttention
from tessera.modalities.detection import (DetectionHead, HungarianMatcher, SetCriterion, cxcywh_to_xyxy, grid_centres, postprocess,
                                  sine_embed)
from tessera.modalities.image import PatchEmbed


def test_giou_against_hand_computed_values():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [2, 0, 3, 1], [0, 0, 2, 2]])
    # overlap 1, union 7, hull 9: 1/7 - 2/9;  disjoint, union 2, hull 3: 0 - 1/3;  identical: 1
    expect = torch.tensor([1 / 7 - 2 / 9, -1 / 3, 1.0])
    assert torch.allclose(torch.diag(generalized_box_iou(a, b)), expect)
    assert torch.allclose(cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4]])), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    boxes = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(0))  # batched, as `decode` converts them
    assert torch.equal(cxcywh_to_xyxy(boxes), box_convert(boxes, "cxcywh", "xyxy"))  # torchvision's, bit for bit


def random_case(B, Q, C, sizes, g):
    outputs = {"pred_logits": torch.randn(B, Q, C + 1, generator=g), "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25}
    targets = [{"labels": torch.randint(0, C, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25}
               for n in sizes]
    return outputs, targets


def cost_by_definition(logits, boxes, labels, tgt_boxes, w=(1.0, 5.0, 2.0)):
    """[Q, n] matching cost, one pair at a time, in float64."""
    prob = logits.double().softmax(-1)
    cost = torch.zeros(len(boxes), len(tgt_boxes), dtype=torch.float64)
    for q, t in itertools.product(range(len(boxes)), range(len(tgt_boxes))):
        l1 = (boxes[q].double() - tgt_boxes[t].double()).abs().sum()
        giou = generalized_box_iou(cxcywh_to_xyxy(boxes[q:q + 1].double()), cxcywh_to_xyxy(tgt_boxes[t:t + 1].double()))[0, 0]
        cost[q, t] = -w[0] * prob[q, labels[t]] + w[1] * l1 - w[2] * giou
    return cost


@pytest.mark.parametrize("seed", range(6))
def test_matcher_finds_the_optimal_assignment(seed):
    g = torch.Generator().manual_seed(seed)
    Q, sizes = 5, [0, 1, 3, 5]
    outputs, targets = random_case(len(sizes), Q, 4, sizes, g)
    indices = HungarianMatcher(1.0, 5.0, 2.0)(outputs, targets)
    for b, (src, tgt) in enumerate(indices):
        n = sizes[b]
        assert len(src) == len(tgt) == n and len(set(src.tolist())) == n
        cost = cost_by_definition(outputs["pred_logits"][b], outputs["pred_boxes"][b], targets[b]["labels"], targets[b]["boxes"])
        got = cost[src, tgt].sum()
        best = min((sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(Q), n)),
                   default=torch.tensor(0.0))
        assert got == pytest.approx(float(best), abs=1e-5)


def test_batched_matching_equals_per_image_matching():
    g = torch.Generator().manual_seed(7)
    outputs, targets = random_case(3, 6, 3, [2, 0, 4], g)
    matcher = HungarianMatcher(1.0, 5.0, 2.0)
    batched = matcher(outputs, targets)
    for b in range(3):
        single = matcher({k: v[b:b + 1] for k, v in outputs.items()}, targets[b:b + 1])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])


def test_criterion_is_zero_for_boxes_on_target_and_counts_no_object_at_eos_weight():
    Q, C = 4, 3
    tgt = [{"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])}]
    boxes = torch.full((1, Q, 4), 0.5)
    boxes[0, 1], boxes[0, 3] = tgt[0]["boxes"][0], tgt[0]["boxes"][1]
    logits = torch.full((1, Q, C + 1), -20.0)
    logits[0, 1, 2] = logits[0, 3, 0] = 20.0
    logits[0, 0, C] = logits[0, 2, C] = 20.0  # the unmatched queries say "no object"
    crit = SetCriterion(C, HungarianMatcher(1.0, 5.0, 2.0), 0.1, 1.0, 5.0, 2.0, num_aux=0)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, tgt)
    assert losses["loss_bbox"] < 1e-6 and losses["loss_giou"] < 1e-6 and losses["loss_ce"] < 1e-6
    # one no-object query now uniform: its CE is log(C+1), weighted 0.1 in a mean over 2 x 0.1 + 2 x 1.0
    logits[0, 0] = 0.0
    ce = crit({"pred_logits": logits, "pred_boxes": boxes}, tgt)["loss_ce"]
    uniform = torch.log(torch.tensor(C + 1.0))
    assert ce == pytest.approx(float(0.1 * uniform / (0.1 * 2 + 1.0 * 2)), rel=1e-4)  # weighted mean


def test_criterion_adds_auxiliary_losses_for_each_earlier_layer_and_survives_empty_targets():
    g = torch.Generator().manual_seed(1)
    outputs, targets = random_case(2, 5, 3, [0, 0], g)
    outputs["aux_outputs"] = [{k: v.clone() for k, v in outputs.items()} for _ in range(2)]
    outputs["enc_outputs"] = {k: v.clone() for k, v in random_case(2, 16, 3, [0, 0], g)[0].items()}
    crit = SetCriterion(3, HungarianMatcher(1.0, 5.0, 2.0), 0.1, 1.0, 5.0, 2.0, num_aux=2)
    losses = crit(outputs, targets)
    assert set(losses) == set(crit.weight_dict) == {f"loss_{n}{s}" for n in ("ce", "bbox", "giou")
                                                    for s in ("", "_0", "_1", "_enc")}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_ce"] > 0


def test_postprocess_gives_scored_pixel_boxes_without_the_no_object_class():
    logits = torch.tensor([[[0.0, 3.0, 5.0]]])  # classes 0, 1, no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.25]]])
    (res,) = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    prob = logits.softmax(-1)[0, 0]
    assert res["labels"].tolist() == [1]
    assert res["scores"][0] == pytest.approx(float(prob[1]))
    assert torch.allclose(res["boxes"], torch.tensor([[50.0, 37.5, 150.0, 62.5]]))


def test_queries_start_at_the_best_scoring_patch_proposals():
    """Two-stage: the Q patches whose proposals score highest become the queries, and at initialisation each
    query's box is its patch's anchor (patch centre, side `anchor_size`)."""
    D, N, Q = 32, 16, 3
    head = DetectionHead(ModelConfig(embed_dim=D, depth=1, num_heads=2).backbone(), num_classes=2, num_queries=Q, depth=2).eval()
    with torch.no_grad():
        head.enc_class.weight.zero_()
        head.enc_class.bias.zero_()
        head.enc_class.weight[0, 0] = 1.0  # class 0's score reads feature 0
    x = torch.randn(2, 1 + N, D) * 0.1
    chosen = [[5, 9, 14], [0, 3, 12]]
    for b, patches in enumerate(chosen):
        x[b, [1 + p for p in patches], 0] = 10.0
    out = head(x)
    assert out["enc_outputs"]["pred_logits"].shape == (2, N, 3) and out["pred_boxes"].shape == (2, Q, 4)
    centres = grid_centres(N, "cpu")
    for b, patches in enumerate(chosen):
        got = out["pred_boxes"][b, :, :2]  # [Q, 2], in score order: which query takes which patch is free
        dist = torch.cdist(got, centres[patches])  # [Q, 3]
        assert (dist.min(0).values < 0.02).all() and (dist.min(1).values < 0.02).all()
        assert torch.allclose(out["pred_boxes"][b, :, 2:], torch.tensor(0.3), atol=0.01)


def test_criterion_scores_each_query_against_its_matched_target_not_the_target_at_the_same_rank():
    """Target 0 sits on query 3 and target 1 on query 1: the matcher returns queries in order (1, 3) with targets
    (1, 0). A criterion that took targets in their own order would compare query 1 with target 0."""
    C = 3
    tgt = [{"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])}]
    boxes = torch.full((1, 4, 4), 0.5)
    boxes[0, 3], boxes[0, 1] = tgt[0]["boxes"][0], tgt[0]["boxes"][1]
    logits = torch.full((1, 4, C + 1), -20.0)
    logits[0, 3, 2] = logits[0, 1, 0] = 20.0
    logits[0, 0, C] = logits[0, 2, C] = 20.0
    src, tgt_idx = HungarianMatcher(1.0, 5.0, 2.0)({"pred_logits": logits, "pred_boxes": boxes}, tgt)[0]
    assert src.tolist() == [1, 3] and tgt_idx.tolist() == [1, 0]  # the case this test is about
    losses = SetCriterion(C, HungarianMatcher(1.0, 5.0, 2.0), 0.1, 1.0, 5.0, 2.0, 0)({"pred_logits": logits, "pred_boxes": boxes}, tgt)
    assert all(v < 1e-6 for v in losses.values()), losses


def test_grid_centres_are_x_then_y_row_by_row_as_patch_embed_orders_its_tokens():
    assert grid_centres(4, "cpu").tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    # a bright patch at column 3, row 1 of a 4 x 4 grid is token 7, centred at x = 3.5 / 4, y = 1.5 / 4
    embed = PatchEmbed(4, 1, 1)
    with torch.no_grad():
        embed.proj.weight.fill_(1.0)
        embed.proj.bias.zero_()
    image = torch.zeros(1, 1, 16, 16)
    image[..., 4:8, 12:16] = 1.0
    tokens, grid = embed(image)
    k = int(tokens[0, :, 0].argmax())
    assert grid == (4, 4) and k == 7
    assert grid_centres(16, "cpu")[k].tolist() == [3.5 / 4, 1.5 / 4]


def test_cross_attention_adds_positions_to_the_keys_only():
    """DETR: keys W_k (memory + pos) + b_k, values W_v memory + b_v, queries W_q x + b_q; written out for one head."""
    D, Lq, Lk = 8, 3, 5
    attn = CrossAttention(D, num_heads=1).eval()
    x, memory, pos = torch.randn(2, Lq, D), torch.randn(2, Lk, D), torch.randn(1, Lk, D)
    Wk, Wv = attn.kv.weight[:D], attn.kv.weight[D:]
    bk, bv = attn.kv.bias[:D], attn.kv.bias[D:]
    q = x @ attn.q.weight.T + attn.q.bias
    k = (memory + pos) @ Wk.T + bk
    v = memory @ Wv.T + bv
    expect = torch.softmax(q @ k.transpose(1, 2) / D ** 0.5, dim=-1) @ v @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(attn(x, memory, memory_pos=pos), expect, atol=1e-5)
    assert not torch.allclose(attn(x, memory), expect, atol=1e-3)


def test_every_decoder_layer_cross_attends_with_the_patch_positions():
    """The memory positions reaching each cross-attention are the sine positions of the patch centres ([CLS]: 0)."""
    D, N = 32, 16
    head = DetectionHead(ModelConfig(embed_dim=D, depth=1, num_heads=2).backbone(), num_classes=2, num_queries=3, depth=2).eval()
    seen = []
    for block in head.decoder.blocks:
        block.cross_attn.register_forward_pre_hook(lambda module, args: seen.append(args[3]))
    head(torch.randn(2, 1 + N, D))
    expect = torch.cat([torch.zeros(1, D), sine_embed(grid_centres(N, "cpu"), D)])[None]
    assert len(seen) == 2 and all(s is not None and torch.allclose(s, expect) for s in seen)