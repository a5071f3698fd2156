"""`tessera export`: each trained task as a deployable model, checked against the eager model before it ships.

<export.out>/<task>/
  model.onnx          ONNX, dynamic in every dimension the input contract names (batch, samples, tokens)
  model.pt2           a torch.export program: torch.export.load(path).module()(*inputs)
  model.safetensors   the task model's weights (adapter + backbone + head); config.json rebuilds it (`load_deployable`)
  config.json         task, classes, model config, and the input / output contract (the modality's `inputs`)
  check.safetensors   a held-out batch's inputs and the eager model's outputs, and export.atol: what a server
                      checks its loaded model on before it reports ready (`tessera serve`, GET /ready)
  (assets)            what the modality needs besides weights, e.g. tokenizer.json
<export.out>/README.md  the model card
<export.out>/version.json  what the export is: its content hash (over every other file here), the git commit it
                      was made at (null outside a repository) and the params it was made from; `tessera serve`
                      reports it at GET /info and names each answer's version by the hash

Tasks: each trained modality's own task and the alignment embedders (align_<modality>). Every artifact takes the
modality's raw inputs (uint8 pixels, float waveforms with the log-mel front end inside, token ids, table values)
and returns its task's outputs (detection: decoded boxes besides the logits). Parity: each artifact runs on held-out samples next to the eager model;
the largest absolute output difference must stay under export.atol, and the argmax must agree on every sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from tessera.core.config import ModelConfig, Params
from tessera.core.data.files import atomic_write, atomic_write_bytes, atomic_write_text
from tessera.core.data.shards import ShardedSplit
from tessera.core.errors import UserError
from tessera.core.nn.task_model import TaskModel
from tessera.core.nn.weights import read_state_dict
from tessera.core.runtime.progress import Work
from tessera.core.stages.card import write_card
from tessera.core.tasks.multitask import MultiTaskModel, load_trained
from tessera.core.units import Unit, plain
from tessera.modalities import REGISTRY, build_task_model, task_kind

CONTRASTIVE = "contrastive"  # the head of the alignment embedders (align_<modality>)
VERSION = "version.json"  # in <export.out>: what the export is (`write_version`)


class Deployable(nn.Module):
    """One task's model on its modality's exported inputs (positional, in `Modality.inputs` order): the modality's
    own task's outputs (a classifier's logits [B, C]; detection: logits, scores, labels, boxes), or for an
    alignment embedder the unit embedding [B, P]."""

    def __init__(self, net: TaskModel, modality: str, head: str, cfg: ModelConfig):
        super().__init__()
        self.net, self.modality, self.head, self.cfg = net, modality, head, cfg
        self.spec = REGISTRY[modality]
        self.kind = None if head == CONTRASTIVE else task_kind(modality, cfg)
        self.input_names = [i["name"] for i in self.spec.inputs(cfg)]
        self.output_names = ["embedding"] if head == CONTRASTIVE else list(self.kind.outputs)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(**self.spec.from_inputs(self.cfg, args))
        if self.head == CONTRASTIVE:
            return (out["pred_embed"],)
        return self.kind.export_outputs(out, self.cfg, args)


def exported_tasks(model: MultiTaskModel) -> dict[str, tuple[str, str, TaskModel]]:
    """{name: (modality, head kind, task model)} for everything the trained model can do."""
    tasks = {t: (t, task_kind(t, model.cfg).name, model.task_model(t)) for t in model.classes if t != "align"}
    for m in model.align or ():
        tasks[f"align_{m}"] = (m, CONTRASTIVE, model.embedder(m))
    return tasks


def parity_batches(dataset, modality: str, n: int) -> list[tuple[torch.Tensor, ...]]:
    """The first n held-out samples as batches of 1, then up to 16: both the single-sample path and the
    dynamic batch (and, for audio and text, lengths that differ between batches)."""
    m, n = REGISTRY[modality], min(n, len(dataset))
    cuts = [0, 1] + list(range(17, n, 16)) + [n]
    return [m.to_inputs(m.collate(dataset.gather(torch.arange(a, b)))[0]) for a, b in zip(cuts, cuts[1:]) if b > a]


def dynamic_shapes(inputs: list[dict]) -> tuple[dict, ...]:
    """Every dimension an input's shape names (batch, samples, tokens) has any size; numbered ones are fixed."""
    return tuple({d: torch.export.Dim.DYNAMIC for d, size in enumerate(i["shape"]) if isinstance(size, str)} for i in inputs)


def write_task(folder: Path, name: str, net: Deployable, example: tuple, cfg: ModelConfig, classes: list[str] | None,
               opset: int, assets: list[Path]) -> None:
    """model.pt2, model.onnx, model.safetensors, config.json and the modality's assets (tokenizer.json) into
    `folder`, each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs = net.spec.inputs(cfg)
    ep = torch.export.export(net, example, dynamic_shapes=(dynamic_shapes(inputs),))  # forward(*args): one tuple
    atomic_write(folder / "model.pt2", lambda tmp: torch.export.save(ep, tmp))
    outputs = net.output_names
    with warnings.catch_warnings():  # torch's deprecation inside its own copy of the program: nothing for a user to do
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        program = torch.onnx.export(ep, example, input_names=net.input_names, output_names=outputs, opset_version=opset,
                                    dynamo=True, external_data=False, verbose=False)
    atomic_write(folder / "model.onnx", lambda tmp: program.save(str(tmp)))
    atomic_write(folder / "model.safetensors",
                 lambda tmp: save_file({k: v.contiguous() for k, v in net.net.state_dict().items()}, tmp))
    for asset in assets:
        atomic_write_bytes(folder / asset.name, asset.read_bytes())
    config = {"task": name, "modality": net.modality, "head": net.head, "classes": classes, "model": cfg.model_dump(),
              "inputs": inputs, "outputs": outputs}
    atomic_write_text(folder / "config.json", json.dumps(config, indent=1))


def load_deployable(folder: str | Path) -> Deployable:
    """The eager model of an exported task, rebuilt from config.json and model.safetensors."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not an exported model (no config.json); run `tessera export` and pass "
                        f"models/export/<task>")
    config = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig.model_validate(config["model"])
    net = build_task_model(config["modality"], cfg, len(config["classes"] or []), contrastive=config["head"] == CONTRASTIVE)
    net.load_state_dict(read_state_dict(folder / "model.safetensors"))
    return Deployable(net, config["modality"], config["head"], cfg).eval()


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) for x, y in zip(a, b))


@torch.no_grad()
def check_parity(folder: Path, net: Deployable, batches: list[tuple]) -> dict:
    """Each artifact in `folder` against the eager `net` on `batches`: the largest absolute output difference,
    and the share of samples whose argmax (class, or per-query class for detection) agrees."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    with warnings.catch_warnings():  # torch.export.load reads weights from a read-only buffer, and says so
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        pt2 = torch.export.load(folder / "model.pt2").module()
    runners = {
        "onnx": lambda args: session.run(None, {n: a.numpy() for n, a in zip(net.input_names, args)}),
        "pt2": lambda args: [o.numpy() for o in pt2(*args)],
        "safetensors": lambda args, m=load_deployable(folder): [o.numpy() for o in m(*args)],
    }
    result = {"samples": sum(len(b[0]) for b in batches)}
    refs = [[o.numpy() for o in net(*args)] for args in batches]
    for fmt, run in runners.items():
        diffs, agree = [], 0
        for args, ref in zip(batches, refs):
            got = run(args)
            diffs.append(max_diff(ref, got))
            if net.kind and net.kind.argmax:  # an embedding or a value has no argmax; its difference is the check
                agree += int((ref[0].argmax(-1) == got[0].argmax(-1)).reshape(len(ref[0]), -1).all(1).sum())
        result[f"{fmt}_max_abs_diff"] = max(diffs)
        if net.kind and net.kind.argmax:
            result[f"{fmt}_argmax_agree"] = agree / result["samples"]
    return result


def parity_failures(name: str, result: dict, atol: float) -> list[str]:
    return [f"{name}.{k} = {v:.3g}" for k, v in result.items()
            if (k.endswith("max_abs_diff") and not v < atol) or (k.endswith("argmax_agree") and v < 1.0)]


def write_check(folder: Path, net: Deployable, example: tuple, atol: float) -> None:
    """check.safetensors: `example`'s inputs (input.<name>) and the eager model's outputs on them (output.<name>)."""
    with torch.no_grad():
        outputs = net(*example)
    tensors = {f"input.{n}": a for n, a in zip(net.input_names, example)}
    tensors |= {f"output.{n}": o for n, o in zip(net.output_names, outputs)}
    atomic_write(folder / "check.safetensors", lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()},
                                                                      tmp, metadata={"atol": repr(atol)}))


def content_hash(folder: Path) -> str:
    """sha256 over every file in `folder` but VERSION, in the order of their paths: each file's path relative to
    `folder` and the sha256 of its bytes. The same export gives the same hash wherever it was copied or fetched."""
    files = sorted((f.relative_to(folder).as_posix(), f) for f in folder.rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for name, f in files:
        if name != VERSION:
            with open(f, "rb") as data:
                digest.update(f"{name}\0{hashlib.file_digest(data, 'sha256').hexdigest()}\n".encode())
    return digest.hexdigest()


def git_commit() -> str | None:
    """HEAD of the git repository the export runs in (the project: its code, params.yaml, dvc.lock); None outside
    one, or where git is not installed."""
    try:
        got = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return got.stdout.strip() if got.returncode == 0 else None


def write_version(folder: Path, params: Params) -> dict:
    """Writes folder/VERSION, the export's record of itself, once every other file is in place; -> what it wrote."""
    version = {"content_hash": content_hash(folder), "git_commit": git_commit(), "params": params.model_dump(mode="json")}
    atomic_write_text(folder / VERSION, json.dumps(version, indent=1))
    return version


def export_task(params: Params, folder: Path, name: str, net: Deployable, classes: list[str] | None,
                held_out: ShardedSplit) -> dict:
    """One task's artifacts and check.safetensors written to `folder`, each format checked against `net` on the
    first export.parity_samples of `held_out` -> check_parity's figures."""
    cfg = params.export
    batches = parity_batches(held_out, net.modality, cfg.parity_samples)
    example = max(batches, key=lambda b: len(b[0]))
    if len(example[0]) == 1:  # export fixes a dimension it sees as 1: show it a batch of 2
        example = tuple(torch.cat([a, a]) for a in example)
    write_task(folder, name, net, example, net.cfg, classes, cfg.opset,
               [Path(params.train.out) / "assets" / net.modality / a for a in net.spec.assets])
    result = check_parity(folder, net, batches)
    write_check(folder, net, example, cfg.atol)
    return result


def export_models(params: Params, console: Console | None = None, unit: Unit = plain) -> dict:
    """`tessera export`: every task exported (a unit of work each, `export <task>`), checked, and described in a
    model card; a failed check fails."""
    console = console or Console()
    cfg = params.export
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    model = load_trained(params.train.out)
    if model.fused:
        raise UserError(f"train.tasks: {', '.join(model.fused)} is a fused task (a records source), and exporting fused "
                        "tasks (so predict, serve and explain on them) is not supported yet; evaluate them with "
                        "`tessera evaluate`, or leave them out of train.tasks to export the other tasks")
    modalities = sorted({m for m, _, _ in exported_tasks(model).values()})
    data = {m: ShardedSplit(Path(params.prepare.out) / m, params.evaluate.split) for m in modalities}
    for m, split in data.items():
        if len(split) == 0:
            raise UserError(f"export checks each model against the eager one on the evaluate.split, and {m}'s "
                            f"{params.evaluate.split} split is empty: set evaluate.split to one with samples, or add data")
    out, metrics, failures = Path(cfg.out), {}, []
    unit = Work(console, "exporting", len(exported_tasks(model)), "task").units(unit)  # a bar, or a line per task
    for name, (modality, head, task_model) in exported_tasks(model).items():
        net = Deployable(task_model, modality, head, model.cfg).eval()
        classes = model.classes.get(name if head != CONTRASTIVE else "align")
        result = unit(f"export {name}", export_task, params, out / name, name, net, classes, data[modality])
        metrics.update({f"{name}.{k}": v for k, v in result.items()})
        failures += parity_failures(name, result, cfg.atol)
        console.print(f"exported {name}: " + ", ".join(f"{k} {v:.2g}" for k, v in result.items() if k != "samples")
                      + f" on {result['samples']} held-out samples")
    Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(cfg.metrics), json.dumps(metrics, indent=1))
    if failures:
        raise UserError(f"export parity failed (atol {cfg.atol}): {'; '.join(failures)}. The artifacts in {out} "
                        f"do not compute what the trained model computes; figures in {cfg.metrics}")
    write_card(params, model, metrics, out)
    write_version(out, params)
    return metrics
