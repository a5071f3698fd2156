"""params.yaml -> typed config, parsed once at the edge.

Every field's name is the constructor keyword and the params.yaml key. Unknown keys, wrong types and
inconsistent values stop with a `UserError` that names the file, the key and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      ValidationError, model_validator)

from tessera.core.errors import UserError
from tessera.core.nn import BackboneConfig

# Named backbone flavours: (embed_dim, depth, num_heads), as timm's ViTs. debug is the size the CPU tests use.
SIZES: dict[str, tuple[int, int, int]] = {
    "debug": (64, 2, 2),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}


# A value's bounds live in its type: pydantic checks them, and parse_params names the key ("must be greater than 0").
Fraction = Annotated[float, Field(ge=0, lt=1)]  # a share of something, never all of it
Probability = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    # A docstring under a field is its meaning: `tessera params` lists it beside the key, type and default.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ModalityConfig(_Section):
    """A modality's section of `model`: each field of ModelConfig of this type names a modality (modalities/)."""


class ImageConfig(ModalityConfig):
    img_size: PositiveInt = 16
    """Pixels, square; other sizes run with resampled position embeddings"""
    patch_size: PositiveInt = 4
    """Pixels per side of a square patch (one token); divides img_size"""
    in_chans: PositiveInt = 1
    """1: grey, 3: RGB"""
    timm_checkpoint: str | None = None
    """A timm VisionTransformer state dict (.safetensors / .pth) to start from"""
    augment: bool = True
    """Random shift / rotation / scale in training (never for detection, whose boxes it would move)"""

    @model_validator(mode="after")
    def _divides(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        return self


class TextConfig(ModalityConfig):
    vocab_size: PositiveInt = 1000
    """At most; training sets it to the tokenizer's"""
    max_len: PositiveInt = 64
    """Tokens, without [CLS]"""
    tokenizer: str | None = None
    """A user's tokenizer.json; empty: trained on the training corpus"""


class AudioConfig(ModalityConfig):
    sample_rate: PositiveInt = 16000
    """Hz; inputs at other rates are resampled"""
    n_mels: PositiveInt = 64
    """Mel bands of the log-mel spectrogram; a multiple of patch_size"""
    n_fft: PositiveInt = 400
    """Samples"""
    hop_length: PositiveInt = 160
    """Samples between frames"""
    patch_size: PositiveInt = 16
    """Mel bands and frames per side of a square spectrogram patch (one token)"""
    max_frames: PositiveInt = 1024
    """Longest clip with its own time positions; longer clips stretch them"""
    freq_mask: NonNegativeInt = 8
    """SpecAugment: widest frequency mask, mel bins"""
    time_mask: NonNegativeInt = 16
    """SpecAugment: widest time mask, frames"""
    norm_mean: float = 0.0
    """Log-mel mean of the training set: training fills it in from the prepared data"""
    norm_std: float = 1.0
    """Log-mel standard deviation of the training set: filled in like norm_mean"""

    @model_validator(mode="after")
    def _divides(self):
        if self.n_mels % self.patch_size:
            raise ValueError(f"n_mels={self.n_mels} must be a multiple of patch_size={self.patch_size}")
        return self


class DetectionConfig(ImageConfig):
    augment: Literal[False] = False
    """Always off: moving the image would move its boxes"""
    img_size: PositiveInt = 64
    """Pixels, square: canvases are resized to it"""
    patch_size: PositiveInt = 8
    """Pixels per side of a square patch (one token)"""
    num_queries: int = 10
    """Boxes predicted per image (object queries)"""
    decoder_depth: PositiveInt = 2
    """Decoder blocks; each refines the previous one's boxes"""
    eos_coef: float = 0.1
    """Weight of the no-object class in the classification loss"""
    cost_class: float = 1.0
    """Hungarian matcher: weight of the class probability"""
    cost_bbox: float = 5.0
    """Hungarian matcher: weight of the L1 box distance"""
    cost_giou: float = 2.0
    """Hungarian matcher: weight of the generalised IoU"""
    loss_ce: float = 1.0
    """Loss weight of the classification"""
    loss_bbox: float = 5.0
    """Loss weight of the L1 box distance"""
    loss_giou: float = 2.0
    """Loss weight of the generalised IoU"""

    @model_validator(mode="after")
    def _queries(self):
        patches = (self.img_size // self.patch_size) ** 2
        if not 1 <= self.num_queries <= patches:
            raise ValueError(f"num_queries={self.num_queries} must lie in 1..{patches}: queries are chosen "
                             f"among the {patches} patches of a {self.img_size} px image")
        return self


class TabularConfig(ModalityConfig):
    """FT-Transformer features (Gorishniy et al., 2021, arXiv:2106.11959) from CSV, JSONL or Parquet tables."""

    label: str = "label"
    """The column holding each row's target: its class, or (kind: regression) the number to predict"""
    kind: Literal["classification", "regression"] = "classification"
    """What the table's task is: classes to tell apart, or a number to predict (R², MAE, RMSE)"""
    numeric: list[str] | None = None
    """Numeric feature columns; None: inferred (both None: the columns whose values are numbers; else every column
    `categorical` leaves)"""
    categorical: list[str] | None = None
    """Categorical feature columns; None: every column `numeric` leaves"""
    # Found by prepare (columns.json beside the shards), filled in when training builds the model (leave them out):
    categories: dict[str, list[str]] = {}
    """Each categorical column's values, in index order"""
    mean: list[float] = []
    """Each numeric column's mean, for standardising"""
    std: list[float] = []
    """Each numeric column's standard deviation"""


class ModelConfig(_Section):
    size: Literal["debug", "tiny", "small", "base"] = "debug"
    """Backbone flavour (width, depth, heads): debug 64/2/2, tiny 192/12/3, small 384/12/6, base 768/12/12"""
    embed_dim: int | None = None
    """None: the size's"""
    depth: int | None = None
    """None: the size's"""
    num_heads: int | None = None
    """None: the size's"""
    mlp_ratio: PositiveFloat = 4.0
    """MLP hidden width = mlp_ratio x embed_dim"""
    qkv_bias: bool = True
    """A bias in the attention's query, key and value projection"""
    drop_rate: Fraction = 0.0
    """Dropout after embeddings, attention and MLP projections, and before the classifier"""
    attn_drop_rate: Fraction = 0.0
    """Dropout on attention probabilities"""
    drop_path_rate: Fraction = 0.0
    """Stochastic depth, rising linearly to this at the last block"""
    pool: Literal["cls", "mean"] = "cls"
    """What a head reads: the [CLS] token, or the mean of the other tokens"""
    proj_dim: PositiveInt = 128
    """Contrastive embedding width"""
    image: ImageConfig = ImageConfig()
    """Image classification (ViT patches)"""
    text: TextConfig = TextConfig()
    """Text classification (byte-level BPE tokens)"""
    audio: AudioConfig = AudioConfig()
    """Audio classification (AST log-mel patches)"""
    detection: DetectionConfig = DetectionConfig()
    """Object detection (DETR-style, on image patches)"""
    tabular: TabularConfig = TabularConfig()
    """Table classification or regression (FT-Transformer feature tokens)"""
    inputs: dict[str, dict[str, Any]] = {}
    """A records input's own settings over its modality's section: `<source>.<input>` -> {key: value}, e.g. `scenes.image: {augment: false}` (prepared and built with them; the modality's own task keeps the section); a source not declared is ignored"""
    # Found by prepare (meta.json's target_stats), filled in when training builds the model (leave it out):
    targets: dict[str, dict[str, list[float]]] = {}
    """Each regression task's target mean and std on the training split, for standardising"""

    @model_validator(mode="after")
    def _heads_divide(self):
        b = self.backbone()
        if b.embed_dim % b.num_heads:
            raise ValueError(f"embed_dim={b.embed_dim} must be a multiple of num_heads={b.num_heads}")
        return self

    def for_input(self, ref: str, modality: str) -> ModelConfig:
        """This config with `modality`'s section as records input `ref` (`<source>.<input>`) has it: the section
        with the input's settings from `inputs` over it."""
        own = self.inputs.get(ref)
        if not own:
            return self
        section = getattr(self, modality)
        unknown = sorted(set(own) - set(type(section).model_fields))
        if unknown:
            raise UserError(f"params.yaml: model.inputs.{ref} sets {unknown}, which model.{modality} (the section of "
                            f"a {modality} input) does not have; its keys: {sorted(type(section).model_fields)}")
        try:
            merged = type(section).model_validate({**section.model_dump(), **own})
        except ValidationError as e:
            raise UserError(f"params.yaml: model.inputs.{ref}: {e.errors()[0]['msg']} "
                            f"({'.'.join(map(str, e.errors()[0]['loc']))})") from None
        return self.model_copy(update={modality: merged})

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


# The modalities params.yaml may name: ModelConfig's modality sections (each one is modalities/<name>/).
MODALITIES = tuple(name for name, f in ModelConfig.model_fields.items()
                   if isinstance(f.annotation, type) and issubclass(f.annotation, ModalityConfig))


class GenerateParams(_Section):
    """The embedded default dataset (core/data/digits.py); the defaults are the dataset the README's figures use."""

    seed: int = 0
    """Seed of every random choice in the default dataset"""
    out: str = "data/raw"
    """Where the default dataset is written"""
    languages: list[str] = ["en", "de", "fr", "es", "it", "nl"]
    """Spoken digits and sentences"""
    train_voices: list[str] = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+f1", "+f2", "+f3", "+klatt", "+croak", "+whisper"]
    """eSpeak NG voice variants of the train split's spoken digits"""
    test_voices: list[str] = ["+m6", "+f4", "+klatt2", "+m7"]
    """ESpeak NG voice variants heard only in the test split"""
    audio_takes: PositiveInt = 2
    """Renditions per (voice, language, digit) in train"""
    text_per_split: tuple[int, int] = (3000, 600)
    """Sentences (train, test)"""
    detection_per_split: tuple[int, int] = (4000, 300)
    """Canvases (train, test): fresh layouts, not repeats, feed detection"""
    canvas_size: PositiveInt = 64
    """Detection canvases, pixels"""
    image_test_fraction: Fraction = 0.2
    """Scans held out for the image test split, stratified by digit"""
    records_per_split: tuple[int, int] = (3000, 600)
    """Records (train, test): a 2 x 2 grid of 1-4 distinct digits' scans, its caption and the caption spoken; target the digits' sum"""


RECORDS = "records"  # the format of a table of records: one sample, several modalities (core/stages/prepare.py)
COLUMN_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a records column is prepared into a folder of its name


class SourceConfig(_Section):
    """One modality's data: a train source, and a test source or none (then a hash-chosen share is held out)."""

    format: str
    """Image: imagefolder; audio: manifest | folder; text: jsonl | csv; detection: coco; tabular: table; records (a source of any name): a table of samples whose columns are inputs of several modalities"""
    train: str
    """A folder (imagefolder, folder) or a file (manifest .csv/.jsonl, jsonl, csv, coco .json, table, records)"""
    test: str | None = None
    """The test split's source in the same format; none: a hash-chosen share of train"""
    images: str | None = None
    """Coco: the folder its file_names are relative to (default: the JSON's folder)"""
    columns: dict[str, str] | None = None
    """Records: column -> image | audio | text | numeric | categorical (paths relative to the table); None: inferred from the training table (paths by suffix, numbers numeric, short repeated strings categorical, the rest text)"""
    target: str | None = None
    """Records: the column holding each record's class"""
    unlabelled: str | None = None
    """Inputs without labels for pretraining alone, in the source's format less its labels: a folder of files with no class folders (imagefolder, folder), a manifest, JSONL, CSV or table without the label column; prepared into its own split (`unlabelled`), never trained or evaluated on"""

    @model_validator(mode="after")
    def _records_keys(self):
        if self.format == RECORDS and not self.target:
            raise ValueError("target must name the column holding each record's class (format: records)")
        if self.format != RECORDS and (self.columns is not None or self.target is not None):
            raise ValueError(f"columns and target are keys of a records source, not of format {self.format!r}; "
                             "remove them, or set format: records")
        for column in self.columns or {}:
            if not COLUMN_NAME.fullmatch(column):
                raise ValueError(f"columns names {column!r}: a column of a records source is prepared into a folder "
                                 "of its name, so use letters, digits, _ and - (rename it in the table)")
        if self.target in (self.columns or {}):
            raise ValueError(f"columns names the target {self.target!r}; the target is no input: remove it from columns")
        if self.format == RECORDS and self.unlabelled is not None:
            raise ValueError("unlabelled: a records source has no unlabelled form yet (pretraining reads records' "
                             "training inputs only); remove the key, or declare unlabelled files beside a modality's "
                             "own source")
        return self


class InputLimitsConfig(_Section):
    """What one input may cost, checked from its header before it is decoded: prepare quarantines a sample beyond
    a limit, `tessera serve` answers 422. One declaration, so that the keys mean the same in both sections."""

    max_image_pixels: PositiveInt = 40_000_000
    """Width x height of one image (a 20000 x 20000 PNG of a few KB would take 1.2 GB); beyond: quarantined by
    prepare, 422 from serve"""
    max_audio_seconds: PositiveFloat = 60.0
    """Duration of one audio clip, seconds; beyond: quarantined by prepare, 422 from serve"""
    audio_rates: tuple[int, int] = (4000, 192000)
    """Hz: the sample rates accepted (a header may claim 1 Hz); outside: quarantined by prepare, 422 from serve"""

    @model_validator(mode="after")
    def _rates(self):
        if not 0 < self.audio_rates[0] <= self.audio_rates[1]:
            raise ValueError(f"audio_rates must be a [low, high] range of Hz, got {list(self.audio_rates)}")
        return self


class PrepareConfig(InputLimitsConfig):
    root: str = "data/raw"
    """The folder that holds every source: dvc.yaml's prepare stage depends on it, so DVC reruns prepare (and what follows) when a file in it is edited, added or removed; `dvc add` it to version it"""
    out: str = "data/prepared"
    """Where shards, meta.json and quarantine.jsonl go"""
    shard_size: PositiveInt = 1024
    """Samples per shard: the most samples held in memory at once"""
    workers: int | None = None
    """Processes that decode images and audio; None: one per core"""
    val_fraction: Fraction = 0.1
    """Share of train held out for validation, chosen by content hash"""
    test_fraction: Fraction = 0.2
    """Share of train held out for test where a source has no test set"""
    metrics: str = "metrics/prepare.json"
    """Samples in, prepared and quarantined, per modality and split (JSON)"""
    sources: dict[str, SourceConfig] = {}
    """Modality -> its data; or a name of your own -> a records table (format: records)"""

    @model_validator(mode="after")
    def _formats(self):
        for modality, src in self.sources.items():
            if src.format == RECORDS and modality in MODALITIES:
                raise ValueError(f"sources.{modality} is a records source named like a modality; give it a name of "
                                 f"its own (its prepared folder would be the modality's)")
            if src.format != RECORDS and modality not in MODALITIES:
                raise ValueError(f"sources.{modality} is not a modality; known: {list(MODALITIES)} (or set its "
                                 "format: records for a table of records)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction} must sum to "
                             "less than 1: the rest is the training split")
        root = Path(self.root).resolve()
        for modality, src in self.sources.items():
            for key in ("train", "test", "images", "unlabelled"):
                path = getattr(src, key)
                if path is not None and not Path(path).resolve().is_relative_to(root):
                    raise ValueError(f"sources.{modality}.{key}={path!r} lies outside prepare.root={self.root!r}: DVC "
                                     "tracks prepare.root as the data the prepare stage reads, so move the data under "
                                     "it, or point root at a folder that holds every source")
        return self


class TrainConfig(_Section):
    tasks: list[str] | None = None
    """Tasks to train: a modality (its own task), or a records source (its fused classification task over the
    record's inputs); None: every modality in prepare.sources"""
    align: list[str] = []
    """Two modalities aligned contrastively, paired by label, as the contrastive task `align`; [] for none (the
    top-level `tasks` mapping says the same, and more: several pairs, pairs by sample)"""
    weights: dict[str, float] = {}
    """Loss weight per task, by its name (image, detection, a records source, a contrastive task); default 1"""
    modality_dropout: dict[str, dict[str, Probability]] = {}
    """Fused task (a records source) -> input (its column, or `table` for the numeric and categorical ones) ->
    probability that training hides it from a sample (modality dropout), so the task learns to answer without it;
    default 0"""
    schedule: Literal["round_robin", "proportional", "temperature"] = "round_robin"
    """Which task each step trains: in turn, in proportion to training set size, or by temperature"""
    temperature: PositiveFloat = 2.0
    """Temperature schedule: p(task) ~ train_size ** (1 / temperature)"""
    epochs: PositiveFloat = 16
    """An epoch: as many steps as the tasks' training batches add up to"""
    shuffle_buffer: PositiveInt = 16384
    """Samples shuffled together: each epoch takes the shards in a random order, then shuffles each run of this many
    samples (memory holds the shards of a batch's window, however large the dataset)"""
    batch_size: PositiveInt = 64
    """Global samples per step (split over ranks); align draws one pair per sample"""
    grad_accum: PositiveInt = 1
    """Micro-batches per optimizer step"""
    lr: PositiveFloat = 1e-3
    """Peak AdamW learning rate, after warmup; cosine decay to 0"""
    weight_decay: NonNegativeFloat = 0.05
    """AdamW weight decay, on Linear / Conv weights only"""
    warmup_steps: NonNegativeInt = 100
    """Linear learning-rate warmup, optimizer steps"""
    grad_clip: NonNegativeFloat = 1.0
    """Max gradient norm; 0: off"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Auto: bf16 autocast on GPU, fp32 on CPU"""
    compile: bool = False
    """Torch.compile each encoder block"""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Over several processes: DDP (replicated) or FSDP2 (sharded) parameters"""
    num_workers: int | None = None
    """DataLoader workers per rank; None: 0 on CPU, up to 4 per GPU"""
    eval_every: PositiveInt = 200
    """Steps between validation, checkpoint and early-stopping checks"""
    patience: PositiveInt = 10
    """Validations without improvement before stopping"""
    keep_last: PositiveInt = 3
    """Checkpoints kept besides the best"""
    seed: int = 0
    """Initial weights, batch order and task schedule"""
    deterministic: bool = False
    """Deterministic kernels (bitwise-repeatable runs; slower on GPU)"""
    out: str = "models/train"
    """Checkpoints, DVCLive logs, and the final model.safetensors + model.json"""
    metrics: str = "metrics/train.json"
    """Test and validation metrics of the best checkpoint (JSON)"""

    @model_validator(mode="after")
    def _check(self):
        for name in self.align:  # tasks may name records sources too: Params checks them against prepare.sources
            if name not in MODALITIES:
                raise ValueError(f"align names modalities, and {name!r} is none; known: {list(MODALITIES)}")
        if self.align and (len(self.align) != 2 or self.align[0] == self.align[1]):
            raise ValueError(f"align must name two different modalities, got {self.align}")
        return self


class PretrainConfig(_Section):
    enabled: bool = False
    """Pretrain the adapters and the backbone on the tasks' training inputs, labels unused (masked prediction,
    core/nn/pretrain.py), and start `train` from them; false: `tessera pretrain` writes only that it is off"""
    steps: PositiveInt = 1000
    """Optimizer steps, each one task's batch of train.batch_size, the tasks taken as train.schedule says"""
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.6
    """Share of each sample's real tokens (its [CLS] aside) hidden from the student, whose targets they are"""
    teacher_decay: Fraction = 0.9998
    """EMA decay of the teacher after each step: teacher <- decay * teacher + (1 - decay) * student"""
    decoder_depth: PositiveInt = 1
    """Blocks of the light decoder that predicts the teacher's states at the masked positions (discarded after)"""
    lr: PositiveFloat = 1e-3
    """Peak AdamW learning rate, after train.warmup_steps; cosine decay to 0"""
    out: str = "models/pretrain"
    """Checkpoints, and the pretrained adapters and backbone: model.safetensors + pretrain.json"""
    metrics: str = "metrics/pretrain.json"
    """Steps, seconds and the masked-prediction loss at the start and the end (JSON)"""


CONTRASTIVE = "contrastive"
TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")  # metric keys are <task>.<metric>, exported folders <task>_<side>


class TaskConfig(_Section):
    """One task: what it learns (kind), from which inputs, towards which target."""

    kind: str | None = None
    """Classification, regression, detection (core/kinds/, a modality's own), or contrastive (two inputs embedded so that a sample's two sides lie close); None: its input's own kind (a modality's task, a records source's classification)"""
    inputs: list[str]
    """What the task reads: one modality (its own dataset) or one records source (every input of its records, fused); a contrastive task: two modalities (paired by label), or two inputs `<source>.<input>` of one records source (paired by sample: a record's image with its own caption)"""
    target: str | None = None
    """The column holding the target: its source's (prepare.sources.<source>.target; a modality's label) and no other yet; a contrastive task has none (each pair is its own target)"""


class EvaluateConfig(_Section):
    split: Literal["val", "test"] = "test"
    """The held-out split reported"""
    batch_size: PositiveInt = 256
    """Samples per forward pass"""
    pr_points: Annotated[int, Field(ge=2)] = 101
    """Points on each precision-recall curve"""
    out: str = "reports"
    """Eval.md, PNG figures, and plots/ for `dvc plots`"""
    metrics: str = "metrics/eval.json"
    """Every task's metrics (JSON)"""


class ExportConfig(_Section):
    out: str = "models/export"
    """One folder per task: model.onnx, model.pt2, model.safetensors, config.json"""
    opset: PositiveInt = 18
    """ONNX opset"""
    parity_samples: PositiveInt = 64
    """Held-out samples each artifact is checked on against the eager model"""
    atol: NonNegativeFloat = 1e-4
    """The largest max-abs output difference that passes"""
    metrics: str = "metrics/export.json"
    """Parity of every artifact with the eager model (JSON)"""


class Schedule(_Section):
    """When a served deployment runs: a cron line or an interval in seconds (one of the two)."""

    cron: str | None = None
    """A cron line, e.g. `0 2 * * *`"""
    interval: float | None = None
    """Seconds between runs"""

    @model_validator(mode="after")
    def _one(self):
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give a schedule either `cron` (e.g. \"0 2 * * *\") or `interval` (seconds), not both")
        return self


class OrchestrateConfig(_Section):
    nproc_per_node: PositiveInt = 1
    """Training processes on this machine (one per GPU)"""
    train_retries: NonNegativeInt = 1
    """Restarts of a crashed training, each resuming from its last checkpoint"""
    schedules: dict[str, Schedule] = {}
    """Flow name (a row of core/stagetable.py: a stage, pipeline or sweep) -> its schedule"""


class ServeConfig(InputLimitsConfig):
    host: str = "127.0.0.1"
    """Address `tessera serve` listens on (0.0.0.0: every interface)"""
    port: int = 8000
    """Its port"""
    max_batch: PositiveInt = 32
    """Inputs gathered into one ONNX Runtime call; 1: one request at a time"""
    max_wait_ms: NonNegativeFloat = 5.0
    """How long the first waiting input holds its batch open for more (ms)"""
    max_body_mb: PositiveFloat = 16.0
    """Largest request body; beyond: 413"""
    top_k: PositiveInt = 3
    """Classes listed per answer"""
    threshold: Probability = 0.5
    """Detection: lowest score of a box listed"""
    admin: bool = False
    """Enables POST /admin/reload (from localhost only): serve the export now on disk"""


class SearchDim(_Section):
    """One searched key: a range (`low`, `high`; ints when both are ints; `log` for a log scale; `step` for a grid)
    or a list of `choices`."""

    low: int | float | None = None
    """Lowest value"""
    high: int | float | None = None
    """Highest value (included)"""
    log: bool = False
    """Sampled on a log scale (low > 0)"""
    step: int | float | None = None
    """Spacing of the values (the grid sampler needs it for a range)"""
    choices: list[bool | int | float | str | None] | None = None
    """The values to choose from, instead of a range"""

    @model_validator(mode="after")
    def _one_kind(self):
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.log or self.step is not None:
                raise ValueError("give either choices or a range (low, high, log, step), not both")
            if not self.choices:
                raise ValueError("choices is empty: list at least one value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices)")
        if not self.low < self.high:
            raise ValueError(f"the range is empty: low={self.low} must be below high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got low={self.low}")
        if self.step is not None and (self.step <= 0 or self.log):
            raise ValueError(f"step must be positive and needs a linear range, got step={self.step}, log={self.log}")
        return self

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))


class PrunerConfig(_Section):
    kind: Literal["median", "halving", "none"] = "median"
    """Median: stop a trial whose validation is below the median of finished trials at the same step; halving:
    successive halving (rungs at warmup_steps x 3^k); none: every trial runs to its end"""
    startup_trials: NonNegativeInt = 2
    """Median: finished trials before any trial is pruned"""
    warmup_steps: NonNegativeInt = 0
    """Training steps before a trial may be pruned (halving: the first rung; 0 lets Optuna choose it)"""


class SweepConfig(_Section):
    """`tessera sweep`: Optuna searches params.yaml keys; each trial is a DVC experiment (`dvc exp show`)."""

    name: str = "sweep"
    """The study: its journal is sweeps/<name>/journal.log and its experiments <name>-<trial>; rerunning a name
    resumes it"""
    space: dict[str, SearchDim] = {}
    """Params.yaml key (dotted, e.g. train.lr) -> its range or choices"""
    objective: str = "val.headline"
    """A key of metrics/eval.json (e.g. image.accuracy), or val.<key> of training's validation (val.headline: the
    mean of the tasks' headline metrics)"""
    direction: Literal["maximize", "minimize"] = "maximize"
    """Whether a higher or a lower objective is better"""
    trials: PositiveInt = 12
    """Trials in the study, counting finished ones of an earlier run (failed ones included)"""
    parallel: PositiveInt = 1
    """Trials at once, each in its own workspace (a Prefect concurrency limit holds it)"""
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    """How trials are proposed: TPE, uniformly at random, or every point of a grid (choices and stepped ranges)"""
    pruner: PrunerConfig = PrunerConfig()
    """Stops unpromising trials early, on the validation that training runs every train.eval_every steps"""
    seed: int = 0
    """The sampler's seed"""
    baseline: bool = True
    """Trial 0 runs today's params.yaml: the point the search has to beat"""
    promote: bool = False
    """After the sweep, apply the best trial to the workspace (`dvc exp apply`) and `dvc repro` what is stale"""

    @model_validator(mode="after")
    def _check(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", self.name):
            raise ValueError(f"name={self.name!r} must be letters, digits, - and _ (it names git refs and folders)")
        if self.sampler == "grid":
            loose = [k for k, d in self.space.items() if d.choices is None and d.step is None and not d.is_int]
            if loose:
                raise ValueError(f"the grid sampler needs choices or a step for every key; {loose} have a continuous range")
        return self


class Params(_Section):
    tasks: dict[str, TaskConfig] = {}
    """Task name -> {kind, inputs, target}; left out (empty): train.tasks and train.align say which (each modality's
    or records source's own task, and `align`), as before"""
    model: ModelConfig = ModelConfig()
    """The backbone and each modality's adapter and head"""
    generate: GenerateParams = GenerateParams()
    """The embedded default dataset"""
    prepare: PrepareConfig = PrepareConfig()
    """Your data (sources) and its preprocessing"""
    pretrain: PretrainConfig = PretrainConfig()
    """Self-supervised pretraining of the adapters and the backbone, before training"""
    train: TrainConfig = TrainConfig()
    """Joint multi-task training"""
    evaluate: EvaluateConfig = EvaluateConfig()
    """The held-out report"""
    export: ExportConfig = ExportConfig()
    """ONNX, torch.export and safetensors artifacts"""
    orchestrate: OrchestrateConfig = OrchestrateConfig()
    """Processes, retries and schedules"""
    serve: ServeConfig = ServeConfig()
    """`tessera serve`: the HTTP service of the exported models"""
    sweep: SweepConfig = SweepConfig()
    """`tessera sweep`: hyperparameter search, every trial a DVC experiment"""

    @model_validator(mode="after")
    def _tasks_from_sources(self):
        records = [m for m, src in self.prepare.sources.items() if src.format == RECORDS]
        if not self.tasks:
            for name in self.train.tasks or ():
                if name not in MODALITIES and name not in records:
                    raise ValueError(f"train.tasks names {name!r}, which is neither a modality ({list(MODALITIES)}) "
                                     f"nor a records source in prepare.sources ({records}); fix the name, or add its "
                                     "source")
            self.tasks = self.legacy_tasks()
        elif self.train.tasks is not None or self.train.align:
            raise ValueError("tasks is given, and so are train.tasks or train.align, which say the same the old way: "
                             "keep the tasks mapping and remove train.tasks and train.align")
        for name, task in self.tasks.items():
            check_task(name, task, self.prepare.sources)
        self.train.tasks = [t for t, task in self.tasks.items() if task.kind != CONTRASTIVE]
        for name in self.train.modality_dropout:
            if name not in records or name not in self.train.tasks:
                raise ValueError(f"train.modality_dropout names {name!r}, which is no records source in train.tasks "
                                 f"({[t for t in self.train.tasks if t in records]}); modality dropout hides inputs of "
                                 "a fused task")
        for ref in self.model.inputs:  # a source not declared: ignored, as model.audio is without an audio source
            source = self.prepare.sources.get(ref.split(".")[0])
            if not by_sample(ref) or (source is not None and source.format != RECORDS):
                raise ValueError(f"model.inputs names {ref!r}, which is no input <source>.<input> of a records source "
                                 f"in prepare.sources ({records}); name one as the tasks mapping does")
        unknown = sorted(set(self.train.weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"train.weights names {unknown}, which are not tasks trained here ({list(self.tasks)}); "
                             "weights go by task name")
        read = {*self.train.tasks, *(m for pair in self.pairs().values() for m in pair if not by_sample(m))}
        for m, src in self.prepare.sources.items():
            if src.unlabelled is not None and m not in read:
                raise ValueError(f"prepare.sources.{m}.unlabelled: no task reads {m} (tasks: {list(self.tasks)}), so "
                                 f"pretraining would never draw its unlabelled inputs; add a task of {m}, or remove "
                                 "the key")
        return self

    def legacy_tasks(self) -> dict[str, TaskConfig]:
        """train.tasks and train.align as the tasks mapping: each named modality's or records source's own task
        (train.tasks None: every modality in prepare.sources), and train.align's pair as the contrastive task
        `align`."""
        names = self.train.tasks
        if names is None:  # records train through fused tasks, which name their inputs
            names = [m for m, src in self.prepare.sources.items() if src.format != RECORDS]
        tasks = {t: TaskConfig(inputs=[t]) for t in names}
        if self.train.align:
            tasks["align"] = TaskConfig(kind=CONTRASTIVE, inputs=list(self.train.align))
        return tasks

    def pairs(self) -> dict[str, tuple[str, str]]:
        """Each contrastive task's two inputs: two modalities, or `<source>.<input>` twice."""
        return {t: tuple(task.inputs) for t, task in self.tasks.items() if task.kind == CONTRASTIVE}

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
                   for path in (src.train, src.test, src.images, src.unlabelled) if path is not None)


def check_task(name: str, task: TaskConfig, sources: dict[str, SourceConfig]) -> None:
    """One task of the tasks mapping against the sources it reads: a ValueError names the key and the fix. Whether
    its kind is its input's own is the modality's fact, checked where modalities are known (training's check_data)."""
    records = [m for m, src in sources.items() if src.format == RECORDS]
    if not TASK_NAME.fullmatch(name):
        raise ValueError(f"tasks.{name}: a task's name goes into metric keys (<task>.<metric>) and folders, so use "
                         "letters, digits, _ and -")
    if task.kind == CONTRASTIVE:
        return check_contrastive(name, task, records)
    if len(task.inputs) != 1:
        raise ValueError(f"tasks.{name}.inputs names {task.inputs}: a {task.kind or 'non-contrastive'} task reads one "
                         "modality or one records source (whose inputs it fuses); list one, or set kind: contrastive "
                         "to align two")
    (source,) = task.inputs
    if source not in MODALITIES and source not in records:
        raise ValueError(f"tasks.{name}.inputs names {source!r}, which is neither a modality ({list(MODALITIES)}) nor "
                         f"a records source in prepare.sources ({records}); fix the name, or add its source")
    if name != source:
        raise ValueError(f"tasks.{name}.inputs is [{source}]: a task of one source is named after it for now; "
                         f"rename the task {source}")
    target = sources[source].target if source in records else None
    if task.target not in (None, target):
        raise ValueError(f"tasks.{name}.target is {task.target!r}, but a task reads its source's target for now "
                         f"({target or 'the modality label'}); set prepare.sources.{source}.target instead, and "
                         "leave tasks.{name}.target out")


def by_sample(ref: str) -> bool:
    """Whether a contrastive task's input names an input of a records source (`<source>.<input>`: paired by sample)
    rather than a modality's own dataset (paired by label)."""
    return "." in ref


def check_contrastive(name: str, task: TaskConfig, records: list[str]) -> None:
    inputs = task.inputs
    if len(inputs) != 2 or inputs[0] == inputs[1]:
        raise ValueError(f"tasks.{name}.inputs names {inputs}: a contrastive task aligns two different inputs: two "
                         "modalities (paired by label) or two inputs <source>.<input> of one records source (paired "
                         "by sample)")
    if task.target is not None:
        raise ValueError(f"tasks.{name}.target: a contrastive task has none (each pair is its own); remove it")
    if name in MODALITIES or name in records:
        raise ValueError(f"tasks.{name}: a contrastive task is named apart from the modalities and sources it reads; "
                         f"name it after what it aligns, e.g. {'_'.join(i.split('.')[-1] for i in inputs)}")
    samples = [by_sample(i) for i in inputs]
    if all(samples):
        sources = {i.split(".")[0] for i in inputs}
        unknown = sorted(sources - set(records))
        if unknown or len(sources) != 1:
            raise ValueError(f"tasks.{name}.inputs names {inputs}: pairs by sample are two inputs of one records "
                             f"source in prepare.sources ({records}), as <source>.<input> (a column, or `table` for "
                             "the numeric and categorical ones)")
        return
    if any(samples) or any(i not in MODALITIES for i in inputs):
        raise ValueError(f"tasks.{name}.inputs names {inputs}: pairs by label are two modalities ({list(MODALITIES)}), "
                         "each its own dataset; pairs by sample two inputs <source>.<input> of one records source, "
                         "not one of each")


FIELDS = {f for section in (TaskConfig, ModelConfig, ImageConfig, TextConfig, AudioConfig, DetectionConfig, TabularConfig, GenerateParams,
                             SourceConfig, PrepareConfig, PretrainConfig, TrainConfig, EvaluateConfig, ExportConfig, Schedule,
                             OrchestrateConfig, ServeConfig, SearchDim, PrunerConfig, SweepConfig) for f in section.model_fields}


# Keys that were renamed: old dotted key -> new one, named when the old one is found.
RENAMED = {"serve.max_seconds": "serve.max_audio_seconds"}


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = [str(p) for p in err["loc"]]
            msg = re.sub("^Input should be", "must be", err["msg"].removeprefix("Value error, "))
            got = f" (got {err['input']!r})"
            if err["type"] == "extra_forbidden" and ".".join(loc) in RENAMED:
                msg = f"renamed: call it {RENAMED['.'.join(loc)]}"
            elif err["type"] == "extra_forbidden":
                msg = "not a known key: check its spelling against `tessera params`, or remove it"
            elif err["type"] == "value_error":  # a check across a section's keys: it names the key first ("lr must...")
                first = msg.split()[0].split("=")[0].split(".")
                loc += first if first[-1] in FIELDS and first[-1] not in loc else []
                got = ""  # the input is the whole section; the message has the values
            lines.append(f"{source}: {'.'.join(loc) or '(top level)'}: {msg}{got}")
        raise UserError("\n".join(lines)) from None


BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}  # annotated_types' names for a field's bounds


def describe_params(model: type[BaseModel] = None, prefix: str = "") -> list[dict]:
    """One row per params.yaml key, sections first and then their keys: key, type, default and meaning (the
    field's docstring), for `tessera params`."""
    rows = []
    for name, f in (model or Params).model_fields.items():
        key, section = prefix + name, f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
        kind = "section" if section else (str(f.annotation).replace("typing.", "") if get_args(f.annotation) else f.annotation.__name__)
        kind += "".join(f", {sign} {getattr(bound, op)}" for bound in f.metadata
                        for op, sign in BOUNDS.items() if hasattr(bound, op))
        default = "" if section or f.is_required() else repr(f.default)
        rows.append({"key": key, "type": kind, "default": default, "meaning": (f.description or "").rstrip(".")})
        if section:
            rows += describe_params(section, key + ".")
        entry = get_args(f.annotation)[-1] if str(f.annotation).startswith("dict[") else None
        if isinstance(entry, type) and issubclass(entry, BaseModel):  # a mapping of sections: prepare.sources.<name>
            rows += describe_params(entry, key + ".<name>.")
    return rows


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; run from the repository root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    return parse_params(raw, str(path))
