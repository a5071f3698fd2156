"""The image adapter is a ViT: patches are local, and with timm's weights it computes timm's outputs."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from tessera.core.config import ImageConfig, ModelConfig
from tessera.core.errors import UserError
from tessera.modalities import REGISTRY, build_task_model
from tessera.modalities.image import ImageAdapter, load_timm_vit


def test_each_patch_token_depends_only_on_its_own_pixels():
    p, D = 4, 16
    adapter = ImageAdapter(D, ImageConfig(img_size=16, patch_size=p, in_chans=3, augment=False), 0.0)
    images = torch.randn(1, 3, 16, 16, requires_grad=True)
    tokens, _ = adapter(images)
    assert tokens.shape == (1, 1 + 16, D)
    for j in range(16):  # token 1 + j is patch j, row-major over the 4 x 4 grid
        (grad,) = torch.autograd.grad(tokens[0, 1 + j].sum(), images, retain_graph=True)
        r, c = divmod(j, 4)
        inside = torch.zeros_like(grad, dtype=torch.bool)
        inside[..., r * p:(r + 1) * p, c * p:(c + 1) * p] = True
        assert grad[~inside].abs().max() == 0, j
        assert grad[inside].abs().min() > 0, j


def tiny_vit_pair(num_classes=10, **timm_kwargs):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **timm_kwargs).eval()
    cfg = ModelConfig(size="tiny", image=ImageConfig(img_size=224, patch_size=16, in_chans=3))
    ours = build_task_model("image", cfg, num_classes).eval()
    missing = load_timm_vit(ours, ref.state_dict())
    return ref, ours, missing


def test_matches_timm_vit_given_the_same_weights():
    ref, ours, missing = tiny_vit_pair()
    assert missing == []
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(images=x)["pred_logits"] - ref(x)).abs().max()
        feat_diff = (ours.forward_features(images=x)[0] - ref.forward_features(x)).abs().max()
    assert diff < 1e-4 and feat_diff < 1e-4


def test_matches_timm_at_another_image_size_through_resampled_positions():
    ref, ours, _ = tiny_vit_pair(dynamic_img_size=True)
    x = torch.randn(1, 3, 160, 128)
    with torch.no_grad():
        assert (ours(images=x)["pred_logits"] - ref(x)).abs().max() < 1e-4


def test_timm_checkpoint_named_in_params_is_loaded(tmp_path):
    """What a user does: save timm weights as safetensors, point model.image.timm_checkpoint at them."""
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                            in_chans=1, depth=2, embed_dim=64, num_heads=2).eval()
    path = tmp_path / "vit.safetensors"
    save_file(ref.state_dict(), path)
    cfg = ModelConfig(size="debug", image=ImageConfig(img_size=32, patch_size=8, in_chans=1, timm_checkpoint=str(path)))
    ours = build_task_model("image", cfg, 5).eval()
    REGISTRY["image"].pretrained(ours, cfg)  # as training does, before its first step
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert (ours(images=x)["pred_logits"] - ref(x)).abs().max() < 1e-5


def test_new_class_count_keeps_our_head_and_loads_the_rest():
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, patch_size=8,
                            in_chans=1, depth=2, embed_dim=64, num_heads=2)
    ours = build_task_model("image",
                            ModelConfig(size="debug", image=ImageConfig(img_size=32, patch_size=8)), 3)
    assert load_timm_vit(ours, ref.state_dict()) == ["head.fc.bias", "head.fc.weight"]
    assert torch.equal(ours.backbone.blocks[1].attn.qkv.weight, ref.blocks[1].attn.qkv.weight)


def test_mismatched_checkpoint_is_refused_with_the_fix():
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, in_chans=1,
                            depth=2, embed_dim=96, num_heads=2)
    ours = build_task_model("image",
                            ModelConfig(size="debug", image=ImageConfig(img_size=32, patch_size=8)), 3)
    with pytest.raises(UserError, match="model.size"):
        load_timm_vit(ours, ref.state_dict(), "vit96.safetensors")


def test_input_not_divisible_by_patch_is_a_clear_error():
    adapter = ImageAdapter(16, ImageConfig(img_size=32, patch_size=8, in_chans=1, augment=False), 0.0)
    with pytest.raises(UserError, match="patch_size=8"):
        adapter(torch.randn(1, 1, 30, 32))


def test_augmentation_moves_training_images_only():
    from tessera.modalities.image import random_affine

    images = torch.zeros(4, 1, 32, 32)
    images[:, :, 10:22, 12:20] = 1.0
    assert torch.allclose(random_affine(images, shift=0, degrees=0, scale=0), images, atol=1e-5)
    moved = random_affine(images)
    assert not torch.allclose(moved[0], images[0], atol=1e-2) and not torch.allclose(moved[0], moved[1], atol=1e-2)
    adapter = ImageAdapter(16, ImageConfig(img_size=32, patch_size=8, in_chans=1, augment=True), 0.0)
    adapter.eval()
    plain = ImageAdapter(16, ImageConfig(img_size=32, patch_size=8, in_chans=1, augment=False), 0.0)
    plain.load_state_dict(adapter.state_dict())
    assert torch.equal(adapter(images)[0], plain.eval()(images)[0])
    adapter.train()
    assert not torch.allclose(adapter(images)[0], plain(images)[0])


def test_detection_never_augments():
    from tessera.core.config import DetectionConfig

    with pytest.raises(Exception):
        DetectionConfig(augment=True)
    model = build_task_model("detection", ModelConfig(), 3)
    assert model.adapter.augment is False
