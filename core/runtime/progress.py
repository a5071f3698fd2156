"""Progress, where someone watches it: a bar on a terminal, a plain line at a steady rate in a log that is not one
(a file, CI, `dvc repro > log`, a Prefect flow run's log). `Work` counts any stage's work (samples prepared, units
evaluated or exported); training's callbacks add its losses and validations, and write progress.json and
validation.json for the Prefect flow's progress and validation artifacts (update_progress in flows/artifacts.py
reads them). Rank 0 only."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tessera.core.data.files import atomic_write_text
from tessera.core.runtime.callbacks import Callback, RunInfo


def progress_callbacks(console: Console, out: Path) -> list[Callback]:
    """The bar where `console` is a terminal, else log lines; and progress.json in `out`."""
    return [ProgressBar(console) if console.is_terminal else ProgressLog(console), ProgressFile(out / "progress.json")]


class Pace:
    """When a progress line is due: every `seconds`, or each time the count passes another `fraction` of `total`,
    whichever comes first, and at the last. `lap` gives the rate since the previous line and the ETA from the rate
    since the start (of this process: a resumed run counts from its checkpoint), and starts the next stretch."""

    def __init__(self, total: int, done: int = 0, seconds: float = 30.0, fraction: float = 0.05,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.seconds, self.clock = total, seconds, clock
        self.every = max(1, math.ceil(total * fraction))
        self.start = self.last = done
        self.started = self.last_time = clock()

    def due(self, done: int) -> bool:
        return (self.clock() - self.last_time >= self.seconds or done // self.every > self.last // self.every
                or done == self.total)

    def lap(self, done: int) -> tuple[float, float]:
        """(items per second since the previous line, seconds left)."""
        now = self.clock()
        rate = (done - self.last) / max(now - self.last_time, 1e-9)
        overall = (done - self.start) / max(now - self.started, 1e-9)
        self.last, self.last_time = done, now
        return rate, (self.total - done) / overall if overall > 0 else float("inf")

    def count(self, done: int) -> str:
        """240/2528 (9%)"""
        return f"{done}/{self.total} ({100 * done // max(self.total, 1)}%)"


class Work:
    """Counts `total` items of some work (`noun`: sample, unit, ...): rich's bar on a terminal, else a line when
    `Pace` says, naming what the count just passed:

        preparing image 1200/5000 (24%) | 85.3 samples/s, ETA 44s | cats/001.jpg

    A bar shows from `start` (or entering `with`) to `stop`, which reaching the total does too."""

    def __init__(self, console: Console, what: str, total: int, noun: str = "item", done: int = 0, **pace: Any):
        self.console, self.what, self.noun, self.done = console, what, noun, done
        self.pace = Pace(total, done, **pace)
        self.bar: Progress | None = None

    def start(self) -> Work:
        if self.console.is_terminal and self.bar is None:
            self.bar = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[doing]}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self.bar.add_task(self.what, total=self.pace.total, completed=self.done, doing="")
            self.bar.start()
        return self

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> Work:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def update(self, done: int, doing: str = "") -> None:
        """`done` of the total are done, the last being `doing`."""
        self.done = done
        if self.console.is_terminal:
            if self.bar:
                self.bar.update(self.bar.task_ids[0], completed=done, doing=doing)
                if done >= self.pace.total:
                    self.stop()
        elif self.pace.due(done):
            rate, eta = self.pace.lap(done)
            self.console.print(f"{self.what} {self.pace.count(done)} | {speed(rate, self.noun)}, ETA {duration(eta)}"
                               + (f" | {doing}" if doing else ""), soft_wrap=True, highlight=False, markup=False)

    def advance(self, doing: str = "") -> None:
        self.update(self.done + 1, doing)

    def units(self, unit: Callable[..., Any]) -> Callable[..., Any]:
        """`unit` (a core/units.py Unit: not imported, as training does not run it), each unit of work it runs
        counted as one item once done; the bar shows from the first to the last, or to the first that fails."""
        def counted(name: str, fn: Callable[..., Any], *args: Any) -> Any:
            self.start()
            try:
                result = unit(name, fn, *args)
            except BaseException:
                self.stop()
                raise
            self.advance(f"{name} done")
            return result
        return counted


class ProgressBar(Callback):
    """rich's bar: steps done of all, the losses of the last step, time taken and left."""

    def __init__(self, console: Console):
        self.console, self.work = console, None

    def on_start(self, info: RunInfo) -> None:
        if info.is_main:
            self.work = Work(self.console, "training", info.total_steps, "step", info.step).start()

    def on_step(self, step: int, losses: dict[str, float], lr: float) -> None:
        if self.work:
            self.work.update(step, " ".join(f"{t}={v:.3f}" for t, v in losses.items()))

    def on_end(self, summary: dict) -> None:
        if self.work:
            self.work.stop()


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
        self.info, self.pace = info, Pace(info.total_steps, info.step, self.seconds, self.fraction, self.clock)
        self.losses: dict[str, list[float]] = {}

    def on_step(self, step: int, losses: dict[str, float], lr: float) -> None:
        if self.info is None:
            return
        for t, v in losses.items():
            self.losses.setdefault(t, []).append(v)
        if self.pace.due(step):
            self.console.print(self.line(step), soft_wrap=True, highlight=False, markup=False)
            self.losses = {}

    def line(self, step: int) -> str:
        info = self.info
        rate, eta = self.pace.lap(step)
        means = {t: sum(self.losses[t]) / len(self.losses[t]) for t in info.tasks if t in self.losses}  # in task order
        losses = " ".join(f"{t} {v:.3f}" for t, v in means.items())
        val = f" | val {self.val[1]:.3f} (step {self.val[0]})" if self.val else ""
        return (f"step {self.pace.count(step)} epoch {step / info.steps_per_epoch:.2f} | loss {losses} | "
                f"{speed(rate, 'step')}, ETA {duration(eta)}{val}")

    def on_validation(self, step: int, val: dict[str, float]) -> bool:
        self.val = (step, val["headline"])
        return False


def speed(rate: float, noun: str) -> str:
    """3.9 steps/s; 12 s/step below one a second, where a rate would round to 0.0."""
    return f"{rate:.1f} {noun}s/s" if rate >= 1 or rate <= 0 else f"{1 / rate:.0f} s/{noun}"


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
