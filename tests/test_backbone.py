"""The shared encoder: attention against its definition, independence of samples, padding, compile."""

import pytest
import torch

from tessera.core.config import ModelConfig
from tessera.core.nn.backbone import Attention, DropPath, Encoder, attention


def reference_attention(q, k, v, pad_mask=None):
    """softmax(Q K^T / sqrt(d)) V in float64, written from the definition."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / q.shape[-1] ** 0.5
    if pad_mask is not None:
        scores = scores.masked_fill(pad_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_float64_definition(fused, masked):
    B, H, L, Dh = 3, 4, 11, 16
    q, k, v = (torch.randn(B, H, L, Dh) for _ in range(3))
    pad_mask = None
    if masked:
        lengths = torch.tensor([11, 7, 1])
        pad_mask = torch.arange(L) >= lengths[:, None]
    out = attention(q, k, v, pad_mask, fused=fused)
    ref = reference_attention(q, k, v, pad_mask)
    assert (out.double() - ref).abs().max() < 1e-5


def test_both_paths_give_zeros_and_finite_gradients_for_a_sample_with_every_key_padded():
    B, H, L, Dh = 2, 2, 5, 8
    q, k, v = (torch.randn(B, H, L, Dh, requires_grad=True) for _ in range(3))
    pad_mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    outs = []
    for fused in (True, False):
        out = attention(q, k, v, pad_mask, fused=fused)
        out.sum().backward()
        assert torch.isfinite(out).all() and out[0].abs().max() == 0
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        outs.append(out.detach())
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(outs[1][1], reference_attention(q, k, v, pad_mask)[1].float(), atol=1e-5)


def test_masked_keys_get_no_weight():
    """Changing a padded key or value must not move any output."""
    B, H, L, Dh = 2, 2, 6, 8
    q, k, v = (torch.randn(B, H, L, Dh) for _ in range(3))
    pad_mask = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]]).bool()
    k2, v2 = k.clone(), v.clone()
    k2[pad_mask[:, None, :, None].expand_as(k)] = 100.0
    v2[pad_mask[:, None, :, None].expand_as(v)] = -100.0
    assert torch.allclose(attention(q, k, v, pad_mask), attention(q, k2, v2, pad_mask), atol=1e-6)


def test_fused_and_plain_paths_agree_through_the_encoder(monkeypatch):
    enc = Encoder(ModelConfig(size="debug").backbone()).eval()
    x = torch.randn(2, 9, 64)
    pad_mask = torch.tensor([[False] * 9, [False] * 5 + [True] * 4])
    fused = enc(x, pad_mask)
    monkeypatch.setattr(Attention, "fused", False)
    assert torch.allclose(fused, enc(x, pad_mask), atol=1e-5)


def test_samples_do_not_see_each_other():
    """d output[0] / d input[1] must be exactly zero: attention runs within a sample, never across the batch."""
    enc = Encoder(ModelConfig(size="debug").backbone()).eval()
    x = torch.randn(3, 7, 64, requires_grad=True)
    enc(x)[0].sum().backward()
    assert x.grad[1:].abs().max() == 0
    assert x.grad[0].abs().max() > 0
    # and changing the other samples leaves sample 0 as it was
    x2 = x.detach().clone()
    x2[1:] = torch.randn(2, 7, 64)
    assert torch.allclose(enc(x.detach())[0], enc(x2)[0], atol=1e-6)


def test_padding_changes_nothing_in_real_tokens():
    enc = Encoder(ModelConfig(size="debug").backbone()).eval()
    real = torch.randn(1, 5, 64)
    alone = enc(real)
    for pad_len in (1, 6):
        padded = torch.cat([real, torch.randn(1, pad_len, 64) * 10], dim=1)
        pad_mask = torch.arange(5 + pad_len)[None] >= 5
        out = enc(padded, pad_mask)
        assert torch.allclose(out[:, :5], alone, atol=1e-5), pad_len


def test_stochastic_depth_rises_linearly_and_is_off_in_eval():
    enc = Encoder(ModelConfig(size="debug", depth=3, drop_path_rate=0.2).backbone())
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in enc.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    x = torch.randn(2, 4, 64)
    enc.eval()
    assert torch.equal(enc(x), enc(x))


def test_drop_path_is_timms_bit_for_bit_in_training_and_eval():
    """The local copy draws what timm's draws from the same generator: a run, and its resume, are unchanged."""
    from timm.layers import DropPath as TimmDropPath

    for p, shape in ((0.1, (8, 5, 64)), (0.5, (16, 64)), (1.0, (4, 3, 2, 2))):
        x = torch.randn(shape)
        for training in (True, False):
            ours, theirs = DropPath(p).train(training), TimmDropPath(p).train(training)
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            torch.manual_seed(0)
            out_a = ours(a)
            out_a.sum().backward()
            torch.manual_seed(0)
            out_b = theirs(b)
            out_b.sum().backward()
            assert torch.equal(out_a, out_b) and torch.equal(a.grad, b.grad), (p, shape, training)
            assert repr(ours) == repr(theirs)
            assert torch.equal(out_a, x) != training  # the check can fail: training drops, eval passes through


@pytest.mark.slow
def test_compiled_backbone_matches_eager():
    enc = Encoder(ModelConfig(size="debug").backbone()).eval()
    x = torch.randn(2, 9, 64)
    pad_mask = torch.tensor([[False] * 9, [False] * 6 + [True] * 3])
    compiled = torch.compile(enc)
    with torch.no_grad():
        assert torch.allclose(compiled(x, pad_mask), enc(x, pad_mask), atol=1e-5)
        assert torch.allclose(compiled(x), enc(x), atol=1e-5)
