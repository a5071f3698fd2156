"""params.yaml's `sweep` section checked whole before any trial runs: every searched key is a key of params.yaml
and each bound is valid there (a fused task's keys, train.modality_dropout.<task>.<input> and train.weights.<task>,
name a task that trains and one of its inputs), and the objective is a metric some stage writes (the names the tasks report,
core/tasks/metrics.py). The result, a `Plan`, says which stage a trial runs up to and where it reads the
objective."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tessera.core.config import RECORDS, Params, SweepConfig, load_params, parse_params
from tessera.core.errors import UserError
from tessera.core.tasks.metrics import reported_metrics
from tessera.modalities.records import check_kinds, inputs_of


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


def input_names(name: str, params: Params) -> list[str] | None:
    """The inputs of the records source `name` (modalities/records.py: each image, audio and text column, then
    `table`), from its declared columns, else from its training table; None while that table does not exist yet (a
    generated one: training's model then names a wrong input, modality_dropout's own check)."""
    src = params.prepare.sources[name]
    if src.columns is None and not Path(src.train).is_file():
        return None
    return [i.name for i in inputs_of(src.columns if src.columns is not None else check_kinds(name, src))]


def check_task_keys(path: Path, params: Params, cfg: SweepConfig) -> None:
    """Each searched train.modality_dropout.<task>.<input> names a fused task that trains and one of its inputs, and
    each train.weights.<task> a task that trains, in one message naming the key and what it may name (before the
    generic parse, whose message would name a section of params.yaml rather than the searched key)."""
    tasks = list(params.tasks)
    fused = [t for t in params.train.tasks if t in params.prepare.sources and params.prepare.sources[t].format == RECORDS]
    for key in cfg.space:
        parts = key.split(".")
        if parts[0] != "train" or len(parts) < 2:
            continue
        section, rest = parts[1], parts[2:]
        if section == "weights" and (len(rest) != 1 or rest[0] not in tasks):
            raise UserError(f"{path}: sweep.space.{key}: a loss weight is searched per task, as train.weights.<task>, "
                            f"and the tasks that train are {tasks}; name one of them")
        if section != "modality_dropout":
            continue
        if len(rest) != 2 or rest[0] not in fused:
            raise UserError(f"{path}: sweep.space.{key}: modality dropout is searched per fused task and input, as "
                            f"train.modality_dropout.<task>.<input>, and the fused tasks that train are {fused} (records "
                            "sources in train.tasks); name one of them and one of its inputs")
        names = input_names(rest[0], params)
        if names is not None and rest[1] not in names:
            raise UserError(f"{path}: sweep.space.{key}: {rest[0]} has no input {rest[1]!r}; its inputs are {names} "
                            f"(each image, audio and text column of {params.prepare.sources[rest[0]].train}, and "
                            "`table` for its numeric and categorical ones)")


def plan_sweep(path: Path) -> Plan:
    """The sweep section of params.yaml at `path`, checked before any trial runs (a UserError names the key)."""
    params = load_params(path)
    raw = yaml.safe_load(path.read_text()) or {}
    cfg = params.sweep
    check_task_keys(path, params, cfg)
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
