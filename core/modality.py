"""What a modality is, as the rest of Tessera sees it. Each modality is a package modalities/<name>/ in three parts,
each with its registry, so that a process imports only the part it runs:
- `Modality` (modalities/<name>/__init__.py, `REGISTRY` in modalities/__init__.py): what prepare and training run
  (listing, loading samples to arrays, collate, adapter, head) and the export contract;
- `ModalityIO` (modalities/<name>/infer.py, `READERS` in modalities/io.py): reading a user's input to predict on;
- `Drawing` (modalities/<name>/draw.py, `DRAWINGS` in modalities/draw.py): drawing relevance for explanations.
Code outside modalities/ asks the registries and never names a modality.

A modality's own task is of a kind (core/kinds/: its head, criterion, metrics, headline, outputs and records):
a classifier unless its declaration's `kind` says otherwise (detection's own kind; a table's, from params.yaml).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tessera.core.config import InputLimitsConfig, ModelConfig, Params, SourceConfig
from tessera.core.data.files import Entry
from tessera.core.kinds import KINDS
from tessera.core.kinds.kind import TaskKind


@dataclass(frozen=True)
class PrepareContext:
    """What a modality's sample loader may use while `tessera prepare` writes its shards."""

    params: Params
    classes: list[str]  # the classes in label-index order (the source's own, or the training split's labels)
    train_entries: Callable[[], Iterator[Entry]]  # the usable training entries, listed again (tokenizer, columns)
    folder: Path  # the modality's output folder: files the model needs (tokenizer.json) go beside the shards


@dataclass(frozen=True)
class InputLimits:
    """What reading one input to predict on may cost (InputLimitsConfig's keys), and the params section that set
    them, which a refusal names (`prepare.max_image_pixels`): `tessera predict` keeps prepare's, `tessera serve`
    has its own (serve.*)."""

    max_image_pixels: int
    max_audio_seconds: float
    audio_rates: tuple[int, int]
    section: str

    @classmethod
    def of(cls, cfg: InputLimitsConfig, section: str) -> InputLimits:
        """The limits of params.yaml's `section` (prepare, serve), whose config is `cfg`."""
        return cls(cfg.max_image_pixels, cfg.max_audio_seconds, tuple(cfg.audio_rates), section)

    def key(self, name: str) -> str:
        """The params key of limit `name`: prepare.max_image_pixels."""
        return f"{self.section}.{name}"


@dataclass(frozen=True, kw_only=True)
class Modality:
    name: str
    kind: Callable[[ModelConfig], TaskKind] = lambda cfg: KINDS["classification"]
    """Its own task's kind under a model config (a table's says model.tabular.kind)."""

    # -- tessera prepare
    formats: tuple[str, ...]  # what prepare.sources.<name>.format may say
    list_source: Callable[[SourceConfig, str, Params], tuple[list[str] | None, Iterator[Entry]]]
    """(class names where the format fixes them, else None; the entries) of one source file or folder."""
    list_unlabelled: Callable[[SourceConfig, str, Params], Iterator[Entry]] | None = None
    """The entries (label None) of an unlabelled source (prepare.sources.<name>.unlabelled): the source's format less
    its labels; a label found stops prepare (core/data/files.py: refuse_label). None: no unlabelled form."""
    prepare_keys: tuple[str, ...]  # the params.yaml keys preprocessing reads: the cache key and dvc.yaml list them
    loader: Callable[[PrepareContext], Callable[[Entry], dict[str, np.ndarray]]]
    """The per-sample preprocessing: Entry -> numpy fields, or BadSample with the quarantine reason."""
    ragged: tuple[str, ...] = ()  # fields whose first dimension varies between samples (stored flattened)
    statistics: Callable[[Params], Callable[[dict | None], dict | None]] | None = None
    """A fresh accumulator: called with each training sample's fields, then with None for meta.json's `stats`."""
    assets: tuple[str, ...] = ()  # files the loader writes beside the shards that the trained model needs
    files: bool = True  # samples are files to decode: prepare decodes them on every core (prepare.workers)

    # -- training
    collate: Callable[[dict], tuple[dict, Any]]
    """A gathered batch (core/data/shards.py: fields [B, ...], ragged ones padded with `<name>_lengths`) ->
    (adapter keyword inputs, targets)."""
    adapter: Callable[[ModelConfig], nn.Module]  # raw inputs -> (tokens [B, L, D], pad_mask [B, L] or None)
    from_data: Callable[[ModelConfig, Path, dict], None] | None = None
    """Fills the model config's facts about the data (vocabulary, statistics, columns) from the prepared folder and
    its meta.json, before the model is built."""
    pretrained: Callable[[nn.Module, ModelConfig], None] | None = None  # loads starting weights into a task model

    # -- export, bench
    inputs: Callable[[ModelConfig], list[dict]]  # exported inputs: name, dtype, shape (str: any size), meaning
    to_inputs: Callable[[dict], tuple[torch.Tensor, ...]]  # collated adapter inputs -> exported inputs
    from_inputs: Callable[[ModelConfig, tuple[torch.Tensor, ...]], dict]  # exported inputs -> adapter inputs
    example: Callable[[ModelConfig, int], tuple[torch.Tensor, ...]]  # exported inputs of the configured size


Read = Callable[..., Iterator[tuple[str, Any, str | None]]]
"""read(source: Path | bytes, name: str | None = None) -> (source, item, error) per input the file holds. `source` is
a file or its bytes (an upload, decoded from memory); `name` names the inputs in sources and messages and gives the
format by its suffix (default: the path; needed with bytes)."""


@dataclass(frozen=True, kw_only=True)
class ModalityIO:
    """What `tessera predict`, `tessera serve` and `tessera explain` need to read a user's input of a modality:
    each modality's infer.py declares one, listed by name in modalities/io.py (`READERS`). Training never imports
    them, so that editing how an input is read retrains nothing."""

    name: str
    suffixes: frozenset[str]  # the files `tessera predict` picks from a folder
    predict_io: Callable[[dict, Path, InputLimits], tuple[Read, Callable]]
    """(export's config.json, its folder, limits) -> (read, batch(items) -> exported inputs as numpy arrays)."""
    records: Callable[[list, list, list[np.ndarray], dict, float], list[dict]] | None = None
    """predict: (sources, the items `read` gave, the session's outputs, config.json, threshold) -> a record each
    where they need the items (detection's boxes in each file's pixels); None: the task kind's records."""
    json_input: tuple[str, str, Callable[[Any], dict]] | None = None
    """`tessera serve`: inputs sent as JSON instead of files: (the key of one input, the key of a list of them, an
    input -> the JSONL row `read` takes), e.g. ("text", "texts", ...) for {"text": "seven"}. None: files only."""


@dataclass(frozen=True, kw_only=True)
class Drawing:
    """How explanations (core/stages/explanations.py) lay a modality's token relevance over its input and draw it:
    each modality's draw.py declares one, listed by name in modalities/draw.py (`DRAWINGS`). Only evaluation and
    `tessera explain` import them."""

    name: str
    draw_relevance: Callable[..., None]
    """(matplotlib axes, adapter inputs of one sample, relevance laid out by token_grid, its outputs, the task
    model, ModelConfig, the folder of the modality's assets or None) -> draws the input with its relevance."""
    token_grid: Callable[[nn.Module, int], tuple[int, ...]] = lambda adapter, n: (n,)
    """(adapter, tokens after [CLS]) -> how they lie over the input: (rows, columns) of image patches, (frequency,
    time) patches of a spectrogram; one row of tokens or features by default."""
    relevance: Callable[..., tuple] | None = None
    """(task model, adapter inputs, method) -> (relevance [B, L], outputs, pad_mask) in place of the encoder's
    rollout (core/tasks/explain.py: token_relevance), for a head that reads the tokens otherwise (detection)."""
