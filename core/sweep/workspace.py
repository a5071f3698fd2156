"""Where a trial runs, and the repository around it: git and DVC as subprocesses, the check that the repository
can hold experiments, the lock that keeps one sweep process per study, a trial's workspace of its own (made and
removed), the trials' process groups (stopped together), and the promotion of the best trial.

Workspaces of their own, not `dvc exp run -j` or `--temp` in one repository: parallel runs there race on its lock
and index."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from rich.console import Console

from tessera.core.config import SweepConfig
from tessera.core.errors import UserError
from tessera.core.runtime.launch import die_with_parent, run_group, stop_group
from tessera.core.sweep.report import METRICS
from tessera.core.sweep.study import study_folder


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"`git {' '.join(args)}` in {cwd} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout.strip()


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f"`dvc {' '.join(args)}` in {cwd} failed: {(result.stdout + result.stderr)[-2000:]}")
    return result


def check_repository(repo: Path) -> None:
    """What every trial needs of the repository: a commit to branch experiments from, and DVC."""
    if subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=repo, capture_output=True).returncode:
        raise UserError(f"{repo}: tessera sweep needs a git repository with a commit (each trial is a DVC experiment "
                        "of HEAD): `git init`, then commit the project")
    if not (repo / ".dvc").is_dir():
        raise UserError(f"{repo}: tessera sweep needs DVC here (each trial is a DVC experiment): `dvc init`, commit")


@contextlib.contextmanager
def exclusive(repo: Path, cfg: SweepConfig):
    """One sweep process per study at a time: a second would take the first one's running trials for
    interrupted ones."""
    folder = study_folder(repo, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"sweep {cfg.name} is already running in {repo} (its lock: {folder / 'lock'}); wait for "
                            "it, stop it, or give sweep.name another name") from None
        yield


@functools.cache
def cache_dir(repo: Path) -> str:
    """The repository's DVC cache, which every trial's workspace shares (asked once per run: a DVC process)."""
    return dvc(repo, "cache", "dir").stdout.strip()


@contextlib.contextmanager
def workspace(repo: Path, ws: Path):
    """A workspace for one trial, removed however the trial ends (its experiment is then in the repository, its
    output in the log): a `git clone --shared` of the repository at HEAD plus its uncommitted changes (what
    `dvc exp run` in the repository would run), its DVC cache shared, and the data checked out by links (a trial
    reads it, never writes it). A trial with today's params (the baseline) is then up to date: DVC records the
    workspace's own run as its result, as `dvc repro` would, and trains nothing."""
    try:
        ws.parent.mkdir(parents=True, exist_ok=True)
        git(repo, "clone", "-q", "--shared", "--no-checkout", str(repo), str(ws))
        git(ws, "checkout", "-q", "--detach", git(repo, "rev-parse", "HEAD"))
        changed = git(repo, "diff", "--name-only", "--no-renames", "HEAD").splitlines()
        untracked = git(repo, "ls-files", "--others", "--exclude-standard").splitlines()
        for name in changed + untracked:
            if name == str(METRICS):  # an earlier sweep's result is no input of a trial
                continue
            source, dest = repo / name, ws / name
            if source.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest)
            elif not source.exists():
                dest.unlink(missing_ok=True)
        dvc(ws, "cache", "dir", "--local", cache_dir(repo))
        dvc(ws, "config", "--local", "cache.type", "hardlink,symlink,copy")
        dvc(ws, "checkout", "--quiet", check=False)  # what the cache lacks, the trial's stages make
        yield ws
    finally:
        shutil.rmtree(ws, ignore_errors=True)


class TrialProcesses:
    """One sweep run's `dvc exp run` processes, each in a process group of its own: a stopped sweep (SIGTERM,
    Ctrl-C, a cancelled flow run) stops every group and tells Optuna nothing, so that a rerun runs them again.
    A sweep killed outright (SIGKILL) sends each `dvc exp run` SIGTERM (the parent-death signal), but the
    training DVC had started may run on to its end."""

    def __init__(self):
        self.running: set[subprocess.Popen] = set()
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def run(self, cmd: list[str], cwd: Path, env: dict, log: Path) -> int:
        """Runs `cmd` in `cwd` with its output in `log`; its exit status, or -1 when the sweep is stopping."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out, self.lock:
            if self.stopping.is_set():
                return -1
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent if sys.platform == "linux" else None)
            self.running.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.running.discard(proc)

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            procs = list(self.running)
        for proc in procs:
            stop_group(proc)


def promote(repo: Path, experiment: str, console: Console) -> None:
    """The best trial into the workspace (`dvc exp apply`: its params, dvc.lock and outputs), then `dvc repro` of
    what is stale (the stages the trial did not run), so that `dvc repro` reproduces the promoted model."""
    console.print(f"promoting {experiment}: dvc exp apply, then dvc repro")
    dvc(repo, "exp", "apply", experiment)
    code = run_group([sys.executable, "-m", "dvc", "repro"], console, cwd=repo)
    if code:
        raise RuntimeError(f"`dvc repro` after applying {experiment} exited with status {code}; see above")
