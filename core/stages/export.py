"""`tessera export`: each trained task as a deployable model, checked against the eager model before it ships.

<export.out>/<task>/
  model.onnx          ONNX (converted from model.pt2's program), dynamic in every dimension the input contract names
                      (batch, samples, tokens)
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

Tasks: each trained modality's own task, each fused task (a records source) and each side of a contrastive task
(<task>_<side>). Every artifact takes the modality's raw inputs (uint8 pixels, float waveforms with the log-mel
front end inside, token ids, table values) and returns its task's outputs (detection: decoded boxes besides the
logits). A fused task is one model over every input of its records: each input's own inputs, named
`<input>.<name>` (photo.images, caption.input_ids), in the task's input order, then `present` [B, K] bool (which
inputs each sample has; an absent input's rows may hold anything of the right shape). Its config.json's `fused`
describes each input (name, modality, its model config section with its data facts, its exported inputs, its assets
under <task>/<input>/, e.g. caption/tokenizer.json), which is what predict and serve rebuild the inputs from.
Parity: each artifact runs on held-out samples (a fused task's: held-out records, those lacking an input among
them) next to the eager model; the largest absolute output difference must stay under export.atol, and the argmax
must agree on every sample. Each format of each task is a unit of work (core/units.py), `export image onnx`: written
and checked on its own, and red in the Prefect UI where its check fails; the stage fails once every unit has run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from tessera.core.config import ModelConfig, Params
from tessera.core.data.files import atomic_write, atomic_write_bytes, atomic_write_text
from tessera.core.data.records import RecordsSplit
from tessera.core.data.shards import ShardedSplit
from tessera.core.errors import UserError
from tessera.core.nn.backbone import Encoder
from tessera.core.nn.fusion import FusedAdapter
from tessera.core.nn.task_model import TaskModel
from tessera.core.nn.weights import read_state_dict
from tessera.core.runtime.progress import Work
from tessera.core.stages.card import write_card
from tessera.core.tasks.datasets import collate_task
from tessera.core.tasks.multitask import MultiTaskModel, input_config, load_trained
from tessera.core.units import Unit, plain
from tessera.modalities import REGISTRY, build_head, build_task_model, task_kind

CONTRASTIVE = "contrastive"  # the head of a contrastive task's embedders (<task>_<side>)
FORMATS = ("pt2", "onnx", "safetensors")
"""What each task is exported as, in this order: the file model.<format>, a unit of work `export <task> <format>`,
its figures <task>.<format>_max_abs_diff and _argmax_agree in export.json"""
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
        self.contract = self.spec.inputs(cfg)  # [{name, dtype, shape, meaning}]
        self.input_names = [i["name"] for i in self.contract]
        self.output_names = ["embedding"] if head == CONTRASTIVE else list(self.kind.outputs)

    def example(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Exported inputs of the configured size, `batch` samples (bench-export times them)."""
        return self.spec.example(self.cfg, batch)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(**self.spec.from_inputs(self.cfg, args))
        if self.head == CONTRASTIVE:
            return (out["pred_embed"],)
        return self.kind.export_outputs(out, self.cfg, args)


class FusedDeployable(nn.Module):
    """A fused task's model on its exported inputs (positional): each input's own exported inputs in the task's
    input order (`Modality.inputs` of the input's config), then present [B, K] bool -> the task's outputs
    (a classifier's logits [B, C]). `fused`: the task's inputs as the model card holds them, [{"name", "modality",
    "config"}]."""

    def __init__(self, net: TaskModel, task: str, fused: list[dict], cfg: ModelConfig):
        super().__init__()
        self.kind = task_kind(task, cfg)
        # `modality` names the task (a records source) where a modality's own task names its modality
        self.net, self.modality, self.head, self.cfg, self.fused = net, task, self.kind.name, cfg, fused
        self.configs = [input_config(cfg, i) for i in fused]  # each input's model config
        own = [REGISTRY[i["modality"]].inputs(c) for i, c in zip(fused, self.configs)]
        self.counts = [len(o) for o in own]
        self.contract = [{**x, "name": f"{i['name']}.{x['name']}", "meaning": f"{i['name']} ({i['modality']}): {x['meaning']}"}
                         for i, o in zip(fused, own) for x in o]
        self.contract.append({"name": "present", "dtype": "bool", "shape": ["batch", len(fused)],
                              "meaning": "which inputs each sample has, in the order " + ", ".join(i["name"] for i in fused)
                                         + "; an absent input's rows may hold any values of its shape"})
        self.input_names = [i["name"] for i in self.contract]
        self.output_names = list(self.kind.outputs)

    def split(self, args: tuple) -> tuple[dict[str, tuple], torch.Tensor]:
        """Positional exported inputs -> ({input: its own exported inputs}, present [B, K])."""
        own, at = {}, 0
        for i, n in zip(self.fused, self.counts):
            own[i["name"]], at = tuple(args[at: at + n]), at + n
        return own, args[at]

    def example(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Every input's example of the configured size, each sample having them all."""
        own = [a for i, c in zip(self.fused, self.configs) for a in REGISTRY[i["modality"]].example(c, batch)]
        return (*own, torch.ones(batch, len(self.fused), dtype=torch.bool))

    def task_inputs(self, args: tuple) -> dict:
        """Positional exported inputs -> the task model's: {input: its modality's inputs}, present [B, K] (what
        `tessera explain` explains, as the report explains the trained model's)."""
        own, present = self.split(args)
        return {"present": present, **{i["name"]: REGISTRY[i["modality"]].from_inputs(c, own[i["name"]])
                                       for i, c in zip(self.fused, self.configs)}}

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.kind.export_outputs(self.net(**self.task_inputs(args)), self.cfg, args)


def fused_net(task: str, fused: list[dict], cfg: ModelConfig, num_outputs: int) -> TaskModel:
    """A fresh fused task model (FusedAdapter over each input's adapter -> backbone -> head) to load weights into."""
    adapters = {i["name"]: REGISTRY[i["modality"]].adapter(input_config(cfg, i)) for i in fused}
    return TaskModel(FusedAdapter(adapters, cfg.backbone().embed_dim), Encoder(cfg.backbone()), build_head(task, cfg, num_outputs))


class Exported(NamedTuple):
    """What one exported task is made of: its prepared data (a folder under prepare.out, its held-out split the
    parity samples), its modality, its head kind, its eager model and the model config its inputs follow."""

    folder: str
    modality: str
    head: str
    net: TaskModel
    cfg: ModelConfig


def exported_tasks(model: MultiTaskModel) -> dict[str, Exported]:
    """Everything the trained model can do, by exported name: each task, and each side of a contrastive task
    (<task>_<side>); a side that is a records input (`shop.photo`) reads that input's data under its own config."""
    tasks = {t: Exported(t, t, task_kind(t, model.cfg).name, model.task_model(t), model.cfg)
             for t in model.classes if t not in model.pairs}
    for t, sides in model.pairs.items():
        for s in sides:
            own = s["config"] is None  # a modality's own dataset, paired by label
            tasks[f"{t}_{s['name']}"] = Exported(s["modality"] if own else s["input"].replace(".", "/"), s["modality"],
                                                 CONTRASTIVE, model.embedder(t, s["name"]),
                                                 model.cfg if own else input_config(model.cfg, s))
    return tasks


def contrastive_classes(model: MultiTaskModel, name: str) -> list[str] | None:
    """The classes of the contrastive task whose embedder `name` (<task>_<side>) is: a by-label pair's."""
    return next((model.classes[t] for t in model.pairs if name.startswith(f"{t}_")), None)


def parity_batches(dataset, modality: str, n: int, fused: dict[str, str] | None = None) -> list[tuple[torch.Tensor, ...]]:
    """The first n held-out samples as batches of 1, then up to 16: both the single-sample path and the
    dynamic batch (and, for audio and text, lengths that differ between batches). For a fused task (`fused`: its
    inputs, name -> modality; `dataset` a RecordsSplit) each batch is its records' inputs and `present`."""
    n = min(n, len(dataset))
    cuts = [0, 1] + list(range(17, n, 16)) + [n]
    return [exported_inputs(dataset.gather(torch.arange(a, b)), modality, fused) for a, b in zip(cuts, cuts[1:]) if b > a]


def exported_inputs(batch: dict, modality: str, fused: dict[str, str] | None = None) -> tuple[torch.Tensor, ...]:
    """A gathered batch -> the exported model's positional inputs (a fused task's: each input's, then present)."""
    if fused is None:
        m = REGISTRY[modality]
        return m.to_inputs(m.collate(batch)[0])
    collated = collate_task(modality, None, batch, fused)[0]
    return (*(x for name, m in fused.items() for x in REGISTRY[m].to_inputs(collated[name])), collated["present"])


def dynamic_shapes(inputs: list[dict]) -> tuple[dict, ...]:
    """Every dimension an input's shape names (batch, samples, tokens) has any size; numbered ones are fixed."""
    return tuple({d: torch.export.Dim.DYNAMIC for d, size in enumerate(i["shape"]) if isinstance(size, str)} for i in inputs)


def traced(net: Deployable, example: tuple) -> Callable[[], torch.export.ExportedProgram]:
    """torch.export's program of `net` (dynamic in every dimension its inputs name), traced on `example` at the
    first call and kept: the pt2 and onnx units share one trace (1-3 s a task), whichever runs first."""
    shapes = (dynamic_shapes(net.contract),)  # forward(*args): one tuple
    return functools.cache(lambda: torch.export.export(net, example, dynamic_shapes=shapes))


def write_format(fmt: str, folder: Path, net: Deployable, example: tuple, program: Callable, opset: int) -> Path:
    """folder/model.<fmt>, atomically: the torch.export program (pt2), its ONNX conversion (onnx), or the eager
    model's weights (safetensors, which config.json rebuilds) -> its path."""
    path = folder / f"model.{fmt}"
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "pt2":
        atomic_write(path, lambda tmp: torch.export.save(program(), tmp))
    elif fmt == "onnx":
        with warnings.catch_warnings():  # torch's deprecation inside its own copy of the program: nothing to do
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            onnx = torch.onnx.export(program(), example, input_names=net.input_names, output_names=net.output_names,
                                     opset_version=opset, dynamo=True, external_data=False, verbose=False)
        rename_inner_values(onnx.model.graph)
        atomic_write(path, lambda tmp: onnx.save(str(tmp)))
    else:
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in net.net.state_dict().items()}, tmp))
    return path


def rename_inner_values(graph) -> None:
    """torch's ONNX exporter names each graph output as asked even where an inner value already has that name (a
    text embedder's token lookup is `embedding`, as is its output), and ONNX Runtime refuses a model with two
    values of one name: the inner ones are renamed."""
    outputs = {id(v) for v in graph.outputs}
    taken = {v.name for v in graph.outputs}
    for node in graph:
        for value in node.outputs:
            if value.name in taken and id(value) not in outputs:
                value.name = f"{value.name}.inner"


def write_config(folder: Path, name: str, net: Deployable | FusedDeployable, classes: list[str] | None,
                 assets: list[Path] | dict[str, Path]) -> None:
    """config.json (task, classes, model config, the input / output contract; a fused task's `fused`: each input's
    name, modality, model config section, exported inputs and assets) and the assets (tokenizer.json; a fused
    task's {path under folder: source}, caption/tokenizer.json) into `folder`, each atomically: what every format
    of the task shares."""
    folder.mkdir(parents=True, exist_ok=True)
    assets = assets if isinstance(assets, dict) else {a.name: a for a in assets}
    for rel, asset in assets.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / rel, asset.read_bytes())
    config = {"task": name, "modality": net.modality, "head": net.head, "classes": classes,
              "model": net.cfg.model_dump(), "inputs": net.contract, "outputs": net.output_names}
    if isinstance(net, FusedDeployable):
        config["fused"] = [{**i, "inputs": [x["name"] for x in REGISTRY[i["modality"]].inputs(c)],
                            "assets": sorted(r for r in assets if r.startswith(i["name"] + "/"))}
                           for i, c in zip(net.fused, net.configs)]
    atomic_write_text(folder / "config.json", json.dumps(config, indent=1))


def fused_assets(train_out: Path, task: str, fused: list[dict]) -> dict[str, Path]:
    """A fused task's assets: each input's modality's files (a text input's own tokenizer.json) that training kept
    under assets/<task>/<input>/ -> {<input>/<file>: that file}."""
    return {f"{i['name']}/{a}": train_out / "assets" / task / i["name"] / a for i in fused for a in REGISTRY[i["modality"]].assets}


def load_deployable(folder: str | Path) -> Deployable | FusedDeployable:
    """The eager model of an exported task, rebuilt from config.json and model.safetensors."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not an exported model (no config.json); run `tessera export` and pass "
                        f"models/export/<task>")
    config = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig.model_validate(config["model"])
    if config.get("fused"):
        fused = [{k: i[k] for k in ("name", "modality", "config")} for i in config["fused"]]
        net = fused_net(config["task"], fused, cfg, len(config["classes"]))
        net.load_state_dict(read_state_dict(folder / "model.safetensors"))
        return FusedDeployable(net, config["task"], fused, cfg).eval()
    net = build_task_model(config["modality"], cfg, len(config["classes"] or []), contrastive=config["head"] == CONTRASTIVE)
    net.load_state_dict(read_state_dict(folder / "model.safetensors"))
    return Deployable(net, config["modality"], config["head"], cfg).eval()


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) for x, y in zip(a, b))


def runner(fmt: str, folder: Path, net: Deployable) -> Callable[[tuple], list[np.ndarray]]:
    """folder/model.<fmt> loaded as a deployment would load it: positional inputs -> its outputs as arrays."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        return lambda args: session.run(None, {n: a.numpy() for n, a in zip(net.input_names, args)})
    if fmt == "pt2":
        with warnings.catch_warnings():  # torch.export.load reads weights from a read-only buffer, and says so
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
            program = torch.export.load(folder / "model.pt2").module()
        return lambda args: [o.numpy() for o in program(*args)]
    rebuilt = load_deployable(folder)
    return lambda args: [o.numpy() for o in rebuilt(*args)]


@torch.no_grad()
def eager_outputs(net: Deployable, batches: list[tuple]) -> list[list[np.ndarray]]:
    """The eager model's outputs on each batch: the reference every format of a task is checked against, computed
    once per task."""
    return [[o.numpy() for o in net(*args)] for args in batches]


@torch.no_grad()
def check_parity(fmt: str, folder: Path, net: Deployable, batches: list[tuple], refs: list[list[np.ndarray]]) -> dict:
    """folder/model.<fmt> against the eager `net`'s outputs `refs` (eager_outputs) on `batches` ->
    {<fmt>_max_abs_diff: the largest absolute output difference, <fmt>_argmax_agree: the share of samples whose
    argmax (class, or per-query class for detection) agrees; none for an embedding or a value}."""
    run, diffs, agree = runner(fmt, folder, net), [], 0
    for args, ref in zip(batches, refs):
        got = run(args)
        diffs.append(max_diff(ref, got))
        if net.kind and net.kind.argmax:  # an embedding or a value has no argmax; its difference is the check
            agree += int((ref[0].argmax(-1) == got[0].argmax(-1)).reshape(len(ref[0]), -1).all(1).sum())
    result = {f"{fmt}_max_abs_diff": max(diffs)}
    if net.kind and net.kind.argmax:
        result[f"{fmt}_argmax_agree"] = agree / sum(len(b[0]) for b in batches)
    return result


def parity_failure(name: str, fmt: str, metrics: dict, atol: float) -> str | None:
    """What fails in task `name`'s `fmt` by its figures in `metrics` (export.json's keys: <name>.<fmt>_max_abs_diff,
    ...), in a few words; None when it passes."""
    diff, agree = metrics[f"{name}.{fmt}_max_abs_diff"], metrics.get(f"{name}.{fmt}_argmax_agree", 1.0)
    failed = [f"max |diff| {diff:.3g}, not under export.atol {atol:g}"] if not diff < atol else []
    failed += [f"argmax agrees on {agree:.1%} of the samples, not all"] if agree < 1.0 else []
    return f"{name} {fmt}: {' and '.join(failed)}" if failed else None


def parity_message(failures: list[str], metrics: str) -> str:
    """The one line a failed export prints: each failure (parity_failure), what it means, where the figures are."""
    return (f"export parity failed: {'; '.join(failures)}. The exported model does not compute what the trained "
            f"model computes (the tolerance is export.atol in params.yaml); the figures are in {metrics}")


class ParityError(UserError):
    """An exported format that does not compute what the eager model computes."""


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


def export_format(fmt: str, folder: Path, name: str, net: Deployable, example: tuple, program: Callable,
                  batches: list[tuple], refs: list[list[np.ndarray]], params: Params, metrics: dict) -> dict:
    """A unit of work, `export <task> <fmt>`: folder/model.<fmt> written and checked against the eager `net` on
    `batches`. Its figures go into `metrics` (<task>.<fmt>_max_abs_diff, ...) before they are judged, so that
    export.json holds a failed format's too -> them; ParityError when they fail."""
    write_format(fmt, folder, net, example, program, params.export.opset)
    result = check_parity(fmt, folder, net, batches, refs)
    metrics.update({f"{name}.{k}": v for k, v in result.items()})
    if failure := parity_failure(name, fmt, metrics, params.export.atol):
        raise ParityError(parity_message([failure], params.export.metrics))
    return result


def export_models(params: Params, console: Console | None = None, unit: Unit = plain) -> dict:
    """`tessera export`: every task in every format (FORMATS), a unit of work each (`export <task> <format>`),
    checked, and described in a model card. A failed check fails its unit; the stage fails once every unit ran."""
    console = console or Console()
    cfg = params.export
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    model = load_trained(params.train.out)
    tasks = exported_tasks(model)
    folders = sorted({e.folder for e in tasks.values()})
    data = {f: (RecordsSplit if f in model.fused else ShardedSplit)(Path(params.prepare.out) / f, params.evaluate.split)
            for f in folders}
    for f, split in data.items():
        if len(split) == 0:
            raise UserError(f"export checks each model against the eager one on the evaluate.split, and {f}'s "
                            f"{params.evaluate.split} split is empty: set evaluate.split to one with samples, or add data")
    out, metrics, failures = Path(cfg.out), {}, []
    unit = Work(console, "exporting", len(tasks) * len(FORMATS), "unit").units(unit)  # a bar, or lines
    for name, (source, modality, head, task_model, net_cfg) in tasks.items():
        fused = model.fused.get(name)
        net = (FusedDeployable(task_model, name, fused, net_cfg) if fused else Deployable(task_model, modality, head, net_cfg)).eval()
        folder = out / name
        batches = parity_batches(data[source], modality, cfg.parity_samples, model.inputs(name))
        example = max(batches, key=lambda b: len(b[0]))
        if len(example[0]) == 1:  # export fixes a dimension it sees as 1: show it a batch of 2
            example = tuple(torch.cat([a, a]) for a in example)
        assets = (fused_assets(Path(params.train.out), name, fused) if fused else
                  [Path(params.train.out) / "assets" / source / a for a in net.spec.assets])
        write_config(folder, name, net, model.classes.get(name, contrastive_classes(model, name)), assets)
        write_check(folder, net, example, cfg.atol)
        metrics[f"{name}.samples"] = sum(len(b[0]) for b in batches)
        program, refs = traced(net, example), eager_outputs(net, batches)
        for fmt in FORMATS:
            try:
                result = unit(f"export {name} {fmt}", export_format, fmt, folder, name, net, example, program, batches,
                              refs, params, metrics)
            except ParityError:  # its unit failed with the message; the stage fails below, once every unit ran
                failures.append(parity_failure(name, fmt, metrics, cfg.atol))
                continue
            figures = ", ".join(f"{k.removeprefix(fmt + '_')} {v:.2g}" for k, v in result.items())
            console.print(f"exported {name} {fmt}: {figures} on {metrics[f'{name}.samples']} held-out samples")
    Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(cfg.metrics), json.dumps(metrics, indent=1))
    if failures:
        raise UserError(parity_message(failures, cfg.metrics))
    write_card(params, model, metrics, out)
    write_version(out, params)
    return metrics
