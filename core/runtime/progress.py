"""Training progress, where someone watches it: a bar on a terminal, a plain line at a steady rate in a log that is
not one (a file, CI, `dvc repro > log`), and progress.json and validation.json for the Prefect flow's progress
and validation artifacts (update_progress in flows/artifacts.py reads them). Rank 0 only."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tessera.core.data.files import atomic_write_text
from tessera.core.runtime.callbacks import Callback, RunInfo


def progress_callbacks(console: Console, out: Path) -> list[Callback]:
    """The bar where `console` is a terminal, else log lines; and progress.json in `out`."""
    return [ProgressBar(console) if console.is_terminal else ProgressLog(console), ProgressFile(out / "progress.json")]


class ProgressBar(Callback):
    """rich's bar: steps done of all, the losses of the last step, time taken and left."""

    def __init__(self, console: Console):
        self.console, self.progress, self.bar = console, None, None

    def on_start(self, info: RunInfo) -> None:
        if not info.is_main:
            return
        self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
        self.bar = self.progress.add_task("train", total=info.total_steps, completed=info.step, info="")
        self.progress.start()

    def on_step(self, step: int, losses: dict[str, float], lr: float) -> None:
        if self.progress:
            self.progress.update(self.bar, completed=step, info=" ".join(f"{t}={v:.3f}" for t, v in losses.items()))

    def on_end(self, summary: dict) -> None:
        if self.progress:
            self.progress.stop()


class ProgressLog(Callback):
    """One line every `seconds` or every `fraction` of the steps, whichever comes first, and at the last step:

        step 240/2528 (9%) epoch 0.28 | loss image 0.512 audio 0.733 | 3.9 steps/s, ETA 9m47s | val 0.734 (step 200)

    The losses are each task's mean since the previous line; steps/s is over the same stretch, the ETA from the
    rate since this process started (a resumed run counts from its checkpoint)."""

    def __init__(self, console: Console, seconds: float = 30.0, fraction: float = 0.05,
                 clock: Callable[[], float] = time.monotonic):
        self.console, self.seconds, self.fraction, self.clock = console, seconds, fraction, clock
        self.info: RunInfo | None = None
        self.val: tuple[int, float] | None = None  # (step, headline) of the last validation

    def on_start(self, info: RunInfo) -> None:
        if not info.is_main:
            return
        self.info, self.every = info, max(1, math.ceil(info.total_steps * self.fraction))
        self.started = self.last_time = self.clock()
        self.last_step = info.step
        self.losses: dict[str, list[float]] = {}

    def on_step(self, step: int, losses: dict[str, float], lr: float) -> None:
        if self.info is None:
            return
        for t, v in losses.items():
            self.losses.setdefault(t, []).append(v)
        now = self.clock()
        if now - self.last_time >= self.seconds or step // self.every > self.last_step // self.every \
                or step == self.info.total_steps:
            self.console.print(self.line(step, now), soft_wrap=True, highlight=False, markup=False)
            self.last_time, self.last_step, self.losses = now, step, {}

    def line(self, step: int, now: float) -> str:
        info = self.info
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        overall = (step - info.step) / max(now - self.started, 1e-9)
        eta = (info.total_steps - step) / overall if overall > 0 else float("inf")
        means = {t: sum(self.losses[t]) / len(self.losses[t]) for t in info.tasks if t in self.losses}  # in task order
        losses = " ".join(f"{t} {v:.3f}" for t, v in means.items())
        val = f" | val {self.val[1]:.3f} (step {self.val[0]})" if self.val else ""
        return (f"step {step}/{info.total_steps} ({100 * step // info.total_steps}%) epoch "
                f"{step / info.steps_per_epoch:.2f} | loss {losses} | {rate:.1f} steps/s, ETA {duration(eta)}{val}")

    def on_validation(self, step: int, val: dict[str, float]) -> bool:
        self.val = (step, val["headline"])
        return False


def duration(seconds: float) -> str:
    """4h05m, 9m47s, 12s; "?" when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressFile(Callback):
    """{"step", "total"} in `path` every `every` steps and at the last, and every validation of the run so far in
    validation.json beside it ([{"step", "headline", <metric>: value, ...}], oldest first), each replaced
    atomically: the Prefect flow polls them while torchrun runs (update_progress in flows/artifacts.py). The
    validations travel in each checkpoint, so that a resumed run's table starts with those before its checkpoint."""

    def __init__(self, path: Path, every: int = 10):
        self.path, self.every, self.total = path, every, None
        self.validations: list[dict] = []

    def on_start(self, info: RunInfo) -> None:
        if info.is_main:
            self.total = info.total_steps
            table = self.path.with_name("validation.json")
            if self.validations:  # resumed: those up to its checkpoint, not the rows a kill left past it
                atomic_write_text(table, json.dumps(self.validations))
            else:
                table.unlink(missing_ok=True)  # the last run's: not this one's

    def on_step(self, step: int, losses: dict[str, float], lr: float) -> None:
        if self.total and (step % self.every == 0 or step == self.total):
            atomic_write_text(self.path, json.dumps({"step": step, "total": self.total}))

    def on_validation(self, step: int, val: dict[str, float]) -> bool:
        if self.total:
            self.validations.append({"step": step, **val})
            atomic_write_text(self.path.with_name("validation.json"), json.dumps(self.validations))
        return False

    def state_dict(self) -> dict:
        return {"validations": self.validations} if self.validations else {}

    def load_state_dict(self, state: dict) -> None:
        self.validations = list(state["validations"])
