"""The DVC pipeline with real `dvc` in a temporary git repository: what runs, what does not, and push / pull."""

import json
import shutil
import sys

import pytest
import yaml

from helpers import copy_repo, run


@pytest.mark.slow
def test_fresh_repro_runs_every_stage_and_a_second_runs_nothing(dvc_repo):
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == ["generate", "prepare", "pretrain", "train", "evaluate", "export"]
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
    # `tessera pipeline` with no server: the stages DVC finds stale, each through `dvc repro --single-item`
    changed = run([sys.executable, "-m", "tessera.core.entry.cli", "pipeline"], repo, env={"PREFECT_API_URL": ""})
    assert "Running stage 'evaluate'" in changed and "Running stage 'export'" in changed
    assert "ran evaluate, export" in changed
    for stage in ("generate", "prepare", "train"):
        assert f"Running stage '{stage}'" not in changed
    assert "on the val split" in (repo / "reports/eval.md").read_text()


def changes(status: dict, stage: str, kind: str) -> dict:
    """From `dvc status --json`: {path: what changed} of one kind ("changed deps", "changed outs") for a stage."""
    return {path: what for entry in status[stage] if isinstance(entry, dict) for path, what in entry.get(kind, {}).items()}


@pytest.mark.slow
def test_an_experiment_moving_an_output_reruns_from_train_and_dvc_tracks_the_new_folder(dvc_repo, tmp_path):
    """dvc.yaml takes its paths from params.yaml (`${train.out}`): moving train.out makes DVC see the train stage's
    output and the deps of evaluate and export at the new folder. An experiment on top (`dvc exp run -S`) reruns
    train, evaluate and export, not prepare, shows its override in the experiments table, and leaves all up to
    date at the new folder."""
    repo = copy_repo(dvc_repo, tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["out"] = "models/other"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(run(["dvc", "status", "--json"], repo))
    assert set(status) == {"train", "evaluate", "export"}
    assert changes(status, "train", "changed outs") == {"models/other": "deleted"}
    for stage in ("evaluate", "export"):
        assert changes(status, stage, "changed deps")["models/other"] == "deleted"

    ran = run(["dvc", "exp", "run", "-S", "train.epochs=2"], repo)
    assert all(f"Running stage '{s}'" in ran for s in ("train", "evaluate", "export")) and "stage 'prepare'" not in ran
    assert "train.epochs" in run(["dvc", "exp", "show", "--no-pager", "--csv"], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert (repo / "models/other/model.safetensors").is_file()
    for stage, kind in (("train", "outs"), ("evaluate", "deps"), ("export", "deps")):
        paths = [entry["path"] for entry in lock[stage][kind]]
        assert "models/other" in paths and "models/train" not in paths, (stage, paths)
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], repo)


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


def make_own_data(root) -> None:
    """A user's small dataset in three documented formats, made here (not by the default generator): letters drawn
    as an ImageFolder with a test folder, spoken words as tones in a manifest with a split column, and sentences in
    JSONL. No detection, no paired modalities."""
    import json

    import numpy as np
    import soundfile as sf
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for letter in "ABC":
            for i in range(n):
                im = Image.new("L", (16, 16))
                ImageDraw.Draw(im).text((int(rng.integers(0, 6)), int(rng.integers(0, 4))), letter, fill=255)
                (root / "letters" / split / letter).mkdir(parents=True, exist_ok=True)
                im.save(root / "letters" / split / letter / f"{i}.png")
    rows = ["path,label,split"]
    (root / "words").mkdir(parents=True)
    for i in range(48):
        word, hz = [("low", 300.0), ("mid", 900.0), ("high", 2500.0)][i % 3]
        t = np.arange(int(16000 * rng.uniform(0.2, 0.6))) / 16000
        sf.write(root / "words" / f"{i}.wav", 0.3 * np.sin(2 * np.pi * hz * t) + 0.02 * rng.standard_normal(len(t)), 16000)
        rows.append(f"{i}.wav,{word},{['test', 'val', 'train', 'train'][i % 4]}")
    (root / "words/all.csv").write_text("\n".join(rows) + "\n")
    (root / "docs").mkdir()
    (root / "docs/train.jsonl").write_text("".join(
        json.dumps({"text": f"{verb} the {noun} {i}", "label": label}) + "\n"
        for i in range(30) for label, verb, noun in [("install", "install", "package"), ("run", "run", "pipeline")]))


@pytest.mark.slow
def test_your_own_data_is_versioned_by_dvc_and_an_edit_reruns_only_what_depends_on_it(dvc_repo, tmp_path):
    repo = copy_repo(dvc_repo, tmp_path / "repo")
    make_own_data(repo / "data/mine")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["root"] = "data/mine"
    params["prepare"]["sources"] = {
        "image": {"format": "imagefolder", "train": "data/mine/letters/train", "test": "data/mine/letters/test"},
        "audio": {"format": "manifest", "train": "data/mine/words/all.csv"},
        "text": {"format": "jsonl", "train": "data/mine/docs/train.jsonl"}}
    params["prepare"]["val_fraction"] = 0.2
    params["tasks"] = {t: {"inputs": [t]} for t in ("image", "audio", "text")}
    params["train"]["modality_dropout"] = {}  # the default records' fused task is not among the user's
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "add", "data/mine"], repo)
    first = run(["dvc", "repro"], repo)
    assert all(f"Running stage '{s}'" in first for s in ("generate", "prepare", "train", "evaluate", "export"))
    assert [p.name for p in (repo / "data/raw").iterdir()] == ["NOT_GENERATED.md"]  # the digits are not made
    assert (repo / "models/export/text/model.onnx").is_file() and not (repo / "models/export/detection").exists()
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], repo)

    with open(repo / "data/mine/docs/train.jsonl", "a") as f:  # the user adds examples
        f.write('{"text": "install the plugin now", "label": "install"}\n')
    assert "data/mine" in run(["dvc", "status"], repo)
    second = run(["dvc", "repro"], repo)
    assert all(f"Running stage '{s}'" in second for s in ("prepare", "train", "evaluate", "export"))
    assert "Running stage 'generate'" not in second
    counts = yaml.safe_load((repo / "metrics/prepare.json").read_text())
    assert sum(c["in"] for c in counts["text"].values()) == 61

    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], repo)
    run(["dvc", "push"], repo)
    shutil.rmtree(repo / "data/mine")
    shutil.rmtree(repo / ".dvc/cache")
    run(["dvc", "pull"], repo)
    assert sum(1 for _ in open(repo / "data/mine/docs/train.jsonl")) == 61
