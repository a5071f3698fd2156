"""Training's callbacks: progress lines at the rate they promise, progress.json, DVCLive's files through a
checkpoint, callbacks named in TESSERA_CALLBACKS (seen at each validation, stopping every rank, keeping their
runs' checkpoints apart), and one message for a wrong entry."""

import io
import json
import subprocess
from pathlib import Path

import pytest
import torch
from rich.console import Console

from helpers import ROOT, tessera, write_params
from tessera.core.config import load_params, parse_params
from tessera.core.errors import UserError
from tessera.core.runtime.callbacks import Callback, Callbacks, RunInfo, from_env
from tessera.core.runtime.checkpoint import CheckpointManager
from tessera.core.runtime.dvclive_logger import DVCLiveLogger, read_logs
from tessera.core.runtime.progress import ProgressBar, ProgressFile, ProgressLog, Work, progress_callbacks
from tessera.core.stages.train import train_model
from tessera.core.units import plain


def info(total: int, step: int = 0, is_main: bool = True, out: Path = Path("."), resumed: bool = False) -> RunInfo:
    return RunInfo(total_steps=total, step=step, steps_per_epoch=total // 4, tasks=["a", "b"], is_main=is_main,
                   rank=0 if is_main else 1, world=2, out=out, resumed=resumed)


def printed_steps(seconds_per_step: float, total: int = 1000, is_main: bool = True) -> tuple[list[int], list[str]]:
    """The steps after which a ProgressLog printed, its clock advancing `seconds_per_step` per step; its lines."""
    now = [0.0]
    out = io.StringIO()
    log = ProgressLog(Console(file=out, width=40), clock=lambda: now[0])
    log.on_start(info(total, is_main=is_main))
    steps = []
    for step in range(1, total + 1):
        now[0] += seconds_per_step
        before = out.getvalue().count("\n")
        log.on_step(step, {"b": float(step), "a": 0.5}, 1e-3)  # in the order drawn
        if out.getvalue().count("\n") > before:
            steps.append(step)
        if step == 100:
            log.on_validation(step, {"a.accuracy": 0.7, "headline": 0.625})
    return steps, out.getvalue().splitlines()


def test_progress_lines_come_every_5_percent_or_every_30_seconds_whichever_is_first():
    fast, lines = printed_steps(0.1)  # 5% = 50 steps = 5 s: the step count rules
    assert fast == list(range(50, 1001, 50))
    assert lines[1] == "step 100/1000 (10%) epoch 0.40 | loss a 0.500 b 75.500 | 10.0 steps/s, ETA 1m30s"
    assert lines[2] == "step 150/1000 (15%) epoch 0.60 | loss a 0.500 b 125.500 | 10.0 steps/s, ETA 1m25s | val 0.625 (step 100)"
    slow, lines = printed_steps(1.0)  # 50 steps = 50 s: every 30 s, and at each 5% as well
    assert slow[:5] == [30, 50, 80, 100, 130] and slow[-1] == 1000
    assert all(b - a <= 30 for a, b in zip([0] + slow, slow))
    assert lines[0] == "step 30/1000 (3%) epoch 0.12 | loss a 0.500 b 15.500 | 1.0 steps/s, ETA 16m10s"  # one line each
    assert printed_steps(0.1, is_main=False) == ([], [])  # rank 0 alone prints


def test_a_terminal_gets_the_bar_and_anything_else_the_lines(tmp_path):
    screen = io.StringIO()
    bar, file = progress_callbacks(Console(file=screen, force_terminal=True, width=120), tmp_path)
    assert isinstance(bar, ProgressBar) and isinstance(file, ProgressFile)
    assert isinstance(progress_callbacks(Console(file=io.StringIO()), tmp_path)[0], ProgressLog)
    bar.on_start(info(40, step=10))  # resumed at step 10
    for step in range(11, 41):
        bar.on_step(step, {"a": 0.25}, 0.0)
    bar.on_end({})
    assert "40/40" in screen.getvalue() and "a=0.250" in screen.getvalue()


def test_any_stages_work_prints_the_same_lines_naming_what_it_just_did():
    """Work (a stage's samples or units) keeps training's pace: every 5% or 30 s, the rate and ETA, what the count
    just passed; below one item a second, seconds per item."""
    now, out = [0.0], io.StringIO()
    work = Work(Console(file=out, width=40), "preparing image", 200, "sample", clock=lambda: now[0])
    for i in range(1, 201):
        now[0] += 0.1
        work.advance(f"cats/{i:03d}.jpg")
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 and lines[0] == "preparing image 10/200 (5%) | 10.0 samples/s, ETA 19s | cats/010.jpg"
    assert lines[-1] == "preparing image 200/200 (100%) | 10.0 samples/s, ETA 0s | cats/200.jpg"
    now, out = [0.0], io.StringIO()
    units = Work(Console(file=out, width=40), "evaluating", 3, "unit", clock=lambda: now[0]).units(plain)
    for name in ("metrics image", "explain image"):
        now[0] += 40.0
        units(name, lambda: None)
    assert out.getvalue().splitlines() == ["evaluating 1/3 (33%) | 40 s/unit, ETA 1m20s | metrics image done",
                                           "evaluating 2/3 (66%) | 40 s/unit, ETA 40s | explain image done"]


def test_a_stages_bar_on_a_terminal_ends_with_its_last_unit_or_its_first_failure():
    screen = io.StringIO()
    work = Work(Console(file=screen, force_terminal=True, width=120), "exporting", 2, "task")
    units = work.units(plain)
    assert units("export a", lambda x: x + 1, 1) == 2 and work.bar is not None
    units("export b", lambda: None)
    assert work.bar is None and "exporting" in screen.getvalue() and "2/2" in screen.getvalue()

    def fails():
        raise ValueError("no")
    work = Work(Console(file=io.StringIO(), force_terminal=True), "exporting", 2, "task")
    with pytest.raises(ValueError):
        work.units(plain)("export a", fails)
    assert work.bar is None  # stopped: rich's refresh thread does not outlive the stage


def test_progress_json_holds_step_and_total_every_ten_steps_and_at_the_last(tmp_path):
    progress = ProgressFile(tmp_path / "progress.json")
    progress.on_start(info(25))
    seen = []
    for step in range(1, 26):
        progress.on_step(step, {}, 0.0)
        seen.append(json.loads((tmp_path / "progress.json").read_text()) if (tmp_path / "progress.json").exists() else None)
    assert seen[8] is None and seen[9] == {"step": 10, "total": 25} and seen[23] == {"step": 20, "total": 25}
    assert seen[24] == {"step": 25, "total": 25}


def test_validation_json_holds_every_validation_of_the_run_so_far(tmp_path):
    (tmp_path / "validation.json").write_text("[{\"step\": 99}]")  # a previous run's
    progress = ProgressFile(tmp_path / "progress.json")
    progress.on_start(info(25))
    assert not (tmp_path / "validation.json").exists()
    progress.on_validation(10, {"a.accuracy": 0.5, "headline": 0.5})
    progress.on_validation(20, {"a.accuracy": 0.75, "headline": 0.75})
    assert json.loads((tmp_path / "validation.json").read_text()) == [
        {"step": 10, "a.accuracy": 0.5, "headline": 0.5}, {"step": 20, "a.accuracy": 0.75, "headline": 0.75}]
    other_rank = ProgressFile(tmp_path / "rank1" / "progress.json")
    other_rank.on_start(info(25, is_main=False))
    other_rank.on_validation(10, {"headline": 0.5})
    assert not (tmp_path / "rank1").exists()


def test_validation_json_after_a_resume_holds_every_validation_up_to_the_checkpoint(tmp_path):
    """Validations at steps 10 and 20, a checkpoint at 20, one more at 30 before a kill: the resumed run's table
    starts with 10 and 20 (from the checkpoint), not 30, and goes on from there."""
    first = Callbacks([ProgressFile(tmp_path / "progress.json")])
    first.on_start(info(50))
    first.on_validation(10, {"headline": 0.5})
    first.on_validation(20, {"headline": 0.6})
    ckpt = CheckpointManager(tmp_path / "checkpoints", keep_last=1)
    ckpt.save(20, {"w": torch.zeros(1)}, {"callbacks": first.state_dict()}, {})
    first.on_validation(30, {"headline": 0.7})  # past the checkpoint: the kill loses it, and the rerun redoes it

    resumed = Callbacks([ProgressFile(tmp_path / "progress.json")])
    resumed.load_state_dict(ckpt.load_latest()[1]["callbacks"])
    resumed.on_start(info(50, step=20, resumed=True))
    table = lambda: [row["step"] for row in json.loads((tmp_path / "validation.json").read_text())]  # noqa: E731
    assert table() == [10, 20]
    resumed.on_validation(30, {"headline": 0.7})
    assert table() == [10, 20, 30]


def log_steps(logger: DVCLiveLogger, steps: range, validate_every: int = 2) -> None:
    for step in steps:
        logger.on_step(step, {"a": 1.0 / step}, 0.1 * step)
        if step % validate_every == 0:
            logger.on_validation(step, {"a.accuracy": step / 10, "headline": step / 10})


def test_dvclive_files_come_back_from_a_checkpoint_as_if_never_interrupted(tmp_path):
    """A run logs steps 1-6; another is checkpointed at step 4, logs on to 5 (ahead of its checkpoint, as a kill
    would leave it), and is resumed from the checkpoint: its files end as the uninterrupted run's."""
    straight = DVCLiveLogger(tmp_path / "straight")
    straight.on_start(info(6))
    log_steps(straight, range(1, 7))
    straight.on_end({})

    first = Callbacks([DVCLiveLogger(tmp_path / "killed")])
    first.on_start(info(6))
    log_steps(first.callbacks[0], range(1, 5))
    ckpt = CheckpointManager(tmp_path / "checkpoints", keep_last=1)
    ckpt.save(4, {"w": torch.zeros(1)}, {"callbacks": first.state_dict()}, {})
    log_steps(first.callbacks[0], range(5, 6))

    resumed = Callbacks([DVCLiveLogger(tmp_path / "killed")])
    resumed.load_state_dict(ckpt.load_latest()[1]["callbacks"])
    resumed.on_start(info(6, step=4, resumed=True))
    log_steps(resumed.callbacks[0], range(5, 7))
    resumed.on_end({})
    assert read_logs(tmp_path / "killed") == read_logs(tmp_path / "straight")
    assert "val/a.accuracy.tsv" in " ".join(read_logs(tmp_path / "straight"))


def test_every_callback_sees_each_validation_whichever_asks_to_stop():
    class Vote(Callback):
        def __init__(self, stop: bool):
            self.stop, self.seen = stop, []

        def on_validation(self, step: int, val: dict[str, float]) -> bool:
            self.seen.append(step)
            return self.stop

    votes = [Vote(True), Vote(False)]
    assert Callbacks(votes).on_validation(2, {"headline": 0.5}) is True
    assert [v.seen for v in votes] == [[2], [2]]
    assert Callbacks([Vote(False), Vote(False)]).on_validation(2, {"headline": 0.5}) is False


def probe_params(data_dir: Path, out: Path, **train) -> Path:
    return write_params(data_dir, out, tasks=["image"], align=[], eval_every=2, patience=1000, keep_last=1000, **train)


def probed(out: Path, rank: int = 0) -> dict:
    return json.loads((out / "train" / f"probe-{rank}.json").read_text())


def test_a_callbacks_key_keeps_its_runs_checkpoints_apart(data_dir, tmp_path, monkeypatch):
    """A run resumes checkpoints of the same callback keys only: a rerun with the key it had takes up the finished
    run's last checkpoint (and trains nothing), one with another key starts from step 0."""
    monkeypatch.setenv("TESSERA_CALLBACKS", "callback_probe:from_env")
    params = load_params(probe_params(data_dir, tmp_path, epochs=0.5))
    console, runs = Console(file=io.StringIO(), width=200), []
    for key in ("trial 1", "trial 1", "trial 2"):
        monkeypatch.setenv("PROBE_KEY", key)
        train_model(params, console)
        runs.append(probed(tmp_path))
    first, again, other = runs
    assert not first["resumed"] and first["steps"][0] == 1 and first["end"] == first["total"] > 2
    assert again["resumed"] and again["start"] == first["total"] and again["steps"] == []
    assert not other["resumed"] and other["steps"][0] == 1 and other["end"] == other["total"]
    assert "made with other training settings" in console.file.getvalue()


def test_a_callback_named_in_tessera_callbacks_sees_each_validation_and_stops_the_run_there(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CALLBACKS", "callback_probe:from_env")
    monkeypatch.setenv("PROBE_STOP_AT", "4")
    summary = train_model(load_params(probe_params(data_dir, tmp_path, epochs=1)), Console(file=io.StringIO()))
    seen = probed(tmp_path)
    assert seen["total"] > 6 and [s for s, _ in seen["validations"]] == [2, 4]
    assert seen["steps"] == [1, 2, 3, 4] and seen["end"] == summary["steps"] == 4
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_a_callback_that_stops_on_rank_0_alone_stops_every_rank_at_that_step(data_dir, tmp_path, monkeypatch):
    """Real torchrun, 2 processes: the probe asks to stop on rank 0 only; both ranks stop after the same
    validation, having seen the same ones, and the run ends (no rank left waiting in a collective)."""
    monkeypatch.setenv("TESSERA_CALLBACKS", "callback_probe:from_env")
    monkeypatch.setenv("PROBE_STOP_AT", "4")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    tessera("train", "-p", str(probe_params(data_dir, tmp_path, epochs=1)), "--nproc-per-node", "2", timeout=300)
    ranks = [probed(tmp_path, rank) for rank in (0, 1)]
    assert [[s for s, _ in r["validations"]] for r in ranks] == [[2, 4], [2, 4]]
    assert [r["end"] for r in ranks] == [4, 4] and ranks[0]["total"] > 6
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 4


def test_a_wrong_tessera_callbacks_entry_is_one_message_naming_the_variable(tmp_path):
    params = parse_params({"train": {"out": str(tmp_path / "train")}})
    for spec, says in (("callback_probe", "is not module:factory"), ("no_such_module:f", "no module no_such_module"),
                       ("callback_probe:nothing", "has no function nothing")):
        with pytest.raises(UserError, match=f"TESSERA_CALLBACKS: .*{says}.*module:factory"):
            from_env(params, spec)
    assert [type(c).__name__ for c in from_env(params, " callback_probe:from_env, ")] == ["Probe"]



def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.parametrize("repository", ["none", "git without a commit", "git without dvc", "dvc with a commit"])
def test_dvclive_writes_its_files_in_any_directory_says_once_what_dvc_cannot_record_and_never_inits_dvc(
        tmp_path, monkeypatch, repository):
    if repository != "none":
        git("init", "-q", cwd=tmp_path)
    if repository == "dvc with a commit":
        subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    if repository in ("git without dvc", "dvc with a commit"):
        git("commit", "-q", "--allow-empty", "-m", "first", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)  # DVCLive opens the repository of the working directory, as in a training process
    printed = io.StringIO()
    logger = DVCLiveLogger(tmp_path / "train/dvclive", Console(file=printed, width=200))
    logger.on_start(info(4))
    log_steps(logger, range(1, 5))
    logger.on_end({})
    assert (tmp_path / "train/dvclive/plots/metrics/val/a.accuracy.tsv").exists()
    lines = printed.getvalue().splitlines()
    if repository == "dvc with a commit":
        assert lines == []
    else:
        assert len(lines) == 1 and "not to a DVC experiment" in lines[0], lines
        assert not (tmp_path / ".dvc").exists()
