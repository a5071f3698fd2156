"""The model card, models/export/README.md: what was trained, on what, how well, and how to call each model."""

from __future__ import annotations

import json
from pathlib import Path

from tessera.core.config import Params
from tessera.core.data.files import atomic_write_text
from tessera.core.stages.report import metrics_table
from tessera.core.tasks.multitask import MultiTaskModel


def _json(path: str) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def write_card(params: Params, model: MultiTaskModel, export_metrics: dict, out: Path) -> Path:
    b = model.cfg.backbone()
    n_params = sum(p.numel() for p in model.parameters())
    lines = ["# Tessera models", "",
             "One transformer encoder shared by every task below; each folder holds one task as ONNX (`model.onnx`), "
             "a torch.export program (`model.pt2`), and safetensors weights with `config.json`.", "",
             "## Configuration", "",
             f"Backbone `{model.cfg.size}`: width {b.embed_dim}, {b.depth} pre-LN blocks, {b.num_heads} heads, "
             f"MLP ratio {b.mlp_ratio}; {n_params / 1e6:.2f}M parameters in all (every head included). "
             f"Pooling: {model.cfg.pool}.", ""]
    pretrained = _json(str(Path(params.train.out) / "model.json")).get("pretrained")
    if pretrained:
        summary = _json(params.pretrain.metrics)
        unlabelled = sum((summary.get("unlabelled") or {}).values())
        lines += [f"Started from self-supervised pretraining (`tessera pretrain`, run {pretrained}: "
                      f"{summary.get('steps')} steps of masked prediction over every task's training inputs"
                      + (f" and {unlabelled} unlabelled ones" if unlabelled else "") + ").", ""]
    prepared = _json(params.prepare.metrics)
    if prepared:
        lines += ["## Data", "", "| modality | train | val | test | quarantined |", "|---|---|---|---|---|"]
        for m, splits in prepared.items():
            q = sum(s["quarantined"] for s in splits.values())
            lines.append(f"| {m} | " + " | ".join(str(splits.get(s, {}).get("prepared", 0)) for s in ("train", "val", "test"))
                         + f" | {q} |")
        lines.append("")
    evaluated = _json(params.evaluate.metrics)
    if evaluated:
        lines += [f"## Metrics ({params.evaluate.split} split)", "", metrics_table(evaluated), ""]
    lines += ["## Tasks", ""]
    for folder in sorted(p for p in out.iterdir() if (p / "config.json").is_file()):
        config = json.loads((folder / "config.json").read_text())
        name = config["task"]
        stats = config["model"].get("targets", {}).get(name)  # a regression's: its outputs are in the target's units
        about = (f" Targets: {', '.join(config['classes'])} (training mean {stats['mean']}, std {stats['std']})." if stats
                 else f" Classes: {', '.join(config['classes'])}." if config["classes"] else "")
        lines += [f"### {name}", "", f"Kind: {config['head']}. Outputs: {', '.join(config['outputs'])}." + about, "",
                  "| input | dtype | shape | meaning |", "|---|---|---|---|"]
        lines += [f"| {i['name']} | {i['dtype']} | [{', '.join(map(str, i['shape']))}] | {i['meaning']} |"
                  for i in config["inputs"]]
        parity = {k.split(".", 1)[1]: v for k, v in export_metrics.items() if k.startswith(name + ".")}
        lines += ["", "Parity with the eager model on held-out samples: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in parity.items()) + ".", ""]
    lines += ["## Use", "", "```bash", f"tessera predict {out}/<task> FILE_OR_DIR... [--json]", "```", "",
              "```python", "import onnxruntime as ort", f"session = ort.InferenceSession('{out}/<task>/model.onnx')",
              "outputs = session.run(None, {name: array, ...})  # the inputs its table above lists", "```", ""]
    atomic_write_text(out / "README.md", "\n".join(lines))
    return out / "README.md"
