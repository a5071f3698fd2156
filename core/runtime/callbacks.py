"""Training's callbacks: what is not training itself (progress, logs, a sweep's pruning) hooks in at known points.

Training (core/stages/train.py) calls, on every rank: `on_start` once, after building and any resume; `on_step`
after each optimizer step; `on_validation` after each validation, where a True from any callback on any rank stops
training at that step on every rank; `on_end` with the run's summary, once the model and metrics are written.
`state_dict` is stored in each checkpoint (on rank 0, which writes it) and `load_state_dict` gets it back on every
rank before `on_start` of a resumed run.

Beyond its own (progress, DVCLive), training installs those named in the environment variable TESSERA_CALLBACKS:
comma-separated `module:factory` entries, each called as `factory(params) -> Callback`. A sweep's trial sets it
(and its own variables, which only its callback reads), so training knows nothing of sweeps.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from tessera.core.config import Params
from tessera.core.errors import UserError

ENV = "TESSERA_CALLBACKS"


@dataclass(frozen=True)
class RunInfo:
    """What a callback learns of the run at its start. Steps are optimizer steps."""

    total_steps: int
    step: int  # where training starts: 0, or the step of the checkpoint it resumed from
    steps_per_epoch: int
    tasks: list[str]  # train.tasks, then the contrastive tasks
    is_main: bool  # rank 0: the process that writes files and prints
    rank: int
    world: int
    out: Path  # train.out
    resumed: bool


class Callback:
    """Hooks training calls at known points; every method is optional (the base does nothing). Called on every
    rank; a callback that acts on rank 0 only checks `info.is_main` itself."""

    key: str = ""  # part of the run signature: a checkpoint resumes only a run with the same callback keys

    def on_start(self, info: RunInfo) -> None:
        pass

    def on_step(self, step: int, losses: dict[str, float], lr: float) -> None:
        """After optimizer step `step` (1-based): this rank's loss of each task the step drew, and the learning rate."""

    def on_validation(self, step: int, val: dict[str, float]) -> bool:
        """`val`: the validation metrics at `step` ("<task>.<metric>"), with "headline" last. True stops training."""
        return False

    def on_end(self, summary: dict) -> None:
        """`summary`: what the metrics JSON holds (test, val, steps, seconds, best_step)."""

    def state_dict(self) -> dict:
        """Plain values and tensors only: checkpoints are read with torch.load(weights_only=True)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def named(callback: Callback) -> str:
    """The name a callback's state is stored under in a checkpoint: its class, `module:qualname`."""
    return f"{type(callback).__module__}:{type(callback).__qualname__}"


class Callbacks(Callback):
    """Several callbacks as one, called in order. Every callback sees every validation, whoever says stop."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    @property
    def keys(self) -> list[str]:
        return sorted(c.key for c in self.callbacks if c.key)

    def on_start(self, info: RunInfo) -> None:
        for c in self.callbacks:
            c.on_start(info)

    def on_step(self, step: int, losses: dict[str, float], lr: float) -> None:
        for c in self.callbacks:
            c.on_step(step, losses, lr)

    def on_validation(self, step: int, val: dict[str, float]) -> bool:
        return any([c.on_validation(step, val) for c in self.callbacks])  # a list: no callback skipped

    def on_end(self, summary: dict) -> None:
        for c in self.callbacks:
            c.on_end(summary)

    def state_dict(self) -> dict:
        return {named(c): state for c in self.callbacks if (state := c.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        for c in self.callbacks:
            if named(c) in state:
                c.load_state_dict(state[named(c)])


def from_env(params: Params, spec: str | None = None) -> list[Callback]:
    """The callbacks TESSERA_CALLBACKS names (`spec` in its place, if given), each made by `factory(params)`."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    return [load(entry.strip(), params) for entry in spec.split(",") if entry.strip()]


def load(entry: str, params: Params) -> Callback:
    """One `module:factory` entry, imported by name."""
    fix = f"set {ENV} to comma-separated module:factory entries, e.g. tessera.core.sweep.pruning:from_env"
    module_name, _, factory_name = entry.partition(":")
    if not module_name or not factory_name:
        raise UserError(f"{ENV}: {entry!r} is not module:factory: {fix}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise  # the module exists but imports one that does not: its author's bug, with its traceback
        raise UserError(f"{ENV}: {entry!r}: no module {module_name} is installed: {fix}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UserError(f"{ENV}: {entry!r}: {module_name} has no function {factory_name}: {fix}")
    callback = factory(params)
    if not isinstance(callback, Callback):
        raise TypeError(f"{ENV}: {entry}(params) returned {type(callback).__name__}, not a "
                        f"tessera.core.runtime.callbacks.Callback")
    return callback
