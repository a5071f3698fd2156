"""Training's curves for DVC: DVCLive logs train/loss_<task> and train/lr at every step and val/<metric> at every
validation under train.out/dvclive (dvc.yaml plots them), on rank 0. Its files travel in each checkpoint, so a
resumed run logs on from the checkpoint's step as if never interrupted.

A new project may have no DVC repository, no git commit, or no git at all: DVCLive then writes its files only, and
training says so once. Left alone, DVCLive would run `dvc init` in a git repository without DVC, and crash on
"Empty git repo" in one without a commit."""

from __future__ import annotations

import shutil
from pathlib import Path

from dvclive import Live
from rich.console import Console

from tessera.core.data.files import atomic_write_text
from tessera.core.runtime.callbacks import Callback, RunInfo


def read_logs(folder: Path) -> dict[str, str]:
    """DVCLive's files under `folder` as {relative path: text}. Each checkpoint stores them: DVCLive appends to its
    TSVs and rewrites metrics.json in place, so a kill leaves them ahead of the checkpoint, or cut mid-write."""
    return {str(f.relative_to(folder)): f.read_text() for f in sorted(folder.rglob("*")) if f.is_file()}


def restore_logs(folder: Path, files: dict[str, str]) -> None:
    """Puts DVCLive's files back as a checkpoint stored them, so the resumed run logs on from that step."""
    shutil.rmtree(folder, ignore_errors=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / name, text)


def what_dvc_lacks() -> str:
    """Why DVC cannot record this run's curves from the working directory (DVCLive opens the DVC repository
    there), or "" when it can: a DVC repository in a git repository with a commit, or in none (`dvc init
    --no-scm`)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import NoSCM

    try:
        repo = Repo()
    except NotDvcRepoError:
        return "this directory is in no DVC repository (`git init`, `dvc init`, then `git commit`)"
    with repo:
        if not isinstance(repo.scm, NoSCM) and repo.scm.no_commits:
            return "its git repository has no commit yet (`git commit`)"
    return ""


class FilesOnlyLive(Live):
    """DVCLive without its repository side: no `dvc init`, no experiment, no Studio; the files under its folder
    are the same."""

    def _init_dvc(self):  # Live.__init__ calls it to open (or create) the DVC repository
        self._dvc_file = "dvc.yaml"  # its default, read only where a dvc.yaml is written (dvcyaml=None: never)


class DVCLiveLogger(Callback):
    """DVCLive's step is the optimizer step: each step's losses, then `next_step`; a validation's metrics land on
    the step it follows."""

    def __init__(self, folder: Path, console: Console | None = None):
        self.folder, self.console, self.live, self.files = folder, console or Console(), None, None

    def load_state_dict(self, state: dict) -> None:
        self.files = state["files"]  # put back in on_start, on rank 0

    def on_start(self, info: RunInfo) -> None:
        if not info.is_main:
            return
        if info.resumed and self.files is not None:
            restore_logs(self.folder, self.files)
        lacks = what_dvc_lacks()
        if lacks:
            self.console.print(f"DVCLive: training curves go to {self.folder} only, not to a DVC experiment: {lacks}",
                               highlight=False, markup=False, soft_wrap=True)
        live = FilesOnlyLive if lacks else Live
        self.live = live(str(self.folder), resume=info.resumed, save_dvc_exp=False, dvcyaml=None, report=None)

    def on_step(self, step: int, losses: dict[str, float], lr: float) -> None:
        if self.live:
            for t, v in losses.items():
                self.live.log_metric(f"train/loss_{t}", v)
            self.live.log_metric("train/lr", lr)
            self.live.next_step()

    def on_validation(self, step: int, val: dict[str, float]) -> bool:
        if self.live:
            for k, v in val.items():
                self.live.log_metric(f"val/{k}", v, plot=True)
        return False

    def state_dict(self) -> dict:
        return {"files": read_logs(self.folder)} if self.live else {}

    def on_end(self, summary: dict) -> None:
        if self.live:
            self.live.end()
