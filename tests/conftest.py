"""Shared fixtures: the small model config the CPU tests use, a fixed seed for every test, a small prepared copy of
the default dataset, a trained run and a DVC workspace; and the tiers: every test that starts a process is `e2e`."""

import inspect
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tessera.core.config import ModelConfig, parse_params
from tessera.core.data.digits import generate
from tessera.core.stages.prepare import prepare_data as prepare
from helpers import ROOT, SMALL, TINY, merge, small_model, tessera, write_params
from helpers import run as sh


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cfg() -> ModelConfig:
    """The tests' small model (helpers.small_model): D=32, 2 blocks, 2 heads, no dropout."""
    return ModelConfig.model_validate(small_model())


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The default dataset at a small size (one language, a few voices), generated and prepared once per session;
    base.yaml holds the params that point at it."""
    root = tmp_path_factory.mktemp("small")
    generate(SMALL.model_copy(update={"out": str(root / "raw")}))
    raw = root / "raw"
    params = {"model": small_model(drop_path_rate=0.1), "prepare": {
        "root": str(raw), "out": str(root / "prepared"), "metrics": str(root / "prepare.json"), "val_fraction": 0.15,
        "sources": {"image": {"format": "imagefolder", "train": str(raw / "images/train"), "test": str(raw / "images/test")},
                    "audio": {"format": "manifest", "train": str(raw / "audio/train.csv"), "test": str(raw / "audio/test.csv")},
                    "text": {"format": "jsonl", "train": str(raw / "text/train.jsonl"), "test": str(raw / "text/test.jsonl")},
                    "detection": {"format": "coco", "train": str(raw / "detection/train.json"),
                                  "test": str(raw / "detection/test.json")}}}}
    prepare(parse_params(params))
    (root / "base.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture(scope="session")
def run(data_dir, tmp_path_factory) -> Path:
    """A briefly trained small model, evaluated and exported (export/): what evaluation, export, predict and serve
    tests read; what each stage printed in <stage>.log, and on stderr in <stage>.err. Every warning is printed
    once per place (PYTHONWARNINGS=default), as a log would show it, for test_library_warnings to read."""
    out = tmp_path_factory.mktemp("run")
    params = write_params(data_dir, out, epochs=2)
    for stage in ("train", "evaluate", "export"):
        result = tessera(stage, "-p", str(params), env={"PYTHONWARNINGS": "default"})
        (out / f"{stage}.log").write_text(result.stdout)
        (out / f"{stage}.err").write_text(result.stderr)
    return out


@pytest.fixture(scope="session")
def dvc_repo(tmp_path_factory) -> Path:
    """A git + DVC workspace of this repository's pipeline at a tiny size, after one full `dvc repro`, committed.
    Tests that change it work on a copy (`copy_repo`)."""
    repo = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("core", "modalities", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    # the default records are generated and prepared, not trained: their fused task and pair by sample would add nine
    # exports to every pipeline run the tests repeat (tests/test_fused.py trains, exports, explains and serves both)
    for task in ("scenes", "image_caption"):
        params["tasks"].pop(task)
    params["train"]["modality_dropout"] = {}
    params["sweep"]["space"].pop("train.modality_dropout.scenes.image")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], repo)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "empty"], repo)  # DVCLive needs a HEAD
    sh(["dvc", "init", "-q"], repo)
    sh(["dvc", "config", "core.analytics", "false"], repo)
    sh(["dvc", "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "baseline"], repo)
    return repo


GROUPS = ("dvc_repo", "run")  # heavy session fixtures: meant for one process each, but xdist 3.8 under pytest 9.2 ignores the
# groups (docs/development.md), so each process builds what it uses once
TESTS = Path(__file__).parent


def starts_a_process(fn, seen: set) -> bool:
    """Whether a function of the tests runs another process: its code (nested functions included) names the
    `subprocess` module, or calls a function of the tests that does (helpers.tessera, helpers.run, prefect_server)."""
    fn = inspect.unwrap(fn) if callable(fn) else fn
    if not inspect.isfunction(fn) or fn in seen or not Path(fn.__code__.co_filename).is_relative_to(TESTS):
        return False
    seen.add(fn)
    codes, names = [fn.__code__], set()
    while codes:
        code = codes.pop()
        names |= set(code.co_names)
        codes += [c for c in code.co_consts if inspect.iscode(c)]
    return "subprocess" in names or any(starts_a_process(fn.__globals__.get(n), seen) for n in names)


def is_end_to_end(item) -> bool:
    """A test is end to end when it, or a fixture it uses (however indirectly), starts a process: the CLI, torchrun,
    uvicorn, DVC, a Prefect server. The rest are unit tests: `pytest -m "not e2e"`."""
    fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
    seen = set()
    return any(starts_a_process(fn, seen) for fn in [item.function, *fixtures])


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    """Tests that use a heavy session fixture run in that fixture's group; tests that start a process are marked
    `e2e`; tests marked `gpu` need CUDA: skipped, with the reason, where there is none. Slow tests run first, so
    the last a worker takes are short and the two workers finish together."""
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: each file's order kept within a tier
    for item in items:
        group = next((g for g in GROUPS if g in getattr(item, "fixturenames", ())), None)
        if group and config.pluginmanager.hasplugin("xdist"):  # `-p no:xdist` (one process) has no groups
            item.add_marker(pytest.mark.xdist_group(group))
        if isinstance(item, pytest.Function) and is_end_to_end(item):
            item.add_marker(pytest.mark.e2e)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
