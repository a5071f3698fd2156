"""What is served: an export folder (`tessera export`, or a DVC artifact version fetched into one) loaded as a
Predictor and a Batcher per task, each task checked on its export's held-out batch, and the version the export
recorded of itself when it was made."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from tessera.core.config import ServeConfig
from tessera.core.entry.predict import Predictor
from tessera.core.errors import UserError
from tessera.core.modality import InputLimits
from tessera.core.serve.batching import Batcher
from tessera.core.serve.metrics import Metrics
from tessera.core.stages.export import VERSION
from tessera.modalities.io import READERS


def fetch(artifact: str, repo: str, folder: Path) -> dict:
    """Downloads `name@version` (or `name`: its latest registered version) of a DVC artifact of `repo` into
    `folder` with `dvc artifacts get`; -> what /info reports of it."""
    name, _, rev = artifact.partition("@")
    cmd = [sys.executable, "-m", "dvc", "artifacts", "get", repo, name, "-o", str(folder), "--force"] + (["--rev", rev] if rev else [])
    got = subprocess.run(cmd, capture_output=True, text=True)
    if got.returncode:
        raise UserError(f"dvc artifacts get {repo} {name}{' --rev ' + rev if rev else ''} failed: "
                        f"{got.stderr.strip()[-600:]}. A version is a git tag that `gto register {name}` makes")
    return {"artifact": name, "artifact_version": rev or "latest", "artifact_repo": repo}


def task_folders(folder: Path) -> list[Path]:
    """The exported tasks in `folder` (each a folder with config.json); UserError, with the fix, if none."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; run `tessera export` (or `dvc repro`) first, or pass the "
                        "folder `dvc artifacts get` wrote")
    tasks = sorted(p for p in folder.iterdir() if (p / "config.json").is_file())
    if not tasks:
        raise UserError(f"{folder}: no exported task in it (a folder with config.json and model.onnx); run "
                        "`tessera export` first")
    return tasks


def read_version(folder: Path) -> dict:
    """The export's record of itself (core/stages/export.py: write_version): its content hash, the git commit it
    was made at (None outside a repository) and the params it was made from."""
    path = folder / VERSION
    try:
        version = json.loads(path.read_text())
        return {k: version[k] for k in ("content_hash", "git_commit", "params")}
    except (OSError, ValueError, KeyError, TypeError) as e:  # TypeError: JSON, but not an object
        raise UserError(f"{path}: {'missing' if isinstance(e, FileNotFoundError) else 'not what export writes'}; "
                        "re-run `tessera export` (or `dvc repro`), which writes it with the models") from None


def warm_up(predictor: Predictor) -> str | None:
    """Runs the task on its export's check.safetensors (a held-out batch and the eager model's outputs): None if
    every output is within the recorded atol, else what is wrong."""
    path = predictor.folder / "check.safetensors"
    if not path.is_file():
        return f"{path}: missing; re-run `tessera export` (or `dvc repro`) to write it"
    with safe_open(str(path), "np") as f:
        atol = float(f.metadata()["atol"])
    tensors = load_file(str(path))
    feed = {n: tensors[f"input.{n}"] for n in predictor.input_names}
    got = predictor.session.run(None, feed)
    names = [o.name for o in predictor.session.get_outputs()]
    worst = max(float(np.abs(g.astype(np.float64) - tensors[f"output.{n}"].astype(np.float64)).max()) for n, g in zip(names, got))
    return None if worst <= atol else f"outputs differ from the exported model's by {worst:.3g} (atol {atol:g})"


def takes(p: Predictor) -> dict:
    """What a task's requests send: `files` (the suffixes it reads) and `json` (the keys of one input and of a
    list of them, or None); a fused task's `fields`: each input's form field, {"files": suffixes} or "json"."""
    if p.fused:
        return {"files": [], "json": None,
                "fields": {n: "json" if READERS[m].json_input else {"files": sorted(READERS[m].suffixes)}
                           for n, m in p.fused.modalities.items()}}
    return {"files": sorted(p.modality.suffixes),
            "json": dict(zip(("one", "several"), p.modality.json_input[:2])) if p.modality.json_input else None}


class Served:
    """One export folder, loaded: a Predictor and a Batcher per task, their warm-up results, and the version
    (`read_version`, and the DVC artifact version it was fetched at, if it was)."""

    def __init__(self, folder: Path, cfg: ServeConfig, metrics: Metrics, fetched: dict | None = None):
        self.folder = Path(folder)
        tasks = task_folders(self.folder)
        self.version = read_version(self.folder) | (fetched or {})
        self.predictors = {p.name: Predictor(p, InputLimits.of(cfg, "serve"), spin=False) for p in tasks}
        self.problems = {name: problem for name, p in self.predictors.items() if (problem := warm_up(p))}
        self.batchers = {name: Batcher(name, p, cfg, metrics) for name, p in self.predictors.items()}
        card = self.folder / "README.md"
        self.card = card.read_text() if card.is_file() else None

    def info(self) -> dict:
        tasks = {name: {"modality": p.config["modality"], "head": p.config["head"], "classes": p.config["classes"],
                        "inputs": p.config["inputs"], "outputs": p.config.get("outputs"), "ready": name not in self.problems}
                        | takes(p) for name, p in self.predictors.items()}
        return {"folder": str(self.folder.resolve()), "version": self.version, "tasks": tasks, "model_card": self.card}

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.batchers.values()))
