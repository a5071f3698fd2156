"""Image adapter, ViT-style (Dosovitskiy et al., 2021, arXiv:2010.11929).

Images [B, C, H, W] (normalised floats) -> non-overlapping p x p patches -> linear embedding -> a learnt [CLS]
token in front -> learnt 2-D position embeddings, bicubically resampled when H, W differ from `img_size`.
Parameter names are timm's, so a timm VisionTransformer state dict loads through `load_timm_vit`.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError
from torch import nn

from tessera.core.config import ImageConfig, ModelConfig
from tessera.core.data.batching import pixels_to_float
from tessera.core.data.files import BadSample, list_class_folders, list_flat_folder, open_binary
from tessera.core.errors import UserError
from tessera.core.modality import Modality, PrepareContext
from tessera.core.nn.backbone import Encoder
from tessera.core.nn.heads import LinearHead
from tessera.core.nn.task_model import TaskModel
from tessera.core.nn.weights import read_state_dict

SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})  # what image files end in

class PatchEmbed(nn.Module):
    """[B, C, H, W] -> ([B, N, D], grid (H/p, W/p)), N = H/p * W/p. Conv2d with kernel = stride = p."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise UserError(
                f"input of {H}x{W} is not a multiple of patch_size={self.patch_size}; "
                "resize it or pick a patch_size that divides it in params.yaml"
            )
        x = self.proj(x)  # [B, D, H/p, W/p]
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid  # NCHW -> NLC


def random_affine(images: torch.Tensor, shift: float = 0.1, degrees: float = 10.0, scale: float = 0.1) -> torch.Tensor:
    """Each image [B, C, H, W] moved by up to `shift` of its size, turned by up to `degrees`, scaled by 1 +- `scale`;
    edges repeat the border. Draws from torch's global RNG, so a resumed run draws the same."""
    B = len(images)
    angle = (torch.rand(B, device=images.device) * 2 - 1) * degrees * torch.pi / 180
    zoom = 1 + (torch.rand(B, device=images.device) * 2 - 1) * scale
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    move = (torch.rand(B, 2, device=images.device) * 2 - 1) * shift * 2  # affine_grid spans [-1, 1]
    theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], 1), torch.stack([sin, cos, move[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ImageAdapter(nn.Module):
    """forward(images [B, C, H, W]) -> (tokens [B, 1 + N, D], None). Images have no padding.

    augment: random affine jitter (`random_affine`) in training only.
    """

    def __init__(self, embed_dim: int, c: ImageConfig, drop_rate: float):
        super().__init__()
        self.augment = c.augment
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, embed_dim)
        self.grid_size = (c.img_size // c.patch_size, c.img_size // c.patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        if self.augment and self.training:
            images = random_affine(images)
        x, grid = self.patch_embed(images)
        pos = self.pos_embed
        if grid != self.grid_size:
            from timm.layers import resample_abs_pos_embed  # late: timm costs every process ~1.6 s CPU to import

            pos = resample_abs_pos_embed(pos, new_size=grid, old_size=self.grid_size, num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        return self.pos_drop(x), None


# timm key prefix -> ours, for a TaskModel of ImageAdapter + Encoder + LinearHead.
_TIMM_PREFIXES = {
    "patch_embed.": "adapter.patch_embed.",
    "cls_token": "adapter.cls_token",
    "pos_embed": "adapter.pos_embed",
    "blocks.": "backbone.blocks.",
    "norm.": "backbone.norm.",
    "head.": "head.fc.",
}


def load_timm_vit(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> list[str]:
    """Load a timm VisionTransformer state dict (vit_tiny_patch16_224, vit_base_patch16_224, ...) into `model`.

    The classifier weights are taken only when their shape matches (same number of classes); otherwise the
    model keeps its own head, as when fine-tuning on new classes. Positions are resampled when the grids
    differ. Returns the names of our parameters that were not loaded.
    """
    from timm.layers import resample_abs_pos_embed  # late, as in ImageAdapter.forward

    ours = model.state_dict()
    mapped = {}
    for key, value in state_dict.items():
        prefix = next((p for p in _TIMM_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise UserError(
                f"{source}: key {key!r} is not part of a plain ViT (cls-token pooling, no register tokens); "
                "export a timm VisionTransformer such as vit_base_patch16_224"
            )
        name = _TIMM_PREFIXES[prefix] + key[len(prefix):]
        if name not in ours:
            raise UserError(f"{source}: {key!r} has no counterpart in this model; is model.size the checkpoint's?")
        if name == "adapter.pos_embed" and value.shape != ours[name].shape:
            value = resample_abs_pos_embed(value, new_size=model.adapter.grid_size, num_prefix_tokens=1)
        if value.shape != ours[name].shape:
            if name.startswith("head."):
                continue
            raise UserError(
                f"{source}: {key!r} has shape {tuple(value.shape)}, this model expects {tuple(ours[name].shape)}; "
                "set model.size / model.image.patch_size / in_chans to the checkpoint's"
            )
        mapped[name] = value
    model.load_state_dict(mapped, strict=False)
    return sorted(set(ours) - set(mapped))


def timm_twin(size: str, img_size: int, patch_size: int, num_classes: int) -> tuple[TaskModel, nn.Module]:
    """Our RGB image classifier of model.size `size` and timm's VisionTransformer of the same shape, holding the same
    weights: the reference `tessera bench` measures against."""
    import timm  # late: only the benchmark builds timm's model

    cfg = ModelConfig(size=size, image=ImageConfig(img_size=img_size, patch_size=patch_size, in_chans=3, augment=False))
    b = cfg.backbone()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=patch_size,
                            num_classes=num_classes, embed_dim=b.embed_dim, depth=b.depth, num_heads=b.num_heads)
    ours = TaskModel(ImageAdapter(b.embed_dim, cfg.image, cfg.drop_rate), Encoder(b),
                     LinearHead(b.embed_dim, num_classes, cfg.pool, cfg.drop_rate))
    load_timm_vit(ours, ref.state_dict())
    return ours, ref


def open_header(fp: BinaryIO) -> ImageFile.ImageFile:
    """The image in `fp`, its header read and nothing decoded, by the first of Pillow's format plugins that takes it:
    Image.open's search, less its check against the process-wide `Image.MAX_IMAGE_PIXELS` (about 179 M pixels refused
    whatever the caller allows). `load_image` checks its own limit from the header instead, so prepare's and serve's
    limits are the ones that hold, and Pillow's setting, which guards the rest of the process, is never changed."""
    Image.init()  # every format plugin registered (once)
    prefix = fp.read(16)
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        taken = not accept or accept(prefix)
        if not taken or isinstance(taken, str):  # a string: "looks like this format, but unsupported"
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes for "not this format"
            continue
    raise UnidentifiedImageError("cannot identify image file")


def eight_bit(im: Image.Image) -> Image.Image:
    """Greyscale deeper than 8 bits -> "L", value >> 8 (65535 -> 255, 257 -> 1): the top byte, as Pillow itself reads
    a 16-bit RGB PNG. Pillow's convert("L") would clip at 255 instead, so all but the darkest 1/256 of the range
    came out white. Modes "I;16*" (16-bit PNGs and TIFFs) and "I" (32-bit integers: a TIFF, or a 16-bit PNG as
    Pillow before 10 read it) are taken to hold 16-bit values; one outside 0..65535 counts as the nearest end.
    Any other mode is returned as it is."""
    if im.mode != "I" and not im.mode.startswith("I;16"):
        return im
    values = np.asarray(im).clip(0, 65535)  # [H, W]
    return Image.fromarray((values >> 8).astype(np.uint8))  # uint8 [H, W]: mode "L"


def load_image(source: Path | bytes, img_size: int, in_chans: int, max_pixels: int,
               expect_size: tuple[int, int] | None = None, key: str = "prepare.max_image_pixels") -> np.ndarray:
    """A file or its bytes -> uint8 [C, img_size, img_size] (grey for in_chans=1, RGB for 3), resized bicubically;
    16-bit samples are scaled to 8 bits (`eight_bit`), not clipped.

    expect_size: (width, height) the dataset declares for the file; a different size is a bad sample. An image of
    more than `max_pixels` (set by params key `key`) is refused from its header, before decoding (a 20000 x 20000
    PNG of a few KB would take 1.2 GB).
    """
    try:
        with open_binary(source) as f, open_header(f) as im:
            if im.size[0] * im.size[1] > max_pixels:
                raise BadSample(f"image of {im.size[0]} x {im.size[1]} pixels exceeds {key} ({max_pixels:,}); "
                                "resize it, or raise the limit")
            if expect_size and im.size != tuple(expect_size):
                raise BadSample(f"image is {im.size[0]} x {im.size[1]}, the annotations say {expect_size[0]} x {expect_size[1]}")
            im = eight_bit(im).convert("L" if in_chans == 1 else "RGB").resize((img_size, img_size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSample(f"not a readable image ({type(e).__name__}: {e})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# -- what the rest of Tessera knows about images (core/modality.py); detection reuses the reading and the contract

def contract(c: ImageConfig) -> list[dict]:
    return [{"name": "images", "dtype": "uint8", "shape": ["batch", c.in_chans, c.img_size, c.img_size],
             "meaning": f"pixels 0-255, {'grey' if c.in_chans == 1 else 'RGB'}, resized to {c.img_size}x{c.img_size}"}]


def example(c: ImageConfig, batch: int) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (batch, c.in_chans, c.img_size, c.img_size), dtype=torch.uint8, generator=g),)


def from_inputs(images: torch.Tensor) -> dict:
    return {"images": pixels_to_float(images)}


def _loader(ctx: PrepareContext):
    c, p = ctx.params.model.image, ctx.params.prepare
    return lambda e: {"image": load_image(e.path, c.img_size, c.in_chans, p.max_image_pixels)}


def _collate(batch: dict) -> tuple[dict, torch.Tensor]:
    return {"images": batch["image"]}, batch["label"]


def _pretrained(model: nn.Module, cfg: ModelConfig) -> None:
    if cfg.image.timm_checkpoint:
        load_timm_vit(model, read_state_dict(cfg.image.timm_checkpoint), cfg.image.timm_checkpoint)


MODALITY = Modality(
    name="image",
    formats=("imagefolder",),
    list_source=lambda src, path, params: list_class_folders(Path(path)),
    list_unlabelled=lambda src, path, params: list_flat_folder(Path(path), "image"),
    prepare_keys=("model.image.img_size", "model.image.in_chans", "prepare.max_image_pixels"),
    loader=_loader,
    collate=_collate,
    adapter=lambda cfg: ImageAdapter(cfg.backbone().embed_dim, cfg.image, cfg.drop_rate),
    pretrained=_pretrained,
    inputs=lambda cfg: contract(cfg.image),
    to_inputs=lambda x: (x["images"],),
    from_inputs=lambda cfg, args: from_inputs(*args),
    example=lambda cfg, batch: example(cfg.image, batch),
)
