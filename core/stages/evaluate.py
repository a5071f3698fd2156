"""`tessera evaluate`: the trained model on the held-out split -> metrics JSON, DVC plots, PNG figures and
reports/eval.md (core/stages/report.py). Units of work (core/units.py): each task's metrics, the
robustness of the pairs by label, each task's explanations, the deletion curves, the report."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from tessera.core.config import Params
from tessera.core.data.files import atomic_write_text
from tessera.core.runtime.progress import Work
from tessera.core.stages.explanations import by_sample, explain_held_out
from tessera.core.stages.report import write_report
from tessera.core.tasks.datasets import load_task_data
from tessera.core.tasks.metrics import evaluate, robust_pairs, robustness
from tessera.core.tasks.multitask import load_trained
from tessera.core.units import Unit, plain


def evaluate_model(params: Params, console: Console | None = None, unit: Unit = plain) -> dict:
    console = console or Console()
    cfg = params.evaluate
    model = load_trained(params.train.out)
    tasks = [t for t in model.classes if t not in model.pairs]
    pairs = {t: tuple(s["input"] for s in sides) for t, sides in model.pairs.items()}
    data = load_task_data(Path(params.prepare.out), tasks, pairs, params.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    # a page each (contrastive pairs of records: none yet), then the curves of all
    explained = sum(len(getattr(data[t], cfg.split)) > 0 and not by_sample(model, t) for t in data)
    robust = robust_pairs(tasks, pairs, model.cfg)
    unit = Work(console, "evaluating", len(data) + len(robust) + explained + (explained > 0) + 1,
                "unit").units(unit)  # a bar, or a line per unit: metrics per task, robustness, explanations, report
    kept: dict = {}
    metrics = {}
    for t in data:
        metrics.update(unit(f"metrics {t}", evaluate, model, {t: data[t]}, cfg.split, device, cfg.batch_size, kept))
    details = {t: metric.details(model.classes[t], cfg.pr_points) for t, metric in kept.items()}
    for t in robust:
        metrics.update(unit(f"robustness {t}", robustness, model, t, getattr(data[t], cfg.split), device, cfg.batch_size))
    explained, sections = explain_held_out(model, data, cfg.split, device, Path(cfg.out), Path(params.prepare.out), unit)
    metrics.update(explained)
    unit("report", write_report, metrics, details, model.classes, Path(cfg.out), cfg.split, sections)
    Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(cfg.metrics), json.dumps(metrics, indent=1))
    console.print(f"evaluated {', '.join(model.classes)} on {cfg.split}: {cfg.metrics}, {cfg.out}/eval.md")
    return metrics
