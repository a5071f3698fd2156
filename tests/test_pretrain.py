"""The masked-prediction objective (core/nn/pretrain.py): it learns, its teacher is an EMA that no gradient reaches,
its masks belong to samples, and padding is never a target; the pretrain stage (core/stages/pretrain.py) resumes,
and training starts from what it wrote."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tessera.core.config import ModelConfig, TextConfig, parse_params
from tessera.core.errors import UserError
from tessera.core.nn.backbone import Encoder
from tessera.core.nn.pretrain import MaskedPrediction, sample_masks, sample_seeds
from tessera.core.nn.weights import read_state_dict
from tessera.core.stages.pretrain import pretrain_model
from tessera.core.stages.train import start_from_pretrained
from tessera.core.tasks.multitask import build_model
from tessera.modalities import REGISTRY
from helpers import merge

VOCAB, L = 32, 12


def objective(mask_ratio=0.5, decay=0.99) -> MaskedPrediction:
    torch.manual_seed(0)
    cfg = ModelConfig(size="debug", drop_path_rate=0.0, text=TextConfig(vocab_size=VOCAB, max_len=L))
    return MaskedPrediction(nn.ModuleDict({"text": REGISTRY["text"].adapter(cfg)}), Encoder(cfg.backbone()),
                            mask_ratio, decay)


def sequences(n: int, generator: torch.Generator) -> torch.Tensor:
    """A toy language: a random start, then each token the previous one + 1 (mod VOCAB): a hidden token is
    predictable from its neighbours. [n, L]"""
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    return (start + torch.arange(L)) % VOCAB


def test_a_masked_tokens_loss_falls_on_a_toy_task():
    """Falls to about half in 30 steps; a decoder blind to the visible states (position alone) stays near 0.8."""
    model = objective()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    g, losses = torch.Generator().manual_seed(0), []
    for step in range(30):
        ids = sequences(16, g)
        loss = model("text", {"input_ids": ids}, sample_seeds(0, step, torch.arange(16)))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_teacher()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_the_teacher_gets_no_gradient_and_follows_the_students_ema():
    model = objective(decay=0.9)
    teacher = [p.detach().clone() for p in model.teacher.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = sequences(8, torch.Generator().manual_seed(1))
    model("text", {"input_ids": ids}, sample_seeds(0, 0, torch.arange(8)))["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    opt.step()
    model.update_teacher()
    for before, t, s in zip(teacher, model.teacher.parameters(), model.student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * before + 0.1 * s.detach())
    assert any(not torch.equal(before, t) for before, t in zip(teacher, model.teacher.parameters()))


def test_a_samples_mask_depends_on_its_seed_alone_not_on_its_batch_or_its_padding():
    L = 20
    lengths = torch.tensor([20, 9, 14, 3])
    pad = torch.arange(L) >= lengths[:, None]  # [4, L]
    seeds = sample_seeds(7, 2, torch.tensor([5, 11, 40, 2]))
    batch = sample_masks(seeds, pad, L, 0.6)
    for b in range(4):  # alone, padded only to its own length, it masks the same tokens
        alone = sample_masks(seeds[b:b + 1], pad[b:b + 1, : lengths[b]], int(lengths[b]), 0.6)
        assert torch.equal(alone[0], batch[b, : lengths[b]])
        assert not batch[b, lengths[b]:].any()  # padding is never a target
        assert not batch[b, 0]  # nor [CLS]
        assert batch[b].sum() == max(1, round(0.6 * (int(lengths[b]) - 1)))
    assert torch.equal(sample_masks(seeds.flip(0), pad.flip(0), L, 0.6), batch.flip(0))
    # the same sample in another epoch: another mask
    assert not torch.equal(sample_masks(sample_seeds(7, 3, torch.tensor([5])), pad[:1], L, 0.6)[0], batch[0])


def test_padding_is_never_a_target_and_a_sample_alone_has_the_loss_it_has_in_a_padded_batch():
    model = objective().eval()
    g = torch.Generator().manual_seed(3)
    short, long = sequences(1, g)[:, :5], sequences(1, g)
    padded = torch.cat([short, torch.zeros(1, L - 5, dtype=torch.long)], dim=1)
    pad_mask = torch.arange(L)[None] >= torch.tensor([[5], [L]])
    seeds = sample_seeds(0, 0, torch.tensor([3, 4]))
    with torch.no_grad():
        together = model("text", {"input_ids": torch.cat([padded[:1], long]), "pad_mask": pad_mask}, seeds)
        alone = [model("text", {"input_ids": short}, seeds[:1]), model("text", {"input_ids": long}, seeds[1:])]
    assert together["masked"] == alone[0]["masked"] + alone[1]["masked"]  # no pad position among the targets
    n = [a["masked"] for a in alone]
    mean = (alone[0]["loss"] * n[0] + alone[1]["loss"] * n[1]) / (n[0] + n[1])
    torch.testing.assert_close(together["loss"], mean, atol=1e-5, rtol=1e-5)


def test_a_pretraining_stopped_midway_resumes_to_the_same_weights_which_training_then_starts_from(data_dir, tmp_path):
    params = parse_params(merge(yaml.safe_load((data_dir / "base.yaml").read_text()), {
        "train": {"tasks": ["image", "text"], "align": [], "batch_size": 16, "warmup_steps": 2, "eval_every": 4,
                  "num_workers": 0, "out": str(tmp_path / "train")},
        "pretrain": {"enabled": True, "steps": 10, "out": str(tmp_path / "pre"), "metrics": str(tmp_path / "pre.json")}}))
    with pytest.raises(UserError, match="run `tessera pretrain`"):  # on, but not run yet
        start_from_pretrained(params, build_model(params.model, Path(params.prepare.out), ["image", "text"], None))
    pretrain_model(params)
    whole = read_state_dict(tmp_path / "pre/model.safetensors")
    shutil.rmtree(tmp_path / "pre/checkpoints/step-0000010")  # as if killed after the checkpoint at step 8
    assert pretrain_model(params)["steps"] == 10
    assert all(torch.equal(whole[k], v) for k, v in read_state_dict(tmp_path / "pre/model.safetensors").items())
    torch.manual_seed(1)
    model = build_model(params.model, Path(params.prepare.out), ["image", "text"], None)
    start_from_pretrained(params, model)
    own = model.state_dict()
    assert {k for k in own if k.startswith(("adapters.", "backbone."))} == set(whole)
    assert all(torch.equal(own[k], v) for k, v in whole.items())
