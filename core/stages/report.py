"""The evaluation report: DVC plot data, PNG figures and a markdown page, from the results of
`tessera.core.stages.evaluate.evaluate_model`.

<out>/plots/confusion/<task>.json   one {actual, predicted} row per sample (DVC's confusion template)
<out>/plots/pr/<task>.json          {recall, precision} rows of the task's precision-recall curve
<out>/figures/confusion_<task>.png   the same as pictures, and figures/pr.png
<out>/plots/scatter/<task>.json     a regression's {actual, predicted} row per sample, and figures/scatter_<task>.png
<out>/eval.md                       tables of every metric and the pictures
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tessera.core.data.files import atomic_write_bytes, atomic_write_text


def new_figure(**kwargs) -> Figure:
    """A figure (Figure's keywords: figsize, layout) drawn by Agg in memory. matplotlib's object API, not pyplot: no
    backend is chosen for the process (a notebook that imports Tessera keeps its own), no figure is kept open."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)  # its renderer measures text as it is placed (modalities/text/draw.py)
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # a constrained grid too crowded for its titles: bbox "tight" still frames it all
        warnings.filterwarnings("ignore", "constrained_layout not applied because axes sizes collapsed", UserWarning)
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def confusion_figure(matrix: list[list[int]], classes: list[str], title: str):
    m = np.asarray(matrix)
    fig = new_figure(figsize=(1 + 0.45 * len(classes), 0.8 + 0.45 * len(classes)))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > m.max() / 2 else "black")
    return fig


def scatter_figure(actual: list[float], predicted: list[float], title: str):
    """Predicted against true values, with the diagonal where they would be equal."""
    fig = new_figure(figsize=(4.5, 4.2))
    ax = fig.subplots()
    ax.scatter(actual, predicted, s=10, alpha=0.6)
    lo, hi = min(actual + predicted), max(actual + predicted)
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="true", ylabel="predicted", title=title)
    ax.grid(alpha=0.3)
    return fig


def pr_figure(curves: dict[str, dict]):
    fig = new_figure(figsize=(5, 4))
    ax = fig.subplots()
    for task, c in curves.items():
        ax.plot(c["recall"], c["precision"], label=task)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return fig


def metrics_table(metrics: dict) -> str:
    """Markdown: a row per task, its metrics as `name value` cells."""
    by_task: dict[str, list[str]] = {}
    for key, value in metrics.items():
        task, name = key.split(".", 1)
        by_task.setdefault(task, []).append(f"{name} {value:g}" if name.endswith(("median_rank", "unmatched")) else f"{name} {value:.4f}")
    lines = ["| task | metrics |", "|---|---|"] + [f"| {t} | {', '.join(v)} |" for t, v in by_task.items()]
    return "\n".join(lines)


def write_report(metrics: dict, details: dict, classes: dict[str, list[str]], out: Path, split: str,
                 sections: list[str] = ()) -> Path:
    """Writes every file above, and eval.md with the markdown lines of `sections` at its end; returns its path."""
    for sub in ("plots/confusion", "plots/pr", "plots/scatter", "figures"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    md = [f"# Evaluation on the {split} split", "", metrics_table(metrics), ""]
    for task, d in details.items():
        if "scatter" in d:
            sc = d["scatter"]
            atomic_write_text(out / f"plots/scatter/{task}.json", json.dumps(
                [{"actual": a, "predicted": p} for a, p in zip(sc["actual"], sc["predicted"])]))
            save_figure(scatter_figure(sc["actual"], sc["predicted"], f"{task}: {sc['name']} on {split}"),
                        out / f"figures/scatter_{task}.png")
            md += [f"## {task}", "", f"![predicted against true {sc['name']}](figures/scatter_{task}.png)", ""]
        if "pr" not in d:
            continue
        atomic_write_text(out / f"plots/pr/{task}.json",
                          json.dumps([{"recall": r, "precision": p} for r, p in zip(d["pr"]["recall"], d["pr"]["precision"])]))
        if "confusion" not in d:
            continue
        names = classes[task]
        atomic_write_text(out / f"plots/confusion/{task}.json", json.dumps(
            [{"actual": names[a], "predicted": names[p]} for a, p in zip(d["actual"], d["predicted"])]))
        save_figure(confusion_figure(d["confusion"], names, f"{task}: confusion on {split}"), out / f"figures/confusion_{task}.png")
        md += [f"## {task}", "", f"![confusion matrix](figures/confusion_{task}.png)", "",
               "| class | precision | recall | support |", "|---|---|---|---|"]
        md += [f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['support']} |" for r in d["per_class"]]
        md.append("")
    if any("pr" in d for d in details.values()):
        save_figure(pr_figure({t: d["pr"] for t, d in details.items() if "pr" in d}), out / "figures/pr.png")
        md += ["## Precision-recall", "",
               "Classification: micro-averaged one-vs-rest over score thresholds. Detection: COCO's interpolated "
               "precision at IoU 0.5, averaged over classes.", "", "![precision-recall curves](figures/pr.png)", ""]
    atomic_write_text(out / "eval.md", "\n".join(md + list(sections)))
    return out / "eval.md"
