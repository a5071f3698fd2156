"""params.yaml -> typed config, parsed once at the edge.

Every field's name is the constructor keyword and the params.yaml key. Unknown keys, wrong types and
inconsistent values stop with a `UserError` that names the file, the key and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from core.backbone import SIZES, BackboneConfig
from core.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageConfig(_Section):
    img_size: int = 16  # pixels, square; other sizes run with resampled position embeddings
    patch_size: int = 4
    in_chans: int = 1
    timm_checkpoint: str | None = None  # a timm VisionTransformer state dict (.safetensors / .pth) to start from
    augment: bool = True  # random shift / rotation / scale in training (never for detection, whose boxes it would move)

    @model_validator(mode="after")
    def _divides(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        return self


class TextConfig(_Section):
    vocab_size: int = 1000
    max_len: int = 64  # tokens, without [CLS]
    tokenizer: str | None = None  # a user's tokenizer.json; empty: trained on the training corpus


class AudioConfig(_Section):
    sample_rate: int = 16000  # Hz; inputs at other rates are resampled
    n_mels: int = 64
    n_fft: int = 400  # samples
    hop_length: int = 160  # samples between frames
    patch_size: int = 16
    max_frames: int = 1024  # longest clip with its own time positions; longer clips stretch them
    freq_mask: int = 8  # SpecAugment: widest frequency mask, mel bins
    time_mask: int = 16  # SpecAugment: widest time mask, frames

    @model_validator(mode="after")
    def _divides(self):
        if self.n_mels % self.patch_size:
            raise ValueError(f"n_mels={self.n_mels} must be a multiple of patch_size={self.patch_size}")
        return self


class DetectionConfig(ImageConfig):
    augment: Literal[False] = False
    img_size: int = 64
    patch_size: int = 8
    num_queries: int = 10
    decoder_depth: int = 2
    eos_coef: float = 0.1  # weight of the no-object class in the classification loss
    cost_class: float = 1.0  # matcher costs
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    loss_ce: float = 1.0  # loss weights
    loss_bbox: float = 5.0
    loss_giou: float = 2.0

    @model_validator(mode="after")
    def _queries(self):
        patches = (self.img_size // self.patch_size) ** 2
        if not 1 <= self.num_queries <= patches:
            raise ValueError(f"num_queries={self.num_queries} must lie in 1..{patches}: queries are chosen "
                             f"among the {patches} patches of a {self.img_size} px image")
        return self


class ModelConfig(_Section):
    size: Literal["debug", "tiny", "small", "base"] = "debug"
    embed_dim: int | None = None  # None: the size's
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    pool: Literal["cls", "mean"] = "cls"
    proj_dim: int = 128  # contrastive embedding width
    image: ImageConfig = ImageConfig()
    text: TextConfig = TextConfig()
    audio: AudioConfig = AudioConfig()
    detection: DetectionConfig = DetectionConfig()

    @model_validator(mode="after")
    def _heads_divide(self):
        b = self.backbone()
        if b.embed_dim % b.num_heads:
            raise ValueError(f"embed_dim={b.embed_dim} must be a multiple of num_heads={b.num_heads}")
        return self

    def backbone(self) -> BackboneConfig:
        embed_dim, depth, num_heads = SIZES[self.size]
        return BackboneConfig(
            embed_dim=self.embed_dim or embed_dim,
            depth=self.depth or depth,
            num_heads=self.num_heads or num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            drop_rate=self.drop_rate,
            attn_drop_rate=self.attn_drop_rate,
            drop_path_rate=self.drop_path_rate,
        )


class GenerateParams(_Section):
    """The embedded default dataset (core/digits.py); the defaults are the dataset the README's figures use."""

    seed: int = 0
    out: str = "data/raw"  # where the default dataset is written
    languages: list[str] = ["en", "de", "fr", "es", "it", "nl"]  # spoken digits and sentences
    train_voices: list[str] = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+f1", "+f2", "+f3", "+klatt", "+croak", "+whisper"]
    test_voices: list[str] = ["+m6", "+f4", "+klatt2", "+m7"]  # eSpeak NG voice variants heard only in the test split
    audio_takes: int = 2  # renditions per (voice, language, digit) in train
    text_per_split: tuple[int, int] = (3000, 600)  # sentences (train, test)
    detection_per_split: tuple[int, int] = (4000, 300)  # canvases (train, test): fresh layouts, not repeats, feed detection
    canvas_size: int = 64  # detection canvases, pixels
    image_test_fraction: float = 0.2  # scans held out for the image test split, stratified by digit


FORMATS = {"image": ("imagefolder",), "audio": ("manifest", "folder"), "text": ("jsonl", "csv"), "detection": ("coco",)}


class SourceConfig(_Section):
    """One modality's data: a train source, and a test source or none (then a hash-chosen share is held out)."""

    format: str  # image: imagefolder; audio: manifest | folder; text: jsonl | csv; detection: coco
    train: str  # a folder (imagefolder, folder) or a file (manifest .csv/.jsonl, jsonl, csv, coco .json)
    test: str | None = None
    images: str | None = None  # coco: the folder its file_names are relative to (default: the JSON's folder)


class PrepareConfig(_Section):
    # The folder that holds every source: dvc.yaml's prepare stage depends on it, so DVC hashes your data and reruns
    # prepare (and what follows) when a file in it is edited, added or removed. `dvc add` it to version it.
    root: str = "data/raw"
    out: str = "data/prepared"
    shard_size: int = 1024  # samples per shard: the most samples held in memory at once
    val_fraction: float = 0.1  # share of train held out for validation, chosen by content hash
    test_fraction: float = 0.2  # share of train held out for test where a source has no test set
    metrics: str = "metrics/prepare.json"
    sources: dict[Literal["image", "audio", "text", "detection"], SourceConfig] = {}
    # What one sample may cost, checked from its header before it is decoded; beyond it, the sample is quarantined.
    max_image_pixels: int = 40_000_000  # width x height (a 20000 x 20000 PNG of a few KB would take 1.2 GB)
    max_audio_seconds: float = 60.0  # duration of one clip
    audio_rates: tuple[int, int] = (4000, 192000)  # Hz: the sample rates accepted (a header may claim 1 Hz)

    @model_validator(mode="after")
    def _formats(self):
        for modality, src in self.sources.items():
            if src.format not in FORMATS[modality]:
                raise ValueError(f"sources.{modality}.format={src.format!r} is not one of {FORMATS[modality]}")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction and test_fraction must lie in [0, 1) and sum to less than 1")
        root = Path(self.root).resolve()
        for modality, src in self.sources.items():
            for key in ("train", "test", "images"):
                path = getattr(src, key)
                if path is not None and not Path(path).resolve().is_relative_to(root):
                    raise ValueError(f"sources.{modality}.{key}={path!r} lies outside prepare.root={self.root!r}: DVC "
                                     "tracks prepare.root as the data the prepare stage reads, so move the data under "
                                     "it, or point root at a folder that holds every source")
        for name in ("max_image_pixels", "max_audio_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.audio_rates[0] <= self.audio_rates[1]:
            raise ValueError(f"audio_rates must be a [low, high] range of Hz, got {list(self.audio_rates)}")
        return self


class TrainConfig(_Section):
    tasks: list[Literal["image", "audio", "text", "detection"]] = ["image", "audio", "text", "detection"]
    align: list[Literal["image", "audio", "text"]] = ["audio", "image"]  # contrastive pair; [] for none
    weights: dict[str, float] = {}  # loss weight per task (image, audio, text, detection, align); default 1
    schedule: Literal["round_robin", "proportional", "temperature"] = "round_robin"
    temperature: float = 2.0  # temperature schedule: p(task) ~ train_size ** (1 / temperature)
    epochs: float = 13  # an epoch: as many steps as the tasks' training batches add up to
    batch_size: int = 64  # global samples per step (split over ranks); align draws one pair per sample
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max gradient norm; 0: off
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False  # torch.compile each encoder block
    parallel: Literal["ddp", "fsdp"] = "ddp"
    num_workers: int | None = None  # DataLoader workers per rank; None: 0 on CPU, up to 4 per GPU
    eval_every: int = 200  # steps between validation, checkpoint and early-stopping checks
    patience: int = 10  # validations without improvement before stopping
    keep_last: int = 3  # checkpoints kept besides the best
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (bitwise-repeatable runs; slower on GPU)
    out: str = "models/train"
    metrics: str = "metrics/train.json"

    @model_validator(mode="after")
    def _check(self):
        if self.align and (len(self.align) != 2 or self.align[0] == self.align[1]):
            raise ValueError(f"align must name two different modalities, got {self.align}")
        unknown = set(self.weights) - set(self.tasks) - ({"align"} if self.align else set())
        if unknown:
            raise ValueError(f"weights name tasks that are not trained: {sorted(unknown)}")
        for name in ("epochs", "batch_size", "grad_accum", "lr", "eval_every", "patience", "keep_last"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay, warmup_steps and grad_clip must not be negative")
        return self


class EvaluateConfig(_Section):
    split: Literal["val", "test"] = "test"
    batch_size: int = 256
    pr_points: int = 101  # points on each precision-recall curve
    out: str = "reports"  # eval.md, PNG figures, and plots/ for `dvc plots`
    metrics: str = "metrics/eval.json"


class ExportConfig(_Section):
    out: str = "models/export"  # one folder per task: model.onnx, model.pt2, model.safetensors, config.json
    opset: int = 18
    parity_samples: int = 64  # held-out samples each artifact is checked on against the eager model
    atol: float = 1e-4  # the largest max-abs output difference that passes
    metrics: str = "metrics/export.json"


class Schedule(_Section):
    """When a served deployment runs: a cron line or an interval in seconds (one of the two)."""

    cron: str | None = None
    interval: float | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give a schedule either `cron` (e.g. \"0 2 * * *\") or `interval` (seconds), not both")
        return self


class OrchestrateConfig(_Section):
    nproc_per_node: int = 1  # training processes on this machine (one per GPU)
    train_retries: int = 1  # restarts of a crashed training, each resuming from its last checkpoint
    schedules: dict[Literal["pipeline", "generate", "prepare", "train", "evaluate", "export"], Schedule] = {}


class Params(_Section):
    model: ModelConfig = ModelConfig()
    generate: GenerateParams = GenerateParams()
    prepare: PrepareConfig = PrepareConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    orchestrate: OrchestrateConfig = OrchestrateConfig()

    @model_validator(mode="after")
    def _root_apart_from_generated(self):
        root, generated = Path(self.prepare.root).resolve(), Path(self.generate.out).resolve()
        if root != generated and root.is_relative_to(generated):
            raise ValueError(f"prepare.root={self.prepare.root!r} lies inside generate.out={self.generate.out!r}, which "
                             "the generate stage rewrites whole: keep your data in a folder of its own")
        return self

    def uses_default_data(self) -> bool:
        """Whether any source reads the embedded default dataset (generate.out): only then is it generated."""
        out = Path(self.generate.out).resolve()
        return any(Path(path).resolve().is_relative_to(out) for src in self.prepare.sources.values()
                   for path in (src.train, src.test, src.images) if path is not None)


FIELDS = {f for section in (ModelConfig, ImageConfig, TextConfig, AudioConfig, DetectionConfig, GenerateParams,
                             SourceConfig, PrepareConfig, TrainConfig, EvaluateConfig, ExportConfig, Schedule,
                             OrchestrateConfig) for f in section.model_fields}


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = [str(p) for p in err["loc"]]
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err['input']!r})"
            if err["type"] == "extra_forbidden":
                msg = "not a known key: check its spelling against the README's params table, or remove it"
            elif err["type"] == "value_error":  # a check across a section's keys: it names the key first ("lr must...")
                first = msg.split()[0].split("=")[0].split(".")
                loc += first if first[-1] in FIELDS and first[-1] not in loc else []
                got = ""  # the input is the whole section; the message has the values
            lines.append(f"{source}: {'.'.join(loc) or '(top level)'}: {msg}{got}")
        raise UserError("\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; run from the repository root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    return parse_params(raw, str(path))
