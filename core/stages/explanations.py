"""Explanations where people look: a page of held-out inputs per task in the evaluation report (and so in the
Prefect UI's evaluation artifact), their faithfulness as metrics and DVC plots; `tessera explain` on files
(core/entry/explain.py) draws the same way.

The maps are core/tasks/explain.py's; each modality draws its own input under them (its `Drawing`, modalities/draw.py).

<out>/figures/explain_<task>.png    held-out inputs, correct and wrong predictions both, with their maps
<out>/plots/deletion/<name>-<order>.json   {fraction, probability}: the explained probability as tokens go, most
                                           relevant first (attribution) or in a random order (random)
<out>/figures/deletion.png           the same curves
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tessera.core.config import ModelConfig
from tessera.core.data.batching import to_device
from tessera.core.data.files import atomic_write_text
from tessera.core.modality import Drawing
from tessera.core.nn.task_model import TaskModel
from tessera.core.stages.report import new_figure, save_figure
from tessera.core.tasks.datasets import collate_task
from tessera.core.tasks.explain import FRACTIONS, area, deletion, reference, score, token_relevance
from tessera.core.tasks.metrics import DELETION_AREAS
from tessera.core.tasks.multitask import MultiTaskModel
from tessera.core.units import Unit, plain
from tessera.modalities.draw import DRAWINGS

SAMPLES = 4  # correct and as many wrong predictions per task on the report's page
FAITHFULNESS = 64  # held-out inputs per task in the deletion curves


def relevance(net: TaskModel, drawing: Drawing, inputs: dict, method: str = "grad", target=None):
    """(relevance [B, L], outputs, pad_mask): the modality's own map, else the encoder's (token_relevance)."""
    if drawing.relevance:
        return drawing.relevance(net, inputs, method)
    return token_relevance(net, inputs, method, target)


def one(batch: dict, i: int) -> dict:
    return {k: v[i: i + 1] for k, v in batch.items() if torch.is_tensor(v)}


def draw(ax, drawing: Drawing, net: TaskModel, cfg: ModelConfig, inputs: dict, rel: torch.Tensor, out: dict,
         assets: Path | None, title: str) -> None:
    """Sample 0 of `inputs`, its relevance laid out over the input by the modality."""
    grid = rel[0, 1:].float().cpu().numpy()
    grid = grid.reshape(drawing.token_grid(net.adapter, len(grid)))
    drawing.draw_relevance(ax, inputs, grid / max(float(grid.max()), 1e-12), out, net, cfg, assets)
    ax.set_title(title, fontsize=9)


def prediction(out: dict, classes: list[str] | None) -> str:
    ref = reference(out)
    if "value" in ref:
        return f"{float(ref['value'][0, 0]):.4g}"
    p = float(score(out, ref, prob=True)[0])
    return f"{classes[int(ref['cls'][0])]} ({p:.2f})" if classes and "cls" in ref else ""


def explain_held_out(model: MultiTaskModel, data: dict, split: str, device: torch.device, out: Path,
                     prepared: Path, unit: Unit = plain) -> tuple[dict, list[str]]:
    """Each task's page of held-out inputs and its deletion curves, a unit of work per task (`explain <task>`),
    then the curves of all in one figure (`deletion curves`) -> (metrics, markdown lines for eval.md)."""
    model.eval()
    metrics, md = {}, ["## Explanations", "",
                       "Gradient-weighted attention rollout over the shared backbone (Chefer et al. 2021); detection: "
                       "each box and its query's gradient-weighted cross-attention. Deletion: the explained probability "
                       "as an input's tokens are removed most relevant first, against a random order (area under "
                       "each curve; lower falls faster). core/tasks/explain.py says how.", ""]
    for sub in ("figures", "plots/deletion"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    every_curve = {}
    for task in data:
        held_out = getattr(data[task], split)
        if len(held_out) == 0:
            continue
        if task in model.fused:  # each input's share and map side by side: not drawn yet (issue 25, section 6)
            md += [f"### {task}", "", f"{task} is a fused task: its explanations are not drawn yet.", ""]
            continue
        if by_sample(model, task):  # inputs of records, drawn as a fused task's will be
            md += [f"### {task}", "", f"{task} pairs inputs of records: its explanations are not drawn yet.", ""]
            continue
        curves = unit(f"explain {task}", explain_task, model, task, held_out, device, out, prepared)
        for name, (attribution, random) in curves.items():
            metrics.update(zip((f"{name}.{k}" for k in DELETION_AREAS), (area(attribution), area(random))))
        every_curve.update(curves)
        md += [f"### {task}", "", f"![explanations of {task}](figures/explain_{task}.png)", "",
               " ".join(f"{name}: deletion area {area(a):.3f} (random order {area(r):.3f})." for name, (a, r) in curves.items()), ""]
    if every_curve:
        unit("deletion curves", lambda: save_figure(deletion_figure(every_curve), out / "figures/deletion.png"))
        md += ["### Deletion curves", "", "![deletion curves](figures/deletion.png)", ""]
    return metrics, md


def explain_task(model: MultiTaskModel, task: str, held_out, device: torch.device, out: Path, prepared: Path) -> dict:
    """One task's page of up to FAITHFULNESS held-out inputs (figures/explain_<task>.png) and its deletion curves
    (plots/deletion/) -> {name: (attribution curve, random curve)}, a curve being len(FRACTIONS) probabilities."""
    n = min(len(held_out), FAITHFULNESS)
    pair = model.sides(task)
    inputs, targets = collate_task(task, pair, held_out.gather(torch.arange(n)))
    inputs = to_device(inputs, device)
    sides = [(m, model.embedder(task, m), inputs[m]) for m in pair] if pair else \
        [(task, model.task_model(task), inputs)]
    panels, curves = [], {}
    for k, (m, net, x) in enumerate(sides):
        partner = None
        if pair:  # the matched pair's other side: which regions drive their similarity
            other = sides[1 - k]
            with torch.no_grad():
                partner = other[1](**other[2])["pred_embed"]
        target = (lambda o, p=partner: (o["pred_embed"] * p).sum(-1)) if partner is not None else None
        rel, outputs, _ = relevance(net, DRAWINGS[m], x, "grad", target)
        name = f"{task}.{m}" if pair else task
        curves[name] = deletion(net, x, rel, partner)
        panels.append((m, net, x, rel, outputs, partner))
    chosen = pick(task, panels[0][4], targets, n)
    fig = new_figure(figsize=(2.8 * len(chosen), 2.8 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), len(chosen), squeeze=False)
    for row, (m, net, x, rel, outputs, partner) in enumerate(panels):
        for col, i in enumerate(chosen):
            title = (f"similarity {float((outputs['pred_embed'][i] * partner[i]).sum()):.2f}" if partner is not None
                     else f"{prediction(one(outputs, i), model.classes.get(task))}"
                     + ("" if not torch.is_tensor(targets) else f", true {truth(targets[i], model.classes[task])}"))
            draw(axes[row, col], DRAWINGS[m], net, model.cfg, one(x, i), rel[i: i + 1], one(outputs, i),
                 prepared / m, title)
    save_figure(fig, out / f"figures/explain_{task}.png")
    for name, (attribution, random) in curves.items():
        for order, curve in (("attribution", attribution), ("random", random)):
            atomic_write_text(out / f"plots/deletion/{name}-{order}.json",
                              json.dumps([{"fraction": f, "probability": float(v)} for f, v in zip(FRACTIONS, curve)]))
    return curves


def by_sample(model: MultiTaskModel, task: str) -> bool:
    """Whether `task` is a contrastive task over inputs of records (paired by sample)."""
    return any(s["config"] is not None for s in model.pairs.get(task, ()))


def truth(target: torch.Tensor, classes: list[str]) -> str:
    """A sample's target as a title says it: its class, or a regression's first value."""
    return f"{float(target.flatten()[0]):.4g}" if target.is_floating_point() else classes[int(target)]


def deletion_figure(curves: dict):
    fig = new_figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for k, (name, (attribution, random)) in enumerate(curves.items()):
        ax.plot(FRACTIONS, attribution, color=f"C{k}", label=f"{name}: most relevant first")
        ax.plot(FRACTIONS, random, color=f"C{k}", linestyle="--", label=f"{name}: random order")
    ax.set(xlabel="share of tokens removed", ylabel="probability of the prediction (contrastive: similarity)", title="deletion")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def pick(task: str, outputs: dict, targets, n: int) -> list[int]:
    """Up to SAMPLES correct and SAMPLES wrong predictions among the first n (a classifier's); the first ones
    for tasks without one class per input."""
    if torch.is_tensor(targets) and outputs.get("pred_logits") is not None and outputs["pred_logits"].dim() == 2:
        right = (outputs["pred_logits"].argmax(-1).cpu() == targets.cpu()).tolist()
        good = [i for i in range(n) if right[i]][:SAMPLES]
        bad = [i for i in range(n) if not right[i]][:SAMPLES]
        return good + bad
    return list(range(min(n, 2 * SAMPLES)))
