"""`tessera sweep`: the section refused whole before any trial, overrides as DVC parses them, the search space as
Optuna samples it, the objective's keys as evaluation writes them, and a real sweep (Optuna, DVC experiments,
a Prefect server) run, killed, resumed and promoted."""

import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from rich.console import Console

from tessera.core.config import SearchDim, SweepConfig
from tessera.core.errors import UserError
from tessera.core.runtime.launch import stop_group
from tessera.core.sweep.plan import flat_metrics, plan_sweep
from tessera.core.sweep.pruning import Pruning, from_env, trial_env
from tessera.core.sweep.study import grid, intermediate, load_study, open_journal, suggest
from tessera.core.sweep.trials import logged_curve, overrides, resume, tell
from tessera.core.sweep.workspace import exclusive
from tessera.core.tasks.metrics import reported_metrics
from helpers import ROOT, copy_repo, prefect_server, processes_with, run, tessera, wait_for
from test_records import shop

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {"train.lr": {"low": 1.0e-4, "high": 3.0e-3, "log": True}}


def write(tmp_path: Path, sweep: dict, **train) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sweep"] = {**params["sweep"], **sweep}
    params["train"].update(train)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize("sweep, named", [
    ({"space": {"train.lrr": {"low": 0.1, "high": 1.0}}}, ["sweep.space.train.lrr", "train.lrr: not a known key"]),
    ({"space": {"model.imagee.patch_size": {"choices": [2, 4]}}}, ["sweep.space.model.imagee.patch_size", "imagee"]),
    ({"space": {"train.lr.peak": {"low": 0.1, "high": 1.0}}}, ["sweep.space.train.lr.peak", "train.lr holds a value"]),
    ({"space": {"train.lr": {"low": 0.01, "high": 0.01}}}, ["sweep.space.train.lr", "the range is empty"]),
    ({"space": {"train.lr": {"low": 0.0, "high": 0.01, "log": True}}}, ["sweep.space.train.lr", "log range needs low > 0"]),
    ({"space": {"train.lr": {"choices": []}}}, ["sweep.space.train.lr", "choices is empty"]),
    ({"space": {"train.batch_size": {"low": -8, "high": 64}}}, ["train.batch_size", "must be greater than 0"]),
    ({"space": {"train.batch_size": {"low": 16, "high": 64.0}}}, ["sweep.space.train.batch_size", "valid integer"]),
    ({"space": {"train.weights.audiio": {"low": 0.5, "high": 2.0}}}, ["sweep.space.train.weights.audiio", "audiio"]),
    ({"space": {}}, ["sweep.space is empty"]),
    ({"space": SPACE, "sampler": "grid"}, ["sweep", "grid sampler needs choices or a step", "train.lr"]),
    ({"space": SPACE, "objective": "image.acuracy"}, ["sweep.objective", "'image.acuracy'", "image.accuracy"]),
    ({"space": SPACE, "objective": "val.detection.map_99"}, ["sweep.objective", "val.detection.map_50"]),
    ({"space": SPACE, "objective": "val.image.deletion_auc"}, ["sweep.objective", "val.headline"]),  # held-out only
])
def test_a_bad_sweep_section_is_refused_with_the_key_named(tmp_path, sweep, named):
    with pytest.raises(UserError) as e:
        plan_sweep(write(tmp_path, sweep))
    for part in named:
        assert part in str(e.value), str(e.value)


def test_the_cli_refuses_a_bad_section_or_place_before_any_trial_runs(tmp_path):
    params = write(tmp_path, {"space": {"train.lrr": {"low": 0.1, "high": 1.0}}})
    for args, says in ((["-p", str(params)], "train.lrr"), ([], "tessera sweep needs a git repository"),
                       (["-p", "other.yaml"], "reads the params.yaml of the repository")):
        if not args:
            write(tmp_path, {"space": SPACE})
        result = tessera("sweep", *args, check=False, cwd=tmp_path)
        assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "sweeps").exists()


def test_good_objectives_pick_the_stage_that_writes_them(tmp_path):
    plan = plan_sweep(write(tmp_path, {"space": SPACE, "objective": "val.headline"}))
    assert (plan.target, plan.metrics) == ("train", Path("metrics/train.json"))
    plan = plan_sweep(write(tmp_path, {"space": SPACE, "objective": "align.audio_to_image_r1"}))
    assert (plan.target, plan.metrics) == ("evaluate", Path("metrics/eval.json"))
    for held_out_only in ("robustness.audio+image_accuracy", "image.deletion_auc", "align.audio.deletion_auc_random"):
        assert plan_sweep(write(tmp_path, {"space": SPACE, "objective": held_out_only})).target == "evaluate"


def test_overrides_reach_training_as_the_values_through_dvcs_own_parser(tmp_path):
    """What `dvc exp run -S` does with them (DVC's Hydra override parser writing params.yaml), then params.yaml read
    as every stage reads it: each value arrives with its type, and a key params.yaml lacks is created."""
    from dvc.utils.hydra import apply_overrides

    from tessera.core.config import load_params

    values = {"train.lr": 3.0e-5, "train.warmup_steps": 150, "model.pool": "mean", "train.compile": True,
              "model.image.timm_checkpoint": None, "train.weights.image": 1.5, "model.text.tokenizer": "1e-3",
              "generate.out": "data/my raw: [1], 'q' \"dq\" é", "generate.seed": 7,
              "train.out": "C:\\x\\", "evaluate.out": "a\\\"b\\",
              "pretrain.mask_ratio": 0.75, "pretrain.steps": 400, "pretrain.teacher_decay": 0.999}  # pretraining's keys too
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("timm_checkpoint: null", "timm_checkpoint: x.pth"))
    apply_overrides(str(path), overrides(values))
    params = load_params(path)
    for key, value in values.items():
        node = params
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        assert node == value and type(node) is type(value), (key, node, value)


def fused_params(tmp_path: Path, space: dict, **source) -> Path:
    """A params.yaml whose one task is the fused task `shop` (tests/test_records.py's table), searching `space`."""
    table = tmp_path / "data" / "shop" / "records.csv"
    if not table.exists():
        shop(tmp_path, n=16)
    params = {"prepare": {"root": str(tmp_path / "data"), "sources": {
        "shop": {"format": "records", "train": str(table), "target": "label", **source}}},
        "train": {"tasks": ["shop"], "modality_dropout": {"shop": {"caption": 0.1}}}, "sweep": {"space": space}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_a_fused_tasks_modality_dropout_and_weight_are_searched_and_a_wrong_task_or_input_is_named(tmp_path):
    from dvc.utils.hydra import apply_overrides

    from tessera.core.config import load_params

    space = {"train.modality_dropout.shop.photo": {"low": 0.0, "high": 0.5},
             "train.modality_dropout.shop.table": {"choices": [0.0, 0.3]}, "train.weights.shop": {"low": 0.5, "high": 2.0}}
    path = fused_params(tmp_path, space)
    plan_sweep(path)
    apply_overrides(str(path), overrides({"train.modality_dropout.shop.photo": 0.25, "train.modality_dropout.shop.table": 0.3,
                                          "train.weights.shop": 1.5}))  # what `dvc exp run -S` does with a trial's values
    train = load_params(path).train
    assert train.modality_dropout == {"shop": {"caption": 0.1, "photo": 0.25, "table": 0.3}} and train.weights == {"shop": 1.5}
    for key, columns, says in (
            ("train.modality_dropout.shops.photo", None, "the fused tasks that train are ['shop']"),
            ("train.modality_dropout.shop", None, "as train.modality_dropout.<task>.<input>"),
            ("train.modality_dropout.shop.picture", None, "shop has no input 'picture'; its inputs are ['photo', 'clip', 'caption', 'table']"),
            ("train.modality_dropout.shop.clip", {"photo": "image", "price": "numeric"}, "its inputs are ['photo', 'table']"),
            ("train.weights.shops", None, "the tasks that train are ['shop']")):
        with pytest.raises(UserError) as e:
            plan_sweep(fused_params(tmp_path, {key: {"low": 0.1, "high": 0.5}}, **({"columns": columns} if columns else {})))
        assert f"sweep.space.{key}: " in str(e.value) and says in str(e.value), str(e.value)


def test_a_grid_sweep_stopped_mid_way_resumes_with_its_interrupted_point(tmp_path):
    """Four grid points, the baseline and two points finished, one left running by a kill: the rerun queues that
    point again (Optuna's grid sampler would otherwise end the study as it marks the trial failed) and runs it."""
    path = write(tmp_path, {"name": "g", "space": {"train.lr": {"choices": [1e-3, 3e-3]},
                                                   "train.warmup_steps": {"choices": [0, 100]}},
                            "sampler": "grid", "trials": 9}, lr=1e-3, warmup_steps=100)
    plan, console = plan_sweep(path), Console(file=open(os.devnull, "w"))
    storage = open_journal(tmp_path / "journal.log")
    study = load_study(storage, plan.cfg)
    assert resume(study, storage, plan, tmp_path, console) == 5  # capped: the baseline and four grid points
    asked = [study.ask() for _ in range(4)]
    values = [suggest(t, plan.cfg.space) for t in asked]
    assert values[0] == {"train.lr": 1e-3, "train.warmup_steps": 100}  # the baseline: today's params
    for t, v in zip(asked[:3], values[:3]):
        tell(study, t, {"value": v["train.lr"]})
    storage = open_journal(tmp_path / "journal.log")  # the rerun
    study = load_study(storage, plan.cfg)
    changed = plan_sweep(write(tmp_path, {"name": "g", "space": {"train.lr": {"choices": [1e-3, 3e-3]}}, "sampler": "grid"}))
    with pytest.raises(UserError, match="give sweep.name a new name"):  # another space: another study
        resume(study, storage, changed, tmp_path, console)
    assert resume(study, storage, plan, tmp_path, console) == 2  # the interrupted point and the last one
    interrupted = study.trials[asked[3].number]
    assert interrupted.state.name == "FAIL" and interrupted.user_attrs["interrupted"]
    rerun = study.ask()
    assert suggest(rerun, plan.cfg.space) == values[3] and rerun.user_attrs["rerun_of"] == asked[3].number
    tell(study, rerun, {"value": 0.5})
    last = study.ask()
    suggest(last, plan.cfg.space)
    tell(study, last, {"value": 0.6})
    points = {(t.params["train.lr"], t.params["train.warmup_steps"]) for t in study.trials[1:] if t.state.name == "COMPLETE"}
    assert points == {(a, b) for a in (1e-3, 3e-3) for b in (0, 100)}


def test_the_sampled_values_keep_to_the_space_and_the_grid_lists_every_point():
    space = {"lr": SearchDim(low=1e-5, high=1e-2, log=True), "warmup": SearchDim(low=0, high=400, step=50),
             "drop": SearchDim(low=0.0, high=0.3, step=0.1), "pool": SearchDim(choices=["cls", "mean"]),
             "depth": SearchDim(low=2, high=6)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [suggest(study.ask(), space) for _ in range(200)]
    assert all(1e-5 <= d["lr"] <= 1e-2 and d["warmup"] in range(0, 401, 50) and d["pool"] in ("cls", "mean")
               and isinstance(d["depth"], int) and 2 <= d["depth"] <= 6 for d in drawn)
    assert sum(d["lr"] < 1e-4 for d in drawn) > 40  # log scale: a third of draws below 1e-4, not 1 %
    assert {round(d["drop"], 6) for d in drawn} == {0.0, 0.1, 0.2, 0.3}
    points = grid(space | {"lr": SearchDim(choices=[1e-3, 1e-4])})
    assert points["warmup"] == list(range(0, 401, 50)) and points["drop"] == [0.0, 0.1, 0.2, 0.3]
    assert points["depth"] == [2, 3, 4, 5, 6] and points["lr"] == [1e-3, 1e-4]
    study.enqueue_trial({"lr": 0.5}, user_attrs={"fixed": ["lr"]})  # the baseline: today's value, even out of range
    assert suggest(study.ask(), space) == {"lr": 0.5}


def test_a_reused_runs_logged_curve_reports_in_the_studys_direction(tmp_path):
    val = tmp_path / "dvclive/plots/metrics/val"
    (val / "image.accuracy.tsv").parent.mkdir(parents=True)
    (val / "image.accuracy.tsv").write_text("step\timage.accuracy\n20\t0.25\n40\t0.5\n")
    (val / "headline.tsv").write_text("step\theadline\n20\t0.3\n40\t0.6\n")
    curve = logged_curve(tmp_path / "dvclive")
    assert curve == {20: {"image.accuracy": 0.25, "headline": 0.3}, 40: {"image.accuracy": 0.5, "headline": 0.6}}
    up, down = optuna.create_study(direction="maximize"), optuna.create_study(direction="minimize")
    assert intermediate(up, SweepConfig(objective="image.accuracy"), curve[40]) == 0.5
    assert intermediate(up, SweepConfig(objective="val.headline"), curve[40]) == 0.6
    assert intermediate(up, SweepConfig(objective="image.deletion_auc"), curve[40]) == 0.6  # held-out only: headline
    assert intermediate(down, SweepConfig(objective="image.deletion_auc", direction="minimize"), curve[40]) == -0.6


def test_the_pruning_callback_reports_to_the_trial_the_sweep_asked_and_stops_it_on_the_pruners_word(tmp_path, monkeypatch):
    """The sweep asks a trial and launches training with `trial_env`; training builds the callback from
    TESSERA_CALLBACKS in its own process (another journal reader, here another storage object on the same file).
    With one finished trial at 0.9 and the median pruner, a trial at 0.1 is stopped at its first validation past the
    warmup, every report lands in the journal, and the trial records where it stopped."""
    cfg = SweepConfig(name="p", space=SPACE, objective="image.accuracy",
                      pruner={"kind": "median", "startup_trials": 1, "warmup_steps": 20})
    journal = tmp_path / "sweeps/p/journal.log"
    study = load_study(open_journal(journal), cfg)
    finished_trial = study.ask()
    for step in (10, 20, 30):
        finished_trial.report(0.9, step)
    tell(study, finished_trial, {"value": 0.9})
    asked = study.ask()
    study.ask()  # a trial in parallel, asked later: the callback must find its own by number
    env = trial_env(journal, cfg, asked.number)
    assert env["TESSERA_CALLBACKS"].split(",")[-1] == "tessera.core.sweep.pruning:from_env"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    module, factory = env["TESSERA_CALLBACKS"].split(",")[-1].split(":")  # as training loads it
    callback = getattr(importlib.import_module(module), factory)(None)
    callback.on_start(SimpleNamespace(is_main=True, rank=0))
    assert [callback.on_validation(step, {"image.accuracy": 0.1, "headline": 0.1}) for step in (10, 20)] == [False, True]
    told = next(t for t in study.get_trials(deepcopy=False) if t.number == asked.number)
    assert told.intermediate_values == {10: 0.1, 20: 0.1} and told.user_attrs["pruned_at"] == 20
    assert callback.key != Pruning(journal, cfg, asked.number + 1).key  # a trial resumes only its own checkpoints


def test_the_pruning_callback_outside_a_sweep_says_what_is_missing(monkeypatch):
    monkeypatch.delenv("TESSERA_SWEEP_TRIAL", raising=False)
    with pytest.raises(UserError, match="only a sweep's trial can use"):
        from_env(None)


def test_a_second_sweep_of_the_same_study_is_refused_while_the_first_holds_the_lock(tmp_path):
    cfg = SweepConfig(name="s")
    with exclusive(tmp_path, cfg):
        with pytest.raises(UserError, match="sweep s is already running"):
            with exclusive(tmp_path, cfg):
                pass
    with exclusive(tmp_path, cfg):  # released with the first
        pass


def test_the_results_name_the_best_trial_and_the_baseline_and_draw_without_pyplot(tmp_path):
    """Three trials (a good one, the baseline, a pruned one) and a failed one, written as a sweep writes them,
    in a fresh interpreter: the summary, the table, the page and the picture, drawn without pyplot (which would
    pick a backend for the whole process)."""
    code = f"""
import json, sys
from pathlib import Path
import optuna
from tessera.core.config import SweepConfig
from tessera.core.sweep.report import write_results

cfg = SweepConfig(name="r", space={SPACE!r}, objective="image.accuracy")
study = optuna.create_study(direction="maximize")
PRUNED, FAIL = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL
for value, attrs, state in ((0.8, {{}}, None), (0.5, {{"baseline": True}}, None), (0.2, {{"pruned_at": 40}}, PRUNED),
                            (None, {{}}, FAIL)):
    trial = study.ask()
    trial.suggest_float("train.lr", 1e-4, 3e-3, log=True)
    for k, v in {{"objective": value, "experiment": f"r-{{trial.number}}", "seconds": 1.0, **attrs}}.items():
        trial.set_user_attr(k, v)
    study.tell(trial, value if state is None else None, state=state)
results = write_results(study, cfg, Path({str(tmp_path)!r}))
print(json.dumps(results["summary"]))
assert "matplotlib.pyplot" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["best"]["trial"] == 0 and summary["best"]["experiment"] == "r-0" and summary["best"]["value"] == 0.8
    assert summary["baseline"] == {"trial": 1, "value": 0.5}  # a rerun baseline need not be trial 0
    assert summary["trials"] == {"complete": 2, "pruned": 1, "failed": 1, "interrupted": 0}
    assert json.loads((tmp_path / "metrics/sweep.json").read_text()) == summary
    rows = (tmp_path / "reports/sweep/trials.csv").read_text().splitlines()
    assert rows[0] == "trial,state,objective,pruned_at,seconds,experiment,train.lr,baseline" and len(rows) == 5
    assert rows[3].startswith("2,pruned,0.2,40,")
    assert "`dvc exp apply r-0`" in (tmp_path / "reports/sweep/sweep.md").read_text()
    assert (tmp_path / "reports/sweep/sweep.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_objectives_known_before_a_run_are_the_keys_the_run_writes(run):
    """What plan_sweep accepts as an objective is exactly what a trial reads back from the stage's metrics."""
    params = yaml.safe_load((run / "params.yaml").read_text())
    tasks, pairs = ["image", "audio", "text", "detection"], {"align": tuple(params["train"]["align"])}
    held_out = flat_metrics(json.loads((run / "eval.json").read_text()), "evaluate")
    assert set(held_out) == reported_metrics(tasks, pairs, held_out=True)
    trained = flat_metrics(json.loads((run / "metrics.json").read_text()), "train")
    assert {k for k in trained if k.startswith("val.")} == {f"val.{k}" for k in reported_metrics(tasks, pairs, False) | {"headline"}}


def experiments(repo: Path) -> dict:
    """`dvc exp show --json`: experiment name -> its params and metrics."""
    out = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo, capture_output=True,
                         text=True, check=True).stdout
    return {e["revs"][0]["name"]: e["revs"][0]["data"] for row in json.loads(out) for e in row.get("experiments") or []
            if e["revs"][0].get("name")}


def table_artifact(api: str, key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no {key} artifact"
    data = found[-1].data
    return json.loads(data) if isinstance(data, str) else data


def trials_of(journal: Path, name: str) -> list:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def finished(trials) -> list:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]


@pytest.mark.slow
def test_a_sweep_runs_two_trials_at_once_prunes_resumes_after_a_kill_and_promotes_the_best(dvc_repo, tmp_path):
    """Four trials, two at once, on a real Prefect server. params.yaml starts deliberately bad (lr 1e-4) and is
    reproduced but not committed: trial 0 is that run (DVC reuses it; its logged curve feeds the pruner), and
    every trial takes the uncommitted change. Random draws with seed 6 give trials 1-3 lr 3e-3, 3e-3, 1e-7 (checked
    below): the last cannot learn, and the median pruner stops it against the finished trials."""
    repo = copy_repo(dvc_repo, tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tasks"] = {"image": {"inputs": ["image"]}}
    params["train"].update({"modality_dropout": {}, "epochs": 3, "eval_every": 20, "warmup_steps": 10, "lr": 1.0e-4})
    params["sweep"] = {"name": "t", "space": {"train.lr": {"choices": [3.0e-3, 1.0e-7]}}, "objective": "image.accuracy",
                       "trials": 4, "parallel": 2, "sampler": "random", "seed": 6,
                       "pruner": {"kind": "median", "startup_trials": 1, "warmup_steps": 40}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=6))
    assert [draws.ask().suggest_categorical("train.lr", [3.0e-3, 1.0e-7]) for _ in range(3)] == [3.0e-3, 3.0e-3, 1.0e-7]
    run(["dvc", "repro"], repo)
    baseline = json.loads((repo / "metrics/eval.json").read_text())["image.accuracy"]
    journal = repo / "sweeps/t/journal.log"
    cmd = [sys.executable, "-m", "tessera.core.entry.cli", "sweep"]
    with prefect_server(tmp_path / "prefect") as env:
        log = open(tmp_path / "first.log", "w")
        first = subprocess.Popen(cmd, cwd=repo, env={**env, "OMP_NUM_THREADS": "1"}, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: journal.exists() and len(finished(trials_of(journal, "t"))) >= 3, 300,
                     "three finished trials", every=0.5)
            before = {t.number: (t.state.name, t.value, t.datetime_complete) for t in finished(trials_of(journal, "t"))}
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=60)
        finally:
            stop_group(first)
        assert len(before) == 3, (before, (tmp_path / "first.log").read_text()[-3000:])
        assert not processes_with("exp run --name t-"), "a trial outlived the stopped sweep"
        second = subprocess.run(cmd, cwd=repo, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        out = second.stdout
        assert second.returncode == 0, out[-3000:]
        assert "was interrupted: queued again" in out and "3 of 4 trials done, 1 to run" in out, out[-3000:]

        trials = trials_of(journal, "t")
        done = finished(trials)
        assert len(done) == 4 and sum(t.state.name == "PRUNED" for t in done) >= 1, [(t.number, t.state) for t in trials]
        for t in trials:  # the interrupted trial ran again with its own values
            if t.user_attrs.get("interrupted"):
                assert next(r for r in done if r.user_attrs.get("rerun_of") == t.number).params == t.params
        for t in done:  # finished before the kill: not run again
            if t.number in before:
                assert before[t.number] == (t.state.name, t.value, t.datetime_complete)
        started = [line for line in out.splitlines() if " started: " in line]
        assert len(started) == 1 and not any(f"trial {n} " in started[0] for n in before), started
        spans = [(t.datetime_start, t.datetime_complete) for t in done if t.number != 0]
        assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), "never two at once"

        # every trial is an experiment with its own params and metrics: no two trials wrote over each other
        shown = experiments(repo)
        for t in done:
            exp = shown[f"t-{t.number}"]
            lr = exp["params"]["params.yaml"]["data"]["train"]["lr"]
            assert lr == t.params.get("train.lr", 1.0e-4)
            assert exp["metrics"]["metrics/eval.json"]["data"]["image.accuracy"] == pytest.approx(t.user_attrs["objective"])
            if t.state.name == "PRUNED":  # its training stopped there: fewer than the 240 steps of 3 epochs
                assert exp["metrics"]["metrics/train.json"]["data"]["steps"] == t.user_attrs["pruned_at"] < 240
        baseline_trial = next(t for t in done if t.number == 0)
        assert baseline_trial.user_attrs["objective"] == pytest.approx(baseline) and baseline_trial.intermediate_values

        summary = json.loads((repo / "metrics/sweep.json").read_text())
        best = summary["best"]
        assert best["value"] > baseline + 0.1 and summary["baseline"]["value"] == pytest.approx(baseline)
        assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 4
        rows = (repo / "reports/sweep/trials.csv").read_text().splitlines()
        assert rows[0].startswith("trial,state,objective") and len(rows) == 1 + len(trials)
        assert (repo / "reports/sweep/sweep.png").stat().st_size > 10_000
        assert len(table_artifact(env["PREFECT_API_URL"], "sweep-trials")) == len(trials)

        promoted = subprocess.run(cmd + ["--promote"], cwd=repo, env={**env, "OMP_NUM_THREADS": "1"},
                                  capture_output=True, text=True)
        assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == best["params"]["train.lr"]
    assert json.loads((repo / "metrics/eval.json").read_text())["image.accuracy"] == pytest.approx(best["value"])
    assert "up to date" in run(["dvc", "status"], repo)
