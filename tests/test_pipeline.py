"""The DVC pipeline with real `dvc` in a temporary git repository: what runs, what does not, and push / pull."""

import shutil

import pytest
import yaml

from helpers import copy_repo, run


@pytest.mark.slow
def test_fresh_repro_runs_every_stage_and_a_second_runs_nothing(dvc_repo):
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == ["generate", "prepare", "train", "evaluate", "export"]
    for f in ("metrics/train.json", "metrics/eval.json", "metrics/export.json", "reports/eval.md",
              "models/export/image/model.onnx", "models/export/README.md"):
        assert (dvc_repo / f).is_file(), f
    again = run(["dvc", "repro"], dvc_repo)
    assert "Running stage" not in again and "Data and pipelines are up to date" in again
    shown = run(["dvc", "metrics", "show", "--json"], dvc_repo)
    assert "image.accuracy" in shown and "image.onnx_max_abs_diff" in shown


@pytest.mark.slow
def test_an_evaluate_param_reruns_evaluate_and_what_follows_nothing_upstream(dvc_repo, tmp_path):
    repo = copy_repo(dvc_repo, tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["split"] = "val"  # export reads it too: its parity samples come from that split
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["dvc", "repro"], repo)
    assert "Running stage 'evaluate'" in changed and "Running stage 'export'" in changed
    for stage in ("generate", "prepare", "train"):
        assert f"Running stage '{stage}'" not in changed
    assert "on the val split" in (repo / "reports/eval.md").read_text()


@pytest.mark.slow
def test_experiments_override_params_and_show_them(dvc_repo, tmp_path):
    repo = copy_repo(dvc_repo, tmp_path / "repo")
    experiment = run(["dvc", "exp", "run", "-S", "train.epochs=2"], repo)
    assert "Running stage 'train'" in experiment and "Running stage 'prepare'" not in experiment
    assert "train.epochs" in run(["dvc", "exp", "show", "--no-pager", "--csv"], repo)


@pytest.mark.slow
def test_push_then_pull_restores_data_and_checkpoints_after_cache_and_workspace_are_deleted(dvc_repo, tmp_path):
    repo = copy_repo(dvc_repo, tmp_path / "repo")
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], repo)
    run(["dvc", "push"], repo)
    weights = (repo / "models/train/model.safetensors").read_bytes()
    for gone in (".dvc/cache", "data", "models", "reports/eval.md"):
        shutil.rmtree(repo / gone) if (repo / gone).is_dir() else (repo / gone).unlink()
    run(["dvc", "pull"], repo)
    assert (repo / "models/train/model.safetensors").read_bytes() == weights
    assert any((repo / "models/train/checkpoints").iterdir()) and (repo / "data/prepared/image/meta.json").is_file()
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], repo)
