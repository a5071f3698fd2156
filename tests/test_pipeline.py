"""The DVC pipeline with real `dvc` in a temporary git repository: what runs, and what does not."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "generate": {"languages": ["en"], "train_voices": ["", "+m3"], "test_voices": ["+f2"], "audio_takes": 1,
                 "text_per_split": [60, 10], "detection_per_split": [16, 4]},
    "model": {"size": "debug", "embed_dim": 32, "depth": 1, "num_heads": 2, "image": {"img_size": 8, "patch_size": 4},
              "text": {"vocab_size": 300, "max_len": 16}, "audio": {"n_mels": 32, "patch_size": 16, "max_frames": 128},
              "detection": {"img_size": 32, "patch_size": 8, "num_queries": 4, "decoder_depth": 1}},
    "train": {"epochs": 1, "batch_size": 16, "eval_every": 1000, "num_workers": 0},
}


def merge(base: dict, override: dict) -> dict:
    return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in override.items()}}


def run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_dvc_repro_runs_what_is_stale_and_nothing_else(tmp_path):
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("core", "modalities"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run(["git", "init", "-q"], tmp_path)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "empty"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    run(["dvc", "config", "core.analytics", "false"], tmp_path)

    first = run(["dvc", "repro"], tmp_path)
    for stage in ("generate", "prepare", "train"):
        assert f"Running stage '{stage}'" in first
    assert (tmp_path / "metrics/train.json").exists() and (tmp_path / "dvc.lock").exists()

    again = run(["dvc", "repro"], tmp_path)
    assert "Running stage" not in again and "Data and pipelines are up to date" in again

    params["train"]["lr"] = 3e-4  # a train-only knob: train reruns, its inputs do not
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    changed = run(["dvc", "repro"], tmp_path)
    assert "Running stage 'train'" in changed
    assert "Running stage 'generate'" not in changed and "Running stage 'prepare'" not in changed

    run(["git", "add", "-A"], tmp_path)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "baseline"], tmp_path)
    experiment = run(["dvc", "exp", "run", "-S", "train.epochs=2"], tmp_path)
    assert "Running stage 'train'" in experiment and "Running stage 'prepare'" not in experiment
    assert "train.epochs" in run(["dvc", "exp", "show", "--no-pager", "--csv"], tmp_path)
