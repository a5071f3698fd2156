"""Contract tests over every registered task: forward, backward, no NaN, every parameter trained, overfitting.

Each adapter + head must drive its loss down by 10x on a tiny fixed batch in a few seconds on the CPU: a model
that cannot memorise four samples has a bug (a detached branch, a wrong mask, a mis-wired head).
"""

import pytest
import torch

from tessera.core.nn.backbone import Encoder
from tessera.core.config import AudioConfig, ModelConfig, TabularConfig, TextConfig
from tessera.core.nn.heads import ContrastiveCriterion, weighted_loss
from tessera.core.stages.train import param_groups, warmup_cosine
from tessera.modalities import REGISTRY, build_criterion, build_task_model

NUM_CLASSES = 4


def config() -> ModelConfig:
    return ModelConfig(size="debug", text=TextConfig(vocab_size=50, max_len=16),
                       audio=AudioConfig(n_mels=32, patch_size=8, freq_mask=4, time_mask=8),
                       tabular=TabularConfig(numeric=["a", "b", "c"], categorical=["k", "m"], mean=[0.0, 1.0, -2.0],
                                             std=[1.0, 2.0, 0.5], categories={"k": ["x", "y", "z"], "m": ["p", "q"]}))


def batch(modality: str, g: torch.Generator):
    """Four samples with their targets; variable lengths where the modality has them."""
    if modality == "image":
        return {"images": torch.randn(4, 1, 32, 32, generator=g)}, torch.arange(4)
    if modality == "text":
        ids = torch.randint(2, 50, (4, 9), generator=g)
        pad_mask = torch.arange(9) >= torch.tensor([9, 3, 6, 1])[:, None]
        return {"input_ids": ids.masked_fill(pad_mask, 0), "pad_mask": pad_mask}, torch.arange(4)
    if modality == "audio":
        # tones a few mel bins apart plus noise: clips that differ, or memorising them is ill-posed and chaotic
        t = torch.arange(8000) / 16000
        freqs = torch.tensor([300.0, 700.0, 1500.0, 3000.0])[:, None]
        wave = 0.3 * torch.sin(2 * torch.pi * freqs * t) + 0.05 * torch.randn(4, 8000, generator=g)
        return {"waveform": wave, "lengths": torch.tensor([8000, 5000, 3000, 8000])}, torch.arange(4)
    if modality == "tabular":
        return {"numeric": torch.randn(4, 3, generator=g),
                "categorical": torch.stack([torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 1, 0])], 1)}, torch.arange(4)
    targets = [{"labels": torch.tensor([i % NUM_CLASSES] * (1 + i % 2)),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])[: 1 + i % 2]} for i in range(4)]
    return {"images": torch.randn(4, 1, 64, 64, generator=g)}, targets


@pytest.mark.parametrize("modality", REGISTRY)
def test_forward_backward_reaches_every_parameter(modality):
    model = build_task_model(modality, config(), NUM_CLASSES).train()
    criterion = build_criterion(modality, config(), NUM_CLASSES)
    inputs, targets = batch(modality, torch.Generator().manual_seed(0))
    outputs = model(**inputs)
    losses = criterion(outputs, targets)
    loss = weighted_loss(losses, criterion.weight_dict)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    zero_grad = [n for n, p in model.named_parameters() if p.grad.abs().max() == 0]
    assert zero_grad == []


def overfit(model: torch.nn.Module, step_loss, steps=300, lr=2e-3, warmup=20):
    """Trains as tessera.core.stages.train does (AdamW over its parameter groups, linear warmup, gradients clipped at norm 1)
    until the loss falls to a tenth of its first value; returns (first, last).

    Without warmup, Adam's first steps move every weight by about lr whatever its gradient, and in 6 of 10 seeds
    they threw the contrastive pair into collapse: every embedding equal, where InfoNCE's gradient (proportional to
    the differences between embeddings) vanishes, so training never leaves it. Training warms up; so does this."""
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps))
    first = None
    for _ in range(steps):
        loss = step_loss()
        first = first if first is not None else loss.item()
        if loss.item() < first / 10:
            return first, loss.item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    return first, loss.item()


@pytest.mark.parametrize("modality", REGISTRY)
def test_each_task_overfits_a_tiny_batch(modality):
    cfg = config()
    model = build_task_model(modality, cfg, NUM_CLASSES)
    model.train()
    model.adapter.eval()  # SpecAugment would redraw masks each step; memorising needs a fixed input
    criterion = build_criterion(modality, cfg, NUM_CLASSES)
    inputs, targets = batch(modality, torch.Generator().manual_seed(1))
    first, last = overfit(model, lambda: weighted_loss(criterion(model(**inputs), targets), criterion.weight_dict))
    assert last < first / 10, (first, last)


@pytest.mark.parametrize("seed", range(6))
def test_audio_and_image_align_through_one_shared_backbone(seed):
    torch.manual_seed(seed)
    cfg = config()
    backbone = Encoder(cfg.backbone())
    audio = build_task_model("audio", cfg, 0, backbone, contrastive=True).train()
    image = build_task_model("image", cfg, 0, backbone, contrastive=True).train()
    audio.adapter.eval()  # fixed inputs (no SpecAugment / affine jitter): memorising needs them
    image.adapter.eval()
    assert audio.backbone is image.backbone
    criterion = ContrastiveCriterion()
    g = torch.Generator().manual_seed(2 + seed)
    a_in, _ = batch("audio", g)
    i_in, _ = batch("image", g)
    both = torch.nn.ModuleList([audio, image, criterion])  # its parameters hold the shared backbone once
    first, last = overfit(both, lambda: criterion(audio(**a_in)["pred_embed"], image(**i_in)["pred_embed"])["loss_contrastive"])
    assert last < first / 10, (first, last)
