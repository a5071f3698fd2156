"""Weights and training state on disk: safetensors for weights, torch.load(weights_only=True) for the rest.

Never a bare pickle: a file that would run code when loaded is refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tessera.core.data.files import atomic_write_text
from tessera.core.errors import UserError
from tessera.core.nn.weights import read_state_dict


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Every generator a training step may draw from, as tensors and plain values (weights_only-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()),
                                                               *np_state[2:]], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Checkpoints as folders `step-NNNNNNN/` holding model.safetensors (weights), state.pt (optimizer, scheduler,
    step, RNG states, sampler positions; tensors and plain values only) and meta.json.

    A folder is written under a temporary name, fsynced and renamed, so a crash leaves either a whole checkpoint
    or none. The last `keep_last` are kept, and the best by the validation metric (named in best.json).
    `load_latest` walks back from the newest and skips, with a warning, any it cannot read.
    """

    def __init__(self, folder: str | Path, keep_last: int):
        self.folder, self.keep_last = Path(folder), keep_last
        self.folder.mkdir(parents=True, exist_ok=True)

    def steps(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))

    def save(self, step: int, weights: dict[str, torch.Tensor], state: dict, meta: dict, best: bool = False) -> Path:
        final = self.folder / f"step-{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        if best:
            atomic_write_text(self.folder / "best.json", json.dumps({"step": step, "path": final.name}))
        self._prune()
        return final

    def best(self) -> Path | None:
        try:
            return self.folder / json.loads((self.folder / "best.json").read_text())["path"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def load_best(self, accept=lambda meta: True, warn=print) -> tuple[dict, dict, dict] | None:
        """The best checkpoint (best.json) that `accept`s its meta; if it cannot be read, the best-scoring readable
        one of those (each meta.json holds its validation `score`), with a warning. None when none is readable."""
        def meta(path: Path) -> dict | None:
            try:
                m = json.loads((path / "meta.json").read_text())
            except (OSError, json.JSONDecodeError):
                return None
            return m if accept(m) else None

        best, metas = self.best(), {p: meta(p) for p in self.steps()}
        candidates = sorted((p for p, m in metas.items() if m is not None),
                            key=lambda p: (p == best, metas[p].get("score", float("-inf"))), reverse=True)
        for path in candidates:
            try:
                return self.read(path)
            except UserError as e:
                warn(f"the best checkpoint is unreadable, taking the best readable one instead: {e}")
        return None

    def _prune(self) -> None:
        keep = set(self.steps()[-self.keep_last:]) | {self.best()}
        for p in self.steps():
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def read(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """(weights, state, meta) of one checkpoint folder; UserError if any part is unreadable or unsafe."""
        weights = read_state_dict(path / "model.safetensors")
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            meta = json.loads((path / "meta.json").read_text())
        except Exception as e:  # a truncated file, or a pickle that would run code (UnpicklingError)
            raise UserError(f"{path}: refused: unreadable or unsafe training state ({type(e).__name__})") from None
        return weights, state, meta

    def load_latest(self, accept=lambda meta: True, warn=print) -> tuple[dict, dict, dict] | None:
        """The newest readable checkpoint that `accept`s its meta, or None."""
        for path in reversed(self.steps()):
            try:
                weights, state, meta = self.read(path)
            except UserError as e:
                warn(f"skipping checkpoint {path.name}: {e}")
                continue
            if accept(meta):
                return weights, state, meta
            warn(f"skipping checkpoint {path.name}: made with other training settings")
        return None
