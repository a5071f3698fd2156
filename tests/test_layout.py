"""The shape of the code, checked: one import namespace, layers that import only downward, no modality named
outside modalities/, and dvc.yaml's stages depending on the code they run and on nothing else."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, copy_repo, run
from tessera.core.stages.train import TRAINING_CODE
from tessera.modalities import REGISTRY

# Lowest first. A module may import from its own layer and those before it, never from a later one. The entry points
# and the server they start are one layer: `tessera serve` runs core.serve, which runs `tessera predict`'s Predictor.
LAYERS = ["tessera.core.errors", "tessera.core.nn", "tessera.core.config", "tessera.core.data", "tessera.core.modality",
          "tessera.modalities", "tessera.core.tasks", "tessera.core.runtime", "tessera.core.stages", "tessera.flows",
          ("tessera.core.entry", "tessera.core.serve")]
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
    assert result.stdout.split("\n")[-2] == str(sorted(["pipeline", "generate", "prepare", "train", "evaluate", "export", "sweep"]))
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


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_prepare_depends_on_exactly_the_preprocessing_keys_of_the_modalities():
    listed = {p for p in dvc_stages()["prepare"]["params"] if not p.startswith("prepare")}
    declared = {k for m in REGISTRY.values() for k in m.prepare_keys if not k.startswith("prepare.")}
    assert listed == declared


def test_training_depends_on_the_code_training_runs():
    """dvc.yaml's train deps are TRAINING_CODE (which the run signature hashes too), and every module the worker
    imports, directly or not, lies inside them."""
    code_deps = [d for d in dvc_stages()["train"]["deps"] if d != "data/prepared"]
    assert sorted(code_deps) == sorted(TRAINING_CODE)
    result = subprocess.run([sys.executable, "-c", "import sys, tessera.core.entry.worker; "
                             "print('\\n'.join(m for m in sys.modules if m.startswith('tessera')))"],
                            capture_output=True, text=True, check=True)
    files = [p for m, p in modules().items() if m in result.stdout.split()]
    outside = [str(f.relative_to(ROOT)) for f in files if not any(f.relative_to(ROOT).is_relative_to(d) for d in TRAINING_CODE)
               and f.name != "__init__.py"]
    assert outside == []


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
