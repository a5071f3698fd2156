"""`tessera explain`: an exported task on files of its modality, read as `tessera predict` reads them (its
`ModalityIO`), each drawn with its relevance map as the evaluation report draws held-out inputs
(core/stages/explanations.py).

A fused task's on tables of records, read as `tessera predict` reads them (FusedInputs.rows: a broken cell leaves
its input absent, with a warning; a row with no usable input is an error): a picture per row, each input's map
side by side titled with its share of the relevance, as the report draws a record (`draw_record`), and beside it
<picture>.json: the row's prediction as `tessera predict --json` gives it (every class in `top`), with `shares`
({input: share}, summing to 1 over the inputs present, 0 for an absent one)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from tessera.core.config import PrepareConfig
from tessera.core.data.files import atomic_write_text, expand
from tessera.core.entry.predict import TABLES, FusedInputs
from tessera.core.errors import UserError
from tessera.core.modality import InputLimits
from tessera.core.stages.explanations import draw, draw_record, prediction, relevance
from tessera.core.stages.export import CONTRASTIVE, load_deployable
from tessera.core.stages.report import new_figure, save_figure
from tessera.core.tasks.explain import input_spans, token_relevance
from tessera.modalities import REGISTRY
from tessera.modalities.draw import DRAWINGS
from tessera.modalities.io import READERS

Picture = tuple[str, object, dict | None, str | None]  # (source, figure, the .json beside it or None, error or None)


def explain_files(folder: Path, files: list[Path], out: Path, method: str) -> tuple[list[Path], list[str], list[str]]:
    """`tessera explain`: a PNG per input of `files` (the exported task in `folder` reads them as `tessera
    predict` does; a fused task's: per row of its tables, with its .json) with its map, prediction and score
    -> (written files, errors "source: why", warnings "source: input: why" for a fused task's unreadable cells)."""
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    if config is None:
        raise UserError(f"{folder}: not an exported model (no config.json); pass models/export/<task>")
    if config["head"] == CONTRASTIVE:
        raise UserError(f"{folder}: an alignment embedder is explained on matched pairs, in the evaluation report "
                        "(reports/eval.md, `tessera evaluate`); pass a classifier or detection task")
    suffixes = TABLES if config.get("fused") else READERS[config["modality"]].suffixes
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot make the folder ({e.strerror}); pass a folder you can write") from None
    # a folder's search leaves --out out (a run's own pictures are no inputs), and no picture replaces an input
    paths = [p for f in files for p in expand([f], suffixes)
             if not f.is_dir() or not p.resolve().is_relative_to(out.resolve())]
    if not paths:
        raise UserError(f"no {', '.join(sorted(suffixes))} file in {', '.join(map(str, files))} (files "
                        f"inside --out {out} are not searched: write the pictures to a folder of their own)")
    taken = {p.resolve() for p in paths}
    pictures = (records_explained if config.get("fused") else inputs_explained)(folder, config, paths, method)
    written, errors, warnings = [], [], []
    for source, fig, facts, error in pictures:
        if error:
            errors.append(f"{source}: {error}")
            continue
        warnings += [f"{source}: {w}" for w in (facts or {}).get("warnings", [])]
        target = unused(out / Path(source).name.replace(":", "_"), taken)  # a.png.png, s.txt_3.png, t.csv_2.png
        try:
            save_figure(fig, target)
            written.append(target)
            if facts is not None:
                atomic_write_text(target.with_suffix(".json"), json.dumps(facts, indent=1))
                written.append(target.with_suffix(".json"))
        except OSError as e:
            raise UserError(f"--out {out}: cannot write {target.name} ({e.strerror})") from None
    return written, errors, warnings


def inputs_explained(folder: Path, config: dict, paths: list[Path], method: str) -> Iterator[Picture]:
    """A picture per input of a single modality's task: the input with its map, its prediction in the title."""
    spec, reader, drawing = REGISTRY[config["modality"]], READERS[config["modality"]], DRAWINGS[config["modality"]]
    deployable = load_deployable(folder)
    net, cfg = deployable.net, deployable.cfg
    read, batch = reader.predict_io(config, folder, InputLimits.of(PrepareConfig(), "prepare"))
    for path in paths:
        for source, item, error in read(path):
            if error:
                yield source, None, None, error
                continue
            inputs = spec.from_inputs(cfg, tuple(torch.from_numpy(a) for a in batch([item])))
            rel, outputs, _ = relevance(net, drawing, inputs, method)
            fig = new_figure(figsize=(5, 4))
            draw(fig.subplots(), drawing, net, cfg, inputs, rel, outputs, folder,
                 f"{Path(source).name}: {prediction(outputs, config['classes'])} ({method})")
            yield source, fig, None, None


def records_explained(folder: Path, config: dict, tables: list[Path], method: str) -> Iterator[Picture]:
    """A picture per row of a fused task's tables, each alone (a batch of one): each input's map side by side
    (draw_record), and its facts: `tessera predict`'s record of the row with each input's `shares`."""
    deployable = load_deployable(folder)  # FusedDeployable
    net, cfg, fused = deployable.net, deployable.cfg, config["fused"]
    reader = FusedInputs(config, folder, InputLimits.of(PrepareConfig(), "prepare"))
    for source, record, error in reader.rows(tables):
        if error:
            yield source, None, None, error
            continue
        args = tuple(torch.from_numpy(a) for a in reader.batch([record]))
        inputs = deployable.task_inputs(args)
        rel, outputs, _ = token_relevance(net, inputs, method)  # [1, L] over the fused sequence
        fig = new_figure(figsize=(2.8 * len(fused), 3.2), layout="constrained")
        shares = draw_record(fig.subplots(1, len(fused), squeeze=False)[0], net, cfg, fused, inputs, rel,
                             input_spans(net.adapter, inputs), outputs, folder,
                             f"{Path(source).name}: {prediction(outputs, config['classes'])} ({method})")
        exported = [o.numpy() for o in deployable.kind.export_outputs(outputs, cfg, args)]
        made = deployable.kind.records([source], exported, config, len(config["classes"]))[0]  # every class in `top`
        yield source, fig, {**reader.described(made, record), "shares": shares}, None


def unused(stem: Path, taken: set[Path]) -> Path:
    """stem + ".png", or stem-2.png, stem-3.png, ... : the first that no input and no earlier picture holds."""
    k, target = 1, stem.with_name(stem.name + ".png")
    while target.resolve() in taken:
        k += 1
        target = stem.with_name(f"{stem.name}-{k}.png")
    taken.add(target.resolve())
    return target
