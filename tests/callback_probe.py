"""A training callback for tests, installed as TESSERA_CALLBACKS=callback_probe:from_env (tests/ on the path):
it writes what training told it to <train.out>/probe-<rank>.json at the end, and on rank 0 alone asks to stop at
the validation of step PROBE_STOP_AT. PROBE_KEY, when set, is its key."""

import json
import os
from pathlib import Path

from tessera.core.runtime.callbacks import Callback, RunInfo


class Probe(Callback):
    def __init__(self, out: Path, stop_at: int, key: str):
        self.out, self.stop_at, self.key = out, stop_at, key

    def on_start(self, info: RunInfo) -> None:
        self.rank = info.rank
        self.seen = {"start": info.step, "resumed": info.resumed, "total": info.total_steps, "steps": [],
                     "validations": []}

    def on_step(self, step: int, losses: dict[str, float], lr: float) -> None:
        self.seen["steps"].append(step)

    def on_validation(self, step: int, val: dict[str, float]) -> bool:
        self.seen["validations"].append([step, val["headline"]])
        return self.rank == 0 and step == self.stop_at

    def on_end(self, summary: dict) -> None:
        self.seen["end"] = summary["steps"]
        (self.out / f"probe-{self.rank}.json").write_text(json.dumps(self.seen))


def from_env(params) -> Probe:
    return Probe(Path(params.train.out), int(os.environ.get("PROBE_STOP_AT", "0")), os.environ.get("PROBE_KEY", ""))
