"""params.yaml's `sweep` section checked whole before any trial runs: every searched key is a key of params.yaml
and each bound is valid there, and the objective is a metric some stage writes (the names the tasks report,
core/tasks/metrics.py). The result, a `Plan`, says which stage a trial runs up to and where it reads the
objective."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tessera.core.config import Params, SweepConfig, load_params, parse_params
from tessera.core.errors import UserError
from tessera.core.tasks.metrics import reported_metrics


@dataclass
class Plan:
    """What a trial runs and reads: `dvc exp run <target>`, then the JSON at `metrics` in the trial's workspace,
    flattened (`flat_metrics`), where the objective is a key."""

    params: Params
    raw: dict
    target: str
    metrics: Path

    @property
    def cfg(self) -> SweepConfig:
        return self.params.sweep


def with_value(raw: dict, key: str, value) -> dict:
    """A copy of the raw params with `key` (dotted) set to `value`; a missing section or entry is created."""
    out = json.loads(json.dumps(raw or {}))
    node, parts = out, key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"params.yaml: sweep.space.{key}: {'.'.join(parts[:i + 1])} holds a value, not a section "
                            "of keys; name a key of params.yaml (`tessera params` lists them)")
    node[parts[-1]] = value
    return out


def check_space(path: Path, raw: dict, cfg: SweepConfig) -> None:
    """Each searched key set to its bounds (and, for a float range, a point between: a fraction where the key takes
    integers) still parses as params.yaml."""
    if not cfg.space:
        raise UserError(f"{path}: sweep.space is empty: name the params.yaml keys to search and their ranges, e.g.\n"
                        "  sweep:\n    space:\n      train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}")
    for key, dim in cfg.space.items():
        if key.split(".")[0] == "sweep":
            raise UserError(f"{path}: sweep.space.{key}: a sweep cannot search its own settings")
        probes = dim.choices if dim.choices is not None else [dim.low, dim.high]
        if dim.choices is None and not dim.is_int:
            probes = [*probes, dim.low + (dim.high - dim.low) * 0.37]
        for value in probes:
            try:
                parse_params(with_value(raw, key, value), f"{path} with {key}={value!r}")
            except UserError as e:
                raise UserError(f"{path}: sweep.space.{key} cannot be applied:\n{e}") from None


def plan_sweep(path: Path) -> Plan:
    """The sweep section of params.yaml at `path`, checked before any trial runs (a UserError names the key)."""
    params = load_params(path)
    raw = yaml.safe_load(path.read_text()) or {}
    cfg = params.sweep
    check_space(path, raw, cfg)
    tasks, pairs = list(params.train.tasks), params.pairs()
    if cfg.objective.startswith("val."):
        target, metrics, key = "train", Path(params.train.metrics), cfg.objective.removeprefix("val.")
        known = reported_metrics(tasks, pairs, False, params.model) | {"headline"}
    else:
        target, metrics, key = "evaluate", Path(params.evaluate.metrics), cfg.objective
        known = reported_metrics(tasks, pairs, True, params.model)
    if key not in known:
        where = "training's validation (val.<key>)" if target == "train" else "metrics/eval.json"
        names = sorted(("val." if target == "train" else "") + k for k in known)
        raise UserError(f"{path}: sweep.objective: {cfg.objective!r} is not a metric that {where} holds for "
                        f"the tasks {list(params.tasks)}; choose one of: {', '.join(names)}")
    return Plan(params, raw, target, metrics)


def flat_metrics(data: dict, target: str) -> dict:
    """A stage's metrics JSON as {key: number}: metrics/eval.json as it is; training's as val.<key> and test.<key>
    (the best checkpoint on the validation and the held-out split)."""
    if target == "train":
        data = {f"{split}.{k}": v for split in ("val", "test") for k, v in data.get(split, {}).items()}
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
