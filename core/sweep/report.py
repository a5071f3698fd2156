"""A sweep's results: the trials table (reports/sweep/trials.csv, which DVC plots as the objective over trials),
each parameter's importance (importance.json), a picture of both (sweep.png), a page (sweep.md), and the best
trial in metrics/sweep.json."""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import optuna
from matplotlib.figure import Figure
from optuna.trial import TrialState

from tessera.core.config import SweepConfig
from tessera.core.data.files import atomic_write_bytes, atomic_write_text

REPORT = Path("reports/sweep")
METRICS = Path("metrics/sweep.json")


def state_name(t: optuna.trial.FrozenTrial) -> str:
    if t.user_attrs.get("interrupted"):
        return "interrupted"
    return {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
            "WAITING": "waiting"}[t.state.name]


def importance(study: optuna.Study) -> dict[str, float]:
    """Each parameter's share of the objective's variance over complete trials (Optuna's default evaluator);
    empty while fewer than two complete trials differ."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):
        return {}


def trial_rows(study: optuna.Study, cfg: SweepConfig) -> list[dict]:
    """One row per trial, in order: its state, objective, where it was pruned, seconds, experiment, the value of
    each searched key ("(params.yaml)" where it kept today's), and whether it is the baseline."""
    return [{"trial": t.number, "state": state_name(t), "objective": t.user_attrs.get("objective"),
             "pruned_at": t.user_attrs.get("pruned_at"), "seconds": t.user_attrs.get("seconds"),
             "experiment": t.user_attrs.get("experiment"), **{k: t.params.get(k, "(params.yaml)") for k in cfg.space},
             "baseline": bool(t.user_attrs.get("baseline"))}
            for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]


def summarize(study: optuna.Study, rows: list[dict], weights: dict, cfg: SweepConfig) -> dict:
    """metrics/sweep.json: trials by state, their seconds, the best trial (experiment, params, metrics), the
    baseline's value and the importances."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    baseline = next((t for t in sorted(complete, key=lambda t: t.number) if t.user_attrs.get("baseline")), None)
    return {
        "objective": cfg.objective, "direction": cfg.direction,
        "trials": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "interrupted")},
        "seconds": round(sum(r["seconds"] or 0 for r in rows), 1),
        "best": None if best is None else {"trial": best.number, "experiment": best.user_attrs.get("experiment"),
                                           "value": best.value, "params": best.params,
                                           "metrics": best.user_attrs.get("metrics", {})},
        "baseline": None if baseline is None else {"trial": baseline.number, "value": baseline.value},
        "importance": weights,
    }


def write_results(study: optuna.Study, cfg: SweepConfig, repo: Path) -> dict:
    """reports/sweep/ and metrics/sweep.json under `repo`. Returns the rows, the importances and the summary."""
    rows = trial_rows(study, cfg)
    weights = importance(study)
    summary = summarize(study, rows, weights, cfg)
    out = repo / REPORT
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "trials.csv", buf.getvalue())
    atomic_write_text(out / "importance.json", json.dumps([{"param": k, "importance": v} for k, v in weights.items()]))
    png = io.BytesIO()
    sweep_figure(rows, weights, cfg).savefig(png, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(out / "sweep.png", png.getvalue())
    atomic_write_text(out / "sweep.md", markdown(rows, weights, summary, cfg))
    (repo / METRICS).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(repo / METRICS, json.dumps(summary, indent=1))
    return {"rows": rows, "importance": weights, "summary": summary}


def sweep_figure(rows: list[dict], weights: dict, cfg: SweepConfig) -> Figure:
    """Left: the objective of each trial by state, the best so far and the baseline; right: the importances.
    A `Figure` of its own (no pyplot): no backend, no global figure list."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    better = max if cfg.direction == "maximize" else min
    best, xs, ys = None, [], []
    for state, marker, color in (("complete", "o", "C0"), ("pruned", "x", "C1"), ("failed", "s", "C3")):
        pts = [(r["trial"], r["objective"]) for r in rows if r["state"] == state and r["objective"] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=state)
    for r in rows:
        if r["state"] == "complete" and r["objective"] is not None:
            best = r["objective"] if best is None else better(best, r["objective"])
            xs.append(r["trial"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C2", label="best so far")
    for r in rows:
        if r["baseline"] and r["objective"] is not None:
            ax.axhline(r["objective"], color="grey", linestyle="--", label="baseline (params.yaml)")
    ax.set(xlabel="trial", ylabel=cfg.objective, title=f"sweep {cfg.name}: {cfg.objective} ({cfg.direction})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    names = list(weights)[::-1]
    bx.barh(names, [weights[n] for n in names], color="C0")
    bx.set(xlabel="importance (share of the objective's variance)", title="parameter importance")
    if not names:
        bx.text(0.5, 0.5, "needs two complete trials that differ", ha="center", va="center", transform=bx.transAxes)
    return fig


def fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], weights: dict, summary: dict, cfg: SweepConfig) -> str:
    best, base = summary["best"], summary["baseline"]
    lines = [f"# Sweep {cfg.name}", "",
             f"Objective: {cfg.objective} ({cfg.direction}). Trials: " +
             ", ".join(f"{n} {s}" for s, n in summary["trials"].items() if n) + f"; {summary['seconds']:.0f} s of trials.", ""]
    if best:
        lines += [f"Best: trial {best['trial']} (`dvc exp apply {best['experiment']}`), {cfg.objective} = "
                  f"{best['value']:.4f}" + (f", against {base['value']:.4f} for the baseline (trial {base['trial']})"
                                             if base else "") + ".", ""]
    header = ["trial", "state", "objective", "pruned_at", "seconds", "experiment", *cfg.space]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(r[h]) + (" (baseline)" if h == "trial" and r["baseline"] else "") for h in header) + " |"
              for r in rows]
    if weights:
        lines += ["", "| parameter | importance |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in weights.items()]
    lines += ["", "![the objective over trials and each parameter's importance](sweep.png)", ""]
    return "\n".join(lines)
