"""Explanations where people look: a page of held-out inputs per task in the evaluation report (and so in the
Prefect UI's evaluation artifact), their faithfulness as metrics and DVC plots; `tessera explain` on files
(core/entry/explain.py) draws the same way.

The maps are core/tasks/explain.py's; each modality draws its own input under them (its `Drawing`, modalities/draw.py).

<out>/figures/explain_<task>.png    held-out inputs, correct and wrong predictions both, with their maps; for a
                                     fused task a column per record, each input's map in its row, titled with its
                                     share of the relevance (an absent input says so)
<out>/plots/deletion/<name>-<order>.json   {fraction, probability}: the explained probability as tokens go, most
                                           relevant first (attribution) or in a random order (random)
<out>/figures/deletion.png           the same curves
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from tessera.core.config import ModelConfig
from tessera.core.data.batching import to_device
from tessera.core.data.files import atomic_write_text
from tessera.core.modality import Drawing
from tessera.core.nn.task_model import TaskModel
from tessera.core.stages.report import new_figure, save_figure
from tessera.core.tasks.datasets import collate_task
from tessera.core.tasks.explain import (FRACTIONS, area, deletion, input_shares, input_spans, reference, score,
                                        token_relevance)
from tessera.core.tasks.metrics import DELETION_AREAS
from tessera.core.tasks.multitask import MultiTaskModel, input_config
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
    """Sample i of a batch of tensors (a fused task's: of each input's too), as a batch of one."""
    return {k: one(v, i) if isinstance(v, dict) else v[i: i + 1] for k, v in batch.items()
            if isinstance(v, dict) or torch.is_tensor(v)}


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
                       "each curve; lower falls faster). A fused task: the same map over its inputs' tokens together, "
                       "each input's share of it, and each input's map. core/tasks/explain.py says how.", ""]
    for sub in ("figures", "plots/deletion"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    every_curve = {}
    for task in data:
        held_out = getattr(data[task], split)
        if len(held_out) == 0:
            continue
        if by_sample(model, task):  # inputs of records, drawn as a fused task's could be
            md += [f"### {task}", "", f"{task} pairs inputs of records: its explanations are not drawn yet.", ""]
            continue
        if task in model.fused:
            curves, shares = unit(f"explain {task}", explain_fused, model, task, held_out, device, out, prepared)
        else:
            curves, shares = unit(f"explain {task}", explain_task, model, task, held_out, device, out, prepared), {}
        for name, (attribution, random) in curves.items():
            metrics.update(zip((f"{name}.{k}" for k in DELETION_AREAS), (area(attribution), area(random))))
        every_curve.update(curves)
        md += [f"### {task}", "", f"![explanations of {task}](figures/explain_{task}.png)", "",
               " ".join(f"{name}: deletion area {area(a):.3f} (random order {area(r):.3f})." for name, (a, r) in curves.items()),
               "", *share_lines(shares)]
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
    write_curves(out, curves)
    return curves


def explain_fused(model: MultiTaskModel, task: str, held_out, device: torch.device, out: Path,
                  prepared: Path) -> tuple[dict, dict]:
    """A fused task's page (figures/explain_<task>.png): a column per chosen held-out record, a row per input, each
    input's map laid over it by its modality and titled with its share of the relevance (core/tasks/explain.py:
    input_shares), an absent input marked absent; and the deletion curves over the whole fused sequence (plots/
    deletion/). -> ({task: (attribution curve, random curve)}, {input: (mean share over the records that have it,
    how many records have it, of how many)})."""
    n = min(len(held_out), FAITHFULNESS)
    inputs, targets = collate_task(task, None, held_out.gather(torch.arange(n)), model.inputs(task))
    inputs = to_device(inputs, device)
    net = model.task_model(task)
    rel, outputs, _ = token_relevance(net, inputs, "grad")  # [n, L] over the fused sequence
    spans = input_spans(net.adapter, inputs)
    shares, present = input_shares(rel, spans).cpu(), inputs["present"].cpu()  # [n, K] each
    curves = {task: deletion(net, inputs, rel)}
    chosen = pick(task, outputs, targets, n, SAMPLES // 2)  # a column holds every input: half as many records
    fig = new_figure(figsize=(2.8 * len(chosen), 2.8 * len(spans)), layout="constrained")
    axes = fig.subplots(len(spans), len(chosen), squeeze=False)
    for col, i in enumerate(chosen):
        said = f"{prediction(one(outputs, i), model.classes[task])}, true {truth(targets[i], model.classes[task])}"
        draw_record(axes[:, col], net, model.cfg, model.fused[task], one(inputs, i), rel[i: i + 1], spans,
                    one(outputs, i), prepared / task, said)
    save_figure(fig, out / f"figures/explain_{task}.png")
    write_curves(out, curves)
    have = present.sum(0)  # [K]
    mean = (shares * present).sum(0) / have.clamp(min=1)
    return curves, {name: (float(mean[k]), int(have[k]), n) for k, name in enumerate(spans)}


def draw_record(axes, net: TaskModel, cfg: ModelConfig, fused: list[dict], sample: dict, rel: torch.Tensor,
                spans: dict[str, slice], out: dict, assets: Path, said: str) -> dict[str, float]:
    """One record of a fused task on `axes`, one per input in `fused`'s order (the model card's inputs: name,
    modality, config): each present input's map laid over it by its modality and titled with its share of the
    relevance (input_shares), an absent input marked absent; `said` (the prediction) above the first. What the
    report's columns and `tessera explain`'s pictures of a record both draw.
    sample: the record as a batch of one (each input's inputs, present [1, K]); rel [1, L]: its relevance over the
    fused sequence, whose tokens `spans` divides (input_spans, of the batch rel came from: a text's padding makes
    L depend on it); out: its outputs; assets: each input's assets under <assets>/<input>/.
    -> {input: its share}, as the titles say it (0 for an absent input)."""
    shares = input_shares(rel, spans)[0]  # [K]
    for k, (inp, ax) in enumerate(zip(fused, axes)):
        name = inp["name"]
        if sample["present"][0, k]:  # the drawings read only the task model's adapter: the input's own
            draw(ax, DRAWINGS[inp["modality"]], SimpleNamespace(adapter=net.adapter.adapters[name]),
                 input_config(cfg, inp), sample[name], rel[:, spans[name]], out, assets / name,
                 f"{name}: share {float(shares[k]):.2f}")
        else:
            ax.text(0.5, 0.5, "absent", ha="center", va="center", color="grey", transform=ax.transAxes)
            ax.set_axis_off()
            ax.set_title(f"{name}: absent", fontsize=9)
    axes[0].set_title(f"{said}\n{axes[0].get_title()}", fontsize=9)
    return {name: float(shares[k]) for k, name in enumerate(spans)}


def share_lines(shares: dict) -> list[str]:
    """The report's line on a fused task's inputs: each one's mean share of the relevance where it is present."""
    if not shares:
        return []
    return ["Each input's share of the relevance, the mean over the held-out records that have it: "
            + ", ".join(f"{name} {share:.2f} ({have} of {n} records)" for name, (share, have, n) in shares.items()) + ".", ""]


def write_curves(out: Path, curves: dict) -> None:
    """plots/deletion/<name>-<order>.json: {fraction, probability} per step of each curve."""
    for name, (attribution, random) in curves.items():
        for order, curve in (("attribution", attribution), ("random", random)):
            atomic_write_text(out / f"plots/deletion/{name}-{order}.json",
                              json.dumps([{"fraction": f, "probability": float(v)} for f, v in zip(FRACTIONS, curve)]))


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


def pick(task: str, outputs: dict, targets, n: int, k: int = SAMPLES) -> list[int]:
    """Up to k correct and k wrong predictions among the first n (a classifier's); the first ones for tasks
    without one class per input."""
    if torch.is_tensor(targets) and outputs.get("pred_logits") is not None and outputs["pred_logits"].dim() == 2:
        right = (outputs["pred_logits"].argmax(-1).cpu() == targets.cpu()).tolist()
        good = [i for i in range(n) if right[i]][:k]
        bad = [i for i in range(n) if not right[i]][:k]
        return good + bad
    return list(range(min(n, 2 * k)))
