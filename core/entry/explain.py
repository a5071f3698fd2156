"""`tessera explain`: an exported task on files of its modality, read as `tessera predict` reads them (its
`ModalityIO`), each drawn with its relevance map as the evaluation report draws held-out inputs
(core/stages/explanations.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tessera.core.config import PrepareConfig
from tessera.core.data.files import expand
from tessera.core.errors import UserError
from tessera.core.modality import InputLimits
from tessera.core.stages.explanations import draw, prediction, relevance
from tessera.core.stages.export import CONTRASTIVE, load_deployable
from tessera.core.stages.report import new_figure, save_figure
from tessera.modalities import REGISTRY
from tessera.modalities.draw import DRAWINGS
from tessera.modalities.io import READERS


def explain_files(folder: Path, files: list[Path], out: Path, method: str) -> tuple[list[Path], list[str]]:
    """`tessera explain`: a PNG per input of `files` (the exported task in `folder` reads them as `tessera
    predict` does) with its map, prediction and score -> (written files, errors "source: why")."""
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    if config is None:
        raise UserError(f"{folder}: not an exported model (no config.json); pass models/export/<task>")
    if config.get("fused"):
        raise UserError(f"{folder}: a fused task ({', '.join(i['name'] for i in config['fused'])}) is not explained "
                        "yet; predict with it (`tessera predict`), or explain its inputs' own tasks")
    if config["head"] == CONTRASTIVE:
        raise UserError(f"{folder}: an alignment embedder is explained on matched pairs, in the evaluation report "
                        "(reports/eval.md, `tessera evaluate`); pass a classifier or detection task")
    spec, reader, drawing = REGISTRY[config["modality"]], READERS[config["modality"]], DRAWINGS[config["modality"]]
    deployable = load_deployable(folder)
    net, cfg = deployable.net, deployable.cfg
    read, batch = reader.predict_io(config, folder, InputLimits.of(PrepareConfig(), "prepare"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot make the folder ({e.strerror}); pass a folder you can write") from None
    # a folder's search leaves --out out (a run's own pictures are no inputs), and no picture replaces an input
    paths = [p for f in files for p in expand([f], reader.suffixes)
             if not f.is_dir() or not p.resolve().is_relative_to(out.resolve())]
    if not paths:
        raise UserError(f"no {', '.join(sorted(reader.suffixes))} file in {', '.join(map(str, files))} (files "
                        f"inside --out {out} are not searched: write the pictures to a folder of their own)")
    taken = {p.resolve() for p in paths}
    written, errors = [], []
    for path in paths:
        for source, item, error in read(path):
            if error:
                errors.append(f"{source}: {error}")
                continue
            inputs = spec.from_inputs(cfg, tuple(torch.from_numpy(a) for a in batch([item])))
            rel, outputs, _ = relevance(net, drawing, inputs, method)
            fig = new_figure(figsize=(5, 4))
            ax = fig.subplots()
            draw(ax, drawing, net, cfg, inputs, rel, outputs, folder,
                 f"{Path(source).name}: {prediction(outputs, config['classes'])} ({method})")
            target = unused(out / Path(source).name.replace(":", "_"), taken)  # a.png.png, s.txt_3.png
            try:
                save_figure(fig, target)
            except OSError as e:
                raise UserError(f"--out {out}: cannot write {target.name} ({e.strerror})") from None
            written.append(target)
    return written, errors


def unused(stem: Path, taken: set[Path]) -> Path:
    """stem + ".png", or stem-2.png, stem-3.png, ... : the first that no input and no earlier picture holds."""
    k, target = 1, stem.with_name(stem.name + ".png")
    while target.resolve() in taken:
        k += 1
        target = stem.with_name(f"{stem.name}-{k}.png")
    taken.add(target.resolve())
    return target
