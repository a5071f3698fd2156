"""params.yaml parsing and the command line's handling of a user's mistakes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pydantic import BaseModel

from tessera.core.config import BOUNDS, Params, load_params, parse_params
from tessera.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_parse_and_override_the_size():
    params = load_params(ROOT / "params.yaml")
    b = params.model.backbone()
    assert (b.embed_dim, b.depth, b.num_heads) == (params.model.embed_dim, params.model.depth, params.model.num_heads)
    assert {"image", "audio", "text", "detection", "scenes"} <= set(params.train.tasks)  # scenes: the fused records
    assert params.prepare.sources["scenes"].format == "records" and set(params.train.modality_dropout) == {"scenes"}
    tiny = parse_params({"model": {"size": "tiny"}}).model.backbone()
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads) == (192, 12, 3)
    assert parse_params({"model": {"size": "base", "depth": 2}}).model.backbone().embed_dim == 768


@pytest.mark.parametrize("raw,needle", [
    ({"model": {"image": {"patch_sze": 4}}}, "p.yaml: model.image.patch_sze: not a known key"),
    ({"model": {"size": "huge"}}, "p.yaml: model.size: must be 'debug', 'tiny', 'small' or 'base'"),
    ({"model": {"embed_dim": 100, "num_heads": 3}}, "embed_dim=100 must be a multiple of num_heads=3"),
    ({"model": {"image": {"img_size": 30, "patch_size": 4}}}, "model.image.img_size: img_size=30 must be a multiple of patch_size=4"),
    ({"train": {"patience": -5}}, "p.yaml: train.patience: must be greater than 0 (got -5)"),
    ({"train": {"lr": -1}}, "p.yaml: train.lr: must be greater than 0 (got -1)"),
    ({"train": {"warmup_steps": -1}}, "p.yaml: train.warmup_steps: must be greater than or equal to 0 (got -1)"),
    ({"serve": {"max_audio_seconds": 0}}, "p.yaml: serve.max_audio_seconds: must be greater than 0 (got 0)"),
    ({"prepare": {"max_image_pixels": -1}}, "p.yaml: prepare.max_image_pixels: must be greater than 0 (got -1)"),
    ({"serve": {"max_seconds": 30}}, "p.yaml: serve.max_seconds: renamed: call it serve.max_audio_seconds (got 30)"),
    ({"prepare": {"val_fraction": 0.5, "test_fraction": 0.5}}, "p.yaml: prepare.val_fraction: val_fraction=0.5 and "
     "test_fraction=0.5 must sum to less than 1"),
    ({"prepare": {"audio_rates": [8000, 4000]}}, "p.yaml: prepare.audio_rates: audio_rates must be a [low, high] range"),
    ({"orchestrate": {"schedules": {"train": {}}}}, "p.yaml: orchestrate.schedules.train: give a schedule either"),
    ({"prepare": {"root": "data/raw/mine"}}, "p.yaml: prepare.root: prepare.root='data/raw/mine' lies inside generate.out"),
    ({"prepare": {"root": "data/mine", "sources": {"text": {"format": "jsonl", "train": "elsewhere/t.jsonl"}}}},
     "p.yaml: prepare.sources.text.train: sources.text.train='elsewhere/t.jsonl' lies outside prepare.root"),
    ({"model": {"audio": {"n_mels": 60}}}, "n_mels=60 must be a multiple of patch_size=16"),
    ({"model": {"detection": {"img_size": 16, "patch_size": 8, "num_queries": 5}}},
     "model.detection.num_queries: num_queries=5 must lie in 1..4"),
])
def test_bad_values_name_the_file_the_key_and_the_problem(raw, needle):
    with pytest.raises(UserError) as e:
        parse_params(raw, "p.yaml")
    assert needle in str(e.value)
    assert "{" not in str(e.value)  # a key and its value, never a dump of the whole section


WORDS = {"gt": "greater than", "ge": "greater than or equal to", "lt": "less than", "le": "less than or equal to"}


def bounded_keys(section: type[BaseModel] = Params, prefix: str = ""):
    """(dotted key, a value its bounds refuse, the bound in pydantic's words) of every field with a declared bound."""
    for name, f in section.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            yield from bounded_keys(f.annotation, f"{prefix}{name}.")
        for bound in f.metadata:
            for op in BOUNDS:
                if hasattr(bound, op):
                    limit = getattr(bound, op)
                    refused = {"gt": limit, "ge": limit - 1, "lt": limit, "le": limit + 1}[op]
                    yield prefix + name, refused, f"{WORDS[op]} {limit}"


BOUNDED = list(bounded_keys())


def test_prepare_and_serve_have_the_same_limit_keys_each_with_its_own_value():
    keys = {key for key, _, _ in BOUNDED}
    for name in ("max_image_pixels", "max_audio_seconds"):
        assert {f"prepare.{name}", f"serve.{name}"} <= keys
    params = parse_params({"prepare": {"max_audio_seconds": 5}, "serve": {"max_audio_seconds": 7}})
    assert (params.prepare.max_audio_seconds, params.serve.max_audio_seconds) == (5, 7)


@pytest.mark.parametrize("key,bad,words", BOUNDED, ids=[key for key, _, _ in BOUNDED])
def test_every_bound_refuses_in_one_line_that_names_its_key(key, bad, words):
    raw = bad
    for part in reversed(key.split(".")):
        raw = {part: raw}
    with pytest.raises(UserError) as e:
        parse_params(raw, "p.yaml")
    assert str(e.value) == f"p.yaml: {key}: must be {words} (got {bad!r})"


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "tessera.core.entry.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_reports_a_users_mistake_without_a_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  depht: 3\n")
    result = run_cli("info", "--params", str(bad))
    assert result.returncode == 2
    assert "model.depht: not a known key" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    missing = run_cli("info", "--params", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_cli_info_lists_every_task():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    for task in ("image/classification", "text/classification", "audio/classification", "detection/detection"):
        assert task in result.stdout


def test_the_default_dataset_is_generated_only_when_a_source_reads_it():
    mine = {"text": {"format": "jsonl", "train": "data/mine/t.jsonl"}}
    assert load_params(ROOT / "params.yaml").uses_default_data()
    assert not parse_params({"prepare": {"root": "data/mine", "sources": mine}}).uses_default_data()
    # a root above both: the sources decide, not the root
    both = {**mine, "image": {"format": "imagefolder", "train": "data/raw/images/train"}}
    assert parse_params({"prepare": {"root": "data", "sources": both}}).uses_default_data()

def test_schedule_and_deploy_without_a_server_say_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PREFECT_HOME": str(tmp_path)}
    for args in (["schedule"], ["deploy", "--pool", "gpus"]):
        result = subprocess.run([sys.executable, "-m", "tessera.core.entry.cli", *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 2 and "prefect server start" in result.stderr and "Traceback" not in result.stderr
