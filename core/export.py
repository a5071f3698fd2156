"""`tessera export`: each trained task as a deployable model, checked against the eager model before it ships.

<export.out>/<task>/
  model.onnx          ONNX, dynamic batch (and length for text and audio); run with onnxruntime
  model.pt2           a torch.export program: torch.export.load(path).module()(*inputs)
  model.safetensors   the task model's weights (adapter + backbone + head); config.json rebuilds it (`load_deployable`)
  config.json         task, classes, model config, and the input / output contract
  tokenizer.json      text only: the tokenizer the ids come from
<export.out>/README.md  the model card

Tasks: the classifiers (image, audio, text), detection, and the alignment embedders (align_<modality>).
Every artifact takes raw inputs: uint8 pixels, float waveforms (the log-mel front end is inside), token ids;
detection returns decoded boxes. Parity: each artifact runs on held-out samples next to the eager model;
the largest absolute output difference must stay under export.atol, and the argmax must agree on every sample.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from core.config import ModelConfig, Params
from core.data import atomic_write, atomic_write_text
from core.errors import UserError
from core.model import TaskModel
from core.tasks import HEAD_OF, MultiTaskModel, PreparedSplit, collate, load_trained, pcm_to_float, pixels_to_float
from modalities import build_task_model
from modalities.detection import decode


def contract(modality: str, cfg: ModelConfig) -> list[dict]:
    """The inputs of an exported model of `modality`: name, dtype, shape (names are dynamic), meaning."""
    if modality in ("image", "detection"):
        c = cfg.image if modality == "image" else cfg.detection
        return [{"name": "images", "dtype": "uint8", "shape": ["batch", c.in_chans, c.img_size, c.img_size],
                 "meaning": f"pixels 0-255, {'grey' if c.in_chans == 1 else 'RGB'}, resized to {c.img_size}x{c.img_size}"}]
    if modality == "audio":
        return [{"name": "waveform", "dtype": "float32", "shape": ["batch", "samples"],
                 "meaning": f"mono, {cfg.audio.sample_rate} Hz, in [-1, 1], zero-padded to the longest clip"},
                {"name": "lengths", "dtype": "int64", "shape": ["batch"], "meaning": "samples of each clip before padding"}]
    if modality == "text":
        return [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"],
                 "meaning": f"ids from tokenizer.json, at most {cfg.text.max_len} tokens"},
                {"name": "pad_mask", "dtype": "bool", "shape": ["batch", "tokens"], "meaning": "True at padding"}]
    raise ValueError(modality)


OUTPUTS = {"classification": ["logits"], "contrastive": ["embedding"],
           "detection": ["logits", "scores", "labels", "boxes"]}


class Deployable(nn.Module):
    """One task's model on its contract's raw inputs (positional, in `contract` order).

    classification -> logits [B, C]; contrastive -> unit embedding [B, P]; detection -> logits [B, Q, C + 1],
    scores [B, Q], labels [B, Q], boxes [B, Q, 4] xyxy in pixels of the model's input size.
    """

    def __init__(self, net: TaskModel, modality: str, head: str, cfg: ModelConfig):
        super().__init__()
        self.net, self.modality, self.head = net, modality, head
        self.input_names = [i["name"] for i in contract(modality, cfg)]
        self.img_size = cfg.detection.img_size
        self.audio_pad = cfg.audio.patch_size * cfg.audio.hop_length  # samples: one patch column of frames

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = dict(zip(self.input_names, args))
        if "images" in inputs:
            inputs["images"] = pixels_to_float(inputs["images"])
        if "waveform" in inputs:
            # torch.export takes a dynamic size to be at least 2, and a clip of one patch column (0.16 s by default)
            # would fail the program's guards. A column of zeros past every clip keeps it at two or more; `lengths`
            # masks it, so no output changes (tests/test_batch_independence.py holds every format to that).
            inputs["waveform"] = torch.nn.functional.pad(inputs["waveform"], (0, self.audio_pad))
        out = self.net(**inputs)
        if self.head == "classification":
            return (out["pred_logits"],)
        if self.head == "contrastive":
            return (out["pred_embed"],)
        sizes = torch.full((args[0].shape[0], 2), self.img_size, device=args[0].device)
        return (out["pred_logits"], *decode(out, sizes))


def exported_tasks(model: MultiTaskModel) -> dict[str, tuple[str, str, TaskModel]]:
    """{name: (modality, head kind, task model)} for everything the trained model can do."""
    tasks = {t: (t, HEAD_OF[t], model.task_model(t)) for t in model.classes if t != "align"}
    for m in model.align or ():
        tasks[f"align_{m}"] = (m, "contrastive", TaskModel(model.adapters[m], model.backbone, model.heads[f"align_{m}"]))
    return tasks


def contract_args(modality: str, inputs: dict) -> tuple[torch.Tensor, ...]:
    """A collated batch (core.tasks.collate) -> the exported model's positional inputs."""
    if modality in ("image", "detection"):
        return (inputs["images"],)
    if modality == "audio":
        return (pcm_to_float(inputs["waveform"]), inputs["lengths"])
    return (inputs["input_ids"], inputs["pad_mask"])


def parity_batches(dataset, modality: str, n: int) -> list[tuple[torch.Tensor, ...]]:
    """The first n held-out samples as batches of 1, then up to 16: both the single-sample path and the
    dynamic batch (and, for audio and text, lengths that differ between batches)."""
    n = min(n, len(dataset))
    cuts = [0, 1] + list(range(17, n, 16)) + [n]
    return [contract_args(modality, collate(modality, [dataset[i] for i in range(a, b)])[0])
            for a, b in zip(cuts, cuts[1:]) if b > a]


def dynamic_shapes(modality: str) -> tuple[dict, ...]:
    dyn = torch.export.Dim.DYNAMIC
    if modality in ("image", "detection"):
        return ({0: dyn},)
    if modality == "audio":
        return ({0: dyn, 1: dyn}, {0: dyn})
    return ({0: dyn, 1: dyn}, {0: dyn, 1: dyn})


def write_task(folder: Path, name: str, net: Deployable, example: tuple, cfg: ModelConfig, classes: list[str] | None,
               opset: int, tokenizer: Path | None) -> None:
    """model.pt2, model.onnx, model.safetensors, config.json (and tokenizer.json) into `folder`, each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    ep = torch.export.export(net, example, dynamic_shapes=(dynamic_shapes(net.modality),))  # forward(*args): one tuple
    atomic_write(folder / "model.pt2", lambda tmp: torch.export.save(ep, tmp))
    outputs = OUTPUTS[net.head]
    program = torch.onnx.export(ep, example, input_names=net.input_names, output_names=outputs, opset_version=opset,
                                dynamo=True, external_data=False, verbose=False)
    atomic_write(folder / "model.onnx", lambda tmp: program.save(str(tmp)))
    atomic_write(folder / "model.safetensors",
                 lambda tmp: save_file({k: v.contiguous() for k, v in net.net.state_dict().items()}, tmp))
    if tokenizer:
        atomic_write_text(folder / "tokenizer.json", tokenizer.read_text())
    config = {"task": name, "modality": net.modality, "head": net.head, "classes": classes, "model": cfg.model_dump(),
              "inputs": contract(net.modality, cfg), "outputs": outputs,
              "tokenizer": "tokenizer.json" if tokenizer else None}
    atomic_write_text(folder / "config.json", json.dumps(config, indent=1))


def load_deployable(folder: str | Path) -> Deployable:
    """The eager model of an exported task, rebuilt from config.json and model.safetensors."""
    from core.checkpoint import read_state_dict

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not an exported model (no config.json); run `tessera export` and pass "
                        f"models/export/<task>")
    config = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig.model_validate(config["model"])
    cfg.image.timm_checkpoint = None  # the weights are all in model.safetensors; the file trained from may be elsewhere
    net = build_task_model(config["modality"], config["head"], cfg, len(config["classes"] or []))
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
    runners = {
        "onnx": lambda args: session.run(None, {n: a.numpy() for n, a in zip(net.input_names, args)}),
        "pt2": lambda args, m=torch.export.load(folder / "model.pt2").module(): [o.numpy() for o in m(*args)],
        "safetensors": lambda args, m=load_deployable(folder): [o.numpy() for o in m(*args)],
    }
    result = {"samples": sum(len(b[0]) for b in batches)}
    refs = [[o.numpy() for o in net(*args)] for args in batches]
    for fmt, run in runners.items():
        diffs, agree = [], 0
        for args, ref in zip(batches, refs):
            got = run(args)
            diffs.append(max_diff(ref, got))
            if net.head != "contrastive":  # an embedding has no argmax; its difference is the check
                agree += int((ref[0].argmax(-1) == got[0].argmax(-1)).reshape(len(ref[0]), -1).all(1).sum())
        result[f"{fmt}_max_abs_diff"] = max(diffs)
        if net.head != "contrastive":
            result[f"{fmt}_argmax_agree"] = agree / result["samples"]
    return result


def parity_failures(name: str, result: dict, atol: float) -> list[str]:
    return [f"{name}.{k} = {v:.3g}" for k, v in result.items()
            if (k.endswith("max_abs_diff") and not v < atol) or (k.endswith("argmax_agree") and v < 1.0)]


def run(params: Params, console: Console | None = None) -> dict:
    """`tessera export`: every task exported, checked, and described in a model card; a failed check fails."""
    from core.card import write_card

    console = console or Console()
    cfg = params.export
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    model = load_trained(params.train.out)
    modalities = sorted({m for m, _, _ in exported_tasks(model).values()})
    data = {m: PreparedSplit(Path(params.prepare.out) / m, params.evaluate.split) for m in modalities}
    tokenizer = Path(params.train.out) / "tokenizer.json"
    out, metrics, failures = Path(cfg.out), {}, []
    for name, (modality, head, task_model) in exported_tasks(model).items():
        net = Deployable(task_model, modality, head, model.cfg).eval()
        batches = parity_batches(data[modality], modality, cfg.parity_samples)
        example = max(batches, key=lambda b: len(b[0]))
        if len(example[0]) == 1:  # export fixes a dimension it sees as 1: show it a batch of 2
            example = tuple(torch.cat([a, a]) for a in example)
        classes = model.classes.get(name if head != "contrastive" else "align")
        write_task(out / name, name, net, example, model.cfg, classes, cfg.opset,
                   tokenizer if modality == "text" and tokenizer.exists() else None)
        result = check_parity(out / name, net, batches)
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
    return metrics
