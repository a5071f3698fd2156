"""What a modality is, as the rest of Tessera sees it: one `Modality` per file in modalities/, listed by name in
modalities/__init__.py (`REGISTRY`). Code outside modalities/ asks the registry and never names a modality.

A modality's own task is a classifier (linear head on the pooled states, cross-entropy, accuracy and macro-F1,
logits out, top-k records) unless its declaration says otherwise: detection gives its `task` name, `labelled=False`,
and its own `head`, `criterion`, `metric`, `headline`, `outputs`, `export_outputs` and `records`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tessera.core.config import ModelConfig, Params, PrepareConfig, SourceConfig
from tessera.core.data.files import Entry


@dataclass(frozen=True)
class PrepareContext:
    """What a modality's sample loader may use while `tessera prepare` writes its shards."""

    params: Params
    classes: list[str]  # the classes in label-index order (the source's own, or the training split's labels)
    train_entries: Callable[[], Iterator[Entry]]  # the usable training entries, listed again (tokenizer, columns)
    folder: Path  # the modality's output folder: files the model needs (tokenizer.json) go beside the shards


@dataclass(frozen=True)
class InputLimits:
    """What reading one input to predict on may cost, and the params key that sets each limit (named when an input
    is refused): `tessera predict` keeps prepare's, `tessera serve` has its own (serve.*)."""

    max_pixels: int
    max_seconds: float
    audio_rates: tuple[int, int]
    pixels_key: str = "prepare.max_image_pixels"
    seconds_key: str = "prepare.max_audio_seconds"

    @classmethod
    def of_prepare(cls, p: PrepareConfig) -> InputLimits:
        return cls(p.max_image_pixels, p.max_audio_seconds, tuple(p.audio_rates))


@dataclass(frozen=True, kw_only=True)
class Modality:
    name: str
    task: str = "classification"  # what its own task is called (config.json, model cards)

    # -- tessera prepare
    formats: tuple[str, ...]  # what prepare.sources.<name>.format may say
    list_source: Callable[[SourceConfig, str, Params], tuple[list[str] | None, Iterator[Entry]]]
    """(class names where the format fixes them, else None; the entries) of one source file or folder."""
    prepare_keys: tuple[str, ...]  # the params.yaml keys preprocessing reads: the cache key and dvc.yaml list them
    loader: Callable[[PrepareContext], Callable[[Entry], dict[str, np.ndarray]]]
    """The per-sample preprocessing: Entry -> numpy fields, or BadSample with the quarantine reason."""
    ragged: tuple[str, ...] = ()  # fields whose first dimension varies between samples (stored flattened)
    labelled: bool = True  # one class per sample, from the listing (detection: labels live inside the sample)
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
    head: Callable[[ModelConfig, int], nn.Module] | None = None
    criterion: Callable[[ModelConfig, int], nn.Module] | None = None
    metric: Callable[[ModelConfig, bool], Any] | None = None
    """(cfg, keep) -> update(outputs, targets), compute() -> {name: value}, details(classes, pr_points) -> report
    data (with keep=True)."""
    metric_names: tuple[str, ...] = ("accuracy", "macro_f1")  # the keys compute() returns
    headline: str = "accuracy"  # the metric early stopping and the best checkpoint follow

    # -- export, predict, bench
    inputs: Callable[[ModelConfig], list[dict]]  # exported inputs: name, dtype, shape (str: any size), meaning
    to_inputs: Callable[[dict], tuple[torch.Tensor, ...]]  # collated adapter inputs -> exported inputs
    from_inputs: Callable[[ModelConfig, tuple[torch.Tensor, ...]], dict]  # exported inputs -> adapter inputs
    example: Callable[[ModelConfig, int], tuple[torch.Tensor, ...]]  # exported inputs of the configured size
    outputs: tuple[str, ...] = ("logits",)
    export_outputs: Callable[[dict, ModelConfig, tuple], tuple] | None = None  # head outputs -> exported outputs
    suffixes: frozenset[str]  # the files `tessera predict` picks from a folder
    predict_io: Callable[[dict, Path, InputLimits], tuple[Callable, Callable]]
    """(export's config.json, its folder, limits) -> (read(path) -> (source, input, error) per input in the file,
    batch(inputs) -> exported inputs as numpy arrays)."""
    # -- explanations (core/tasks/explain.py)
    token_grid: Callable[[nn.Module, int], tuple[int, ...]] = lambda adapter, n: (n,)
    """(adapter, tokens after [CLS]) -> how they lie over the input: (rows, columns) of image patches, (frequency,
    time) patches of a spectrogram; one row of tokens or features by default."""
    draw_relevance: Callable[..., None] | None = None
    """(matplotlib axes, adapter inputs of one sample, relevance laid out by token_grid, its outputs, the task
    model, ModelConfig, the folder of the modality's assets or None) -> draws the input with its relevance."""
    relevance: Callable[..., tuple] | None = None
    """(task model, adapter inputs, method) -> (relevance [B, L], outputs, pad_mask) in place of the encoder's
    rollout (core/tasks/explain.py: token_relevance), for a head that reads the tokens otherwise (detection)."""
    json_input: tuple[str, str, Callable[[Any], dict]] | None = None
    """`tessera serve`: inputs sent as JSON instead of files: (the key of one input, the key of a list of them, an
    input -> the JSONL row `read` takes), e.g. ("text", "texts", ...) for {"text": "seven"}. None: files only."""
    records: Callable[[list, list, list[np.ndarray], dict, float], list[dict]] | None = None
    """predict: (sources, the items `read` gave, the session's outputs, config.json, threshold) -> a record each."""
