"""The shape of the code, checked: one import namespace, layers that import only downward, no modality named
outside modalities/, and dvc.yaml's stages depending on the code they run and on nothing else."""

import ast
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from pkgutil import resolve_name

import pytest
import yaml

from helpers import ROOT, copy_repo, run
from tessera.core.config import Params
from tessera.core.errors import UserError
from tessera.core.stages.pretrain import PRETRAIN_CODE, TRAIN_KEYS
from tessera.core.stages.train import TRAINING_CODE
from tessera.core.stagetable import STAGE_NAMES, STAGES
from tessera.modalities import REGISTRY

# Lowest first. A module may import from its own layer and those before it, never from a later one. The entry points
# and the server they start are one layer: `tessera serve` runs core.serve, which runs `tessera predict`'s Predictor.
LAYERS = [("tessera.core.errors", "tessera.core.units"), "tessera.core.stagetable", "tessera.core.nn", "tessera.core.config", "tessera.core.data",
          "tessera.core.kinds", "tessera.core.modality", "tessera.modalities", "tessera.core.tasks", "tessera.core.runtime", "tessera.core.stages",
          "tessera.core.sweep", "tessera.flows", ("tessera.core.entry", "tessera.core.serve")]
PACKAGES = {"core": "tessera.core", "modalities": "tessera.modalities", "flows": "tessera.flows"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join((package, *parts)).removesuffix(".__init__")] = f
    return found


def layer(module: str) -> int:
    return max(i for i, prefixes in enumerate(LAYERS) for prefix in ((prefixes,) if isinstance(prefixes, str) else prefixes)
               if module == prefix or module.startswith(prefix + "."))


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported tessera module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("tessera"):
                found.append((child.module, child.lineno, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("tessera"))
            visit(child, inner)

    visit(tree, False)
    return found


def test_the_installed_distribution_claims_only_the_tessera_namespace():
    claimed = {top for top, dists in importlib.metadata.packages_distributions().items() if "tessera" in dists}
    assert claimed == {"tessera"}


def test_documented_imports_work_beside_a_users_own_core_flows_and_modalities(tmp_path):
    """A notebook or `python -m` run in a project with packages of these common names gets Tessera's code anyway,
    and the deployments `tessera schedule` serves load by module, not from a file under the working directory."""
    for name in ("core", "flows", "modalities"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} package was imported')\n")
    (tmp_path / "params.yaml").write_text("orchestrate:\n  schedules:\n    pipeline: {interval: 60}\n")
    code = """
from prefect.flows import load_flow_from_entrypoint
from tessera.core.config import load_params
from tessera.core.stages.prepare import prepare_data
from tessera.core.tasks.multitask import load_trained
from tessera.flows.schedule import deployments
from tessera.modalities import REGISTRY
from tessera.core.entry.predict import Predictor
entrypoints = [d.entrypoint for d in deployments("params.yaml")]
assert all(e.startswith("tessera.flows.") for e in entrypoints), entrypoints
print(sorted(load_flow_from_entrypoint(e).name for e in entrypoints))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == str(sorted(STAGE_NAMES))
    cli = subprocess.run([sys.executable, "-m", "tessera.core.entry.cli", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 0 and "predict" in cli.stdout, cli.stderr[-2000:]


def test_every_module_imports_only_from_its_own_layer_or_below():
    upward = []
    for module, path in modules().items():
        for target, line, _ in imports(path):
            if layer(target) > layer(module):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[layer(module)]}) imports {target}")
    assert upward == []


def test_late_imports_of_our_own_modules_live_only_in_the_cli():
    """Inside a function, an import hides a dependency from a reader of the module's head; the CLI keeps them
    there so that `tessera --help` and `tessera params` do not load Prefect, ONNX Runtime or the stages."""
    late = [f"{path.relative_to(ROOT)}:{line} imports {target}" for module, path in modules().items()
            if module != "tessera.core.entry.cli" for target, line, inside in imports(path) if inside]
    assert late == []


def test_help_and_params_load_neither_torch_nor_prefect_nor_onnxruntime_nor_a_stage():
    """The CLI builds its commands from the table of stages (core/stagetable.py), which imports nothing, and the
    config imports no torch (core/nn/__init__.py's BackboneConfig): `tessera --help`, a command's --help and
    `tessera params` stay quick (0.3 s of CPU; torch alone is 1.3 s)."""
    code = """
import sys
from tessera.core.entry.cli import app
for args in (["--help"], ["train", "--help"], ["data", "generate", "--help"], ["params", "train"]):
    try:
        app(args)
    except SystemExit:
        pass
print(" ".join(sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "nproc-per-node" in result.stdout, result.stderr[-2000:]
    loaded = result.stdout.split("\n")[-2].split()
    assert [m for m in loaded if m.split(".")[0] in ("torch", "prefect", "onnxruntime")
            or m.startswith(("tessera.flows", "tessera.core.stages"))] == []


def test_the_flows_import_no_library_that_only_some_functions_use():
    """Every `tessera <stage>` imports the flows: the libraries a few functions use (a metric, the matcher, timm's
    checkpoints, checkpointing, one stage's own) are imported where they are used, each >= 0.5 s of CPU otherwise."""
    code = "import sys, tessera.flows.stages; print(' '.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    heavy = ("timm", "torchvision", "torchmetrics", "scipy", "sklearn", "matplotlib", "sympy", "onnxruntime")
    assert [m for m in loaded if m.split(".")[0] in heavy or m.startswith("torch.distributed.checkpoint")] == []


def test_the_table_of_stages_names_functions_that_exist_and_sections_of_params_yaml():
    """Every name in core/stagetable.py resolves, in a layer the flows may import (a stage's function below the
    flows: plain, without Prefect); a row is made of a function or has a flow of its own, not both."""
    for stage in STAGES:
        assert bool(stage.run) != bool(stage.flow) and not (stage.publish and stage.flow), stage.name
        assert stage.section is None or stage.section in Params.model_fields, stage.name
        for ref, highest in ((stage.run, "tessera.core.stages"), (stage.publish, "tessera.flows"),
                             (stage.flow, "tessera.flows")):
            if ref:
                assert layer(ref.split(":")[0]) <= LAYERS.index(highest) and callable(resolve_name(ref)), ref


def test_every_stage_is_a_command_whose_options_its_flow_takes():
    """`tessera <command>` exists for every row, and what it passes (`--params`, the row's options) are keyword
    arguments of the stage's flow with the same defaults: the table and a flow of its own (train) cannot drift."""
    import typer

    from tessera.core.entry.cli import app
    from tessera.flows.stages import flow_of

    group = typer.main.get_command(app)
    for stage in STAGES:
        command = group
        for word in stage.words:
            command = command.commands[word]
        if not stage.cli:  # written by hand (the sweep): a command all the same
            continue
        taken = inspect.signature(flow_of(stage).fn).parameters
        assert [p.name for p in command.params if p.name != "help"] == (["params"] if stage.section else []) + \
            [o.name for o in stage.options]
        assert ("params" in taken) == bool(stage.section), stage.name
        assert {o.name: o.default for o in stage.options} == {o.name: taken[o.name].default for o in stage.options}


def test_a_schedule_for_a_flow_the_table_lacks_is_refused_naming_the_key(tmp_path):
    from tessera.flows.schedule import deployments

    (tmp_path / "params.yaml").write_text("orchestrate:\n  schedules:\n    pipline: {interval: 60}\n")
    with pytest.raises(UserError, match="params.yaml: orchestrate.schedules.pipline: not a flow; schedule one of "
                                        "generate, prepare, pretrain, train"):
        list(deployments(str(tmp_path / "params.yaml")))


def test_dvc_yaml_holds_the_dvc_rows_of_the_table_in_order_each_run_by_its_command():
    stages = dvc_stages()
    assert list(stages) == [s.name for s in STAGES if s.dvc]
    assert [d["cmd"] for d in stages.values()] == [f"tessera {' '.join(s.words)}" for s in STAGES if s.dvc]


def test_no_module_outside_modalities_names_a_modality():
    """Facts about a modality live in its file: elsewhere, no string equal to a modality's name (docstrings aside),
    and no attribute named after one (cfg.image, cfg.audio). The default dataset's generator writes a folder per
    modality of the digits and is the one exception."""
    names, found = set(REGISTRY), []
    for module, path in modules().items():
        if module.startswith("tessera.modalities") or module == "tessera.core.data.digits":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.Attribute) and node.attr in names and ast.unparse(node.value).endswith(("cfg", "model", "config")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert found == []


def test_importing_every_module_leaves_pillow_and_matplotlib_as_they_were():
    """Pillow's bomb guard (Image.MAX_IMAGE_PIXELS) stays what the process had, and no matplotlib backend is chosen:
    Tessera checks its own pixel limit where it decodes, and draws with matplotlib's object API (Figure)."""
    code = """
import importlib, json, os, sys
import matplotlib, PIL.Image
before = PIL.Image.MAX_IMAGE_PIXELS
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps([before, PIL.Image.MAX_IMAGE_PIXELS, matplotlib.get_backend(auto_select=False)]))
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    result = subprocess.run([sys.executable, "-c", code, *modules()], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after, backend = json.loads(result.stdout.splitlines()[-1])
    assert before is not None and after == before
    assert backend is None


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_prepare_depends_on_exactly_the_preprocessing_keys_of_the_modalities():
    listed = {p for p in dvc_stages()["prepare"]["params"] if not p.startswith("prepare")}
    declared = {k for m in REGISTRY.values() for k in m.prepare_keys if not k.startswith("prepare.")}
    assert listed == declared | {"model.inputs"}  # records inputs' own values of those keys


def imported_files(module: str) -> set[str]:
    """The repository's files (paths from its root) that importing `module` in a fresh process loads, directly or not."""
    result = subprocess.run([sys.executable, "-c", f"import sys, {module}; "
                             "print('\\n'.join(m for m in sys.modules if m.startswith('tessera')))"],
                            capture_output=True, text=True, check=True)
    loaded = set(result.stdout.split())
    return {str(path.relative_to(ROOT)) for name, path in modules().items() if name in loaded}


def code_deps(stage: str) -> set[str]:
    return {d for d in dvc_stages()[stage]["deps"] if d.endswith(".py")}


def test_training_depends_on_the_code_training_runs():
    """dvc.yaml's train deps are TRAINING_CODE (which the run signature hashes too), and TRAINING_CODE is exactly the
    files the worker imports, directly or not: none missing (an edit would resume a stale checkpoint), none extra (an
    edit to how predict reads a file, or to a drawing, would retrain from scratch)."""
    assert sorted(code_deps("train")) == sorted(TRAINING_CODE)
    assert {d for d in dvc_stages()["train"]["deps"] if not d.endswith(".py")} == {"${prepare.out}", "${pretrain.out}"}
    assert sorted(imported_files("tessera.core.entry.worker")) == sorted(TRAINING_CODE)


def test_pretraining_depends_on_the_code_it_runs_and_reads_only_the_training_keys_it_lists():
    """dvc.yaml's pretrain deps are PRETRAIN_CODE, which its signature hashes, and exactly what it imports; its
    params name the training keys it reads, so that a change to the others (epochs) does not pretrain again."""
    assert sorted(code_deps("pretrain")) == sorted(PRETRAIN_CODE) == sorted(imported_files("tessera.core.stages.pretrain"))
    assert {p for p in dvc_stages()["pretrain"]["params"] if p.startswith("train")} == {f"train.{k}" for k in TRAIN_KEYS}


def test_evaluate_and_export_depend_on_the_code_they_run_beyond_training():
    """What training imports reaches them through models/train; the rest of what each imports is its own code: the
    drawings of every modality for evaluate, the model card for export. Neither reads inputs to predict on."""
    for stage in ("evaluate", "export"):
        assert sorted(code_deps(stage)) == sorted(imported_files(f"tessera.core.stages.{stage}") - set(TRAINING_CODE)), stage


def test_prepare_depends_on_its_code_and_the_training_side_of_the_modalities():
    """Prepare imports the model too (adapters live beside the loaders) and the config, which preprocessing does not
    run (its params are deps by key); the rest of what it imports it depends on, and not on readers or drawings."""
    runs = {f for f in imported_files("tessera.core.stages.prepare")
            if f.startswith(("core/data/", "core/kinds/", "modalities/")) or f in ("core/modality.py", "core/stages/prepare.py")}
    assert sorted(code_deps("prepare")) == sorted(runs)
    assert not any(f.endswith(("/infer.py", "/draw.py", "/io.py")) for f in runs)


@pytest.mark.slow
def test_editing_the_cli_export_or_bench_leaves_training_up_to_date(dvc_repo, tmp_path):
    repo = copy_repo(dvc_repo, tmp_path / "repo")
    for name in ("core/entry/cli.py", "core/stages/export.py", "core/entry/bench.py"):
        with open(repo / name, "a") as f:
            f.write("\n# a user's edit\n")
    stale = {s for s in ("generate", "prepare", "train", "evaluate", "export")
             if run(["dvc", "status", s], repo).strip() not in ("", "Data and pipelines are up to date.")}
    assert stale == {"export"}  # export's own code changed; training and what precedes it did not
    with open(repo / "core/nn/backbone.py", "a") as f:
        f.write("\n# an edit to the model\n")
    assert "changed deps" in run(["dvc", "status", "train"], repo)


@pytest.mark.slow
def test_editing_a_drawing_or_a_predict_reader_makes_stale_only_the_stages_that_use_it(dvc_repo, tmp_path):
    """A drawing is evaluate's alone; a predict reader is no stage's (predict, serve and explain are commands)."""
    stages = ("generate", "prepare", "train", "evaluate", "export")

    def stale(repo: Path) -> set[str]:
        return {s for s in stages if run(["dvc", "status", s], repo).strip() not in ("", "Data and pipelines are up to date.")}

    def edit(repo: Path, name: str, old: str, new: str) -> None:
        text = (repo / name).read_text()
        assert old in text, (name, old)
        (repo / name).write_text(text.replace(old, new))

    drawn = copy_repo(dvc_repo, tmp_path / "drawn")
    edit(drawn, "modalities/text/draw.py", "fontsize=9", "fontsize=10")
    assert stale(drawn) == {"evaluate"}
    read = copy_repo(dvc_repo, tmp_path / "read")
    edit(read, "modalities/audio/infer.py", "out = np.zeros(", "out = np.zeros(shape=")
    edit(read, "modalities/image/infer.py", "for pixels, _ in items", "for pixels, _size in items")
    assert stale(read) == set()
