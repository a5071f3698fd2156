"""`tessera pretrain`: self-supervised pretraining of the adapters and the shared backbone before `train`, which
starts from what it writes when pretrain.enabled is true (core/stages/train.py, `start_from_pretrained`).

Every task's training inputs (labels unused), and after them its source's unlabelled inputs where it has some
(prepare.sources.<modality>.unlabelled, prepared into the split `unlabelled`), go through one objective, masked
prediction of an EMA teacher's states (core/nn/pretrain.py); each step draws one task's batch by train.schedule.
The pieces are training's: the model it builds (`build_model`, so the adapters are those `train` makes from the
same prepared data), its task streams, schedule, optimizer groups, warmup-cosine and checkpoints. Batches, schedule
and masks are functions of (seed, task, epoch, sample), so a run resumed from its latest checkpoint (every
train.eval_every steps) takes the steps the interrupted one would have. One process: the stage is a fraction of
training's cost (the encoder sees 1 - mask_ratio of the tokens).

pretrain.out: model.safetensors (the `adapters.*` and `backbone.*` of the training model; the teacher and the
decoder stay in the checkpoints) and pretrain.json (on or off, the run's signature, the tasks, each task's
unlabelled samples).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

from tessera.core.config import Params, by_sample
from tessera.core.data.batching import to_device
from tessera.core.data.files import UNLABELLED, atomic_write, atomic_write_text
from tessera.core.data.shards import ShardedSplit
from tessera.core.nn.pretrain import MaskedPrediction, sample_seeds
from tessera.core.runtime.callbacks import Callbacks, RunInfo
from tessera.core.runtime.checkpoint import CheckpointManager, rng_state, set_rng_state
from tessera.core.runtime.distributed import init_distributed
from tessera.core.runtime.dvclive_logger import DVCLiveLogger
from tessera.core.runtime.progress import progress_callbacks
from tessera.core.stages.train import (PACKAGE_ROOT, TRAINING_CODE, TaskStream, build_streams, check_data, data_key,
                                       describe_groups, param_groups, pick_task, seed, task_probabilities, warmup_cosine)
from tessera.core.tasks.datasets import TaskData, collate_task, load_task_data
from tessera.core.tasks.multitask import build_model
from tessera.core.units import Unit, plain

# The files it imports (tests/test_layout.py holds them equal; dvc.yaml's pretrain stage depends on them, and the
# signature hashes them): training's, but for its process entry, and its own
PRETRAIN_CODE = (*(f for f in TRAINING_CODE if not f.startswith("core/entry/")), "core/nn/pretrain.py",
                 "core/stages/pretrain.py", "core/units.py")
# training's keys that pretraining reads (dvc.yaml's pretrain stage lists them): a change elsewhere in `train`
# (epochs, lr) retrains but does not pretrain again; modality_dropout is none of them (adapters pretrain in eval mode)
TRAIN_KEYS = ("schedule", "temperature", "shuffle_buffer", "batch_size",
              "weight_decay", "warmup_steps", "grad_clip", "seed")


class Indexed:
    """A split whose gathered batches also hold each sample's index in it ("index" [B]), which its mask is drawn
    from; the rest of the split as it is."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getattr__(self, name):
        if name == "split":  # not set yet: a DataLoader worker unpickling it
            raise AttributeError(name)
        return getattr(self.split, name)

    def gather(self, rows: torch.Tensor, *args) -> dict:
        return {**self.split.gather(rows, *args), "index": rows.clone()}


def with_unlabelled(split, folder: Path):
    """A task's training split, followed by its prepared unlabelled samples where its source has them (one split,
    without labels: pretraining uses none); a split without them as it is."""
    if UNLABELLED not in split.meta["splits"]:
        return split
    return ShardedSplit(folder, ("train", UNLABELLED))


def signature(params: Params) -> str:
    """A checkpoint resumes only a run of the same model, pretraining settings, training keys it reads, prepared
    data and code (as training's run_signature)."""
    keys = [{t: task.model_dump() for t, task in params.tasks.items()}, params.model.model_dump(), params.prepare.model_dump(),
            params.pretrain.model_dump(exclude={"out", "metrics"}),
            params.train.model_dump(include=set(TRAIN_KEYS))]
    prepared = Path(params.prepare.out)
    data = {m: data_key(prepared / m) for m in names_of(params) if (prepared / m / "meta.json").exists()}
    code = hashlib.sha256(b"".join((PACKAGE_ROOT / f).read_bytes() for f in PRETRAIN_CODE)).hexdigest()
    return hashlib.sha256(json.dumps([*keys, data, code], sort_keys=True).encode()).hexdigest()[:16]


def names_of(params: Params) -> list[str]:
    """The adapters pretrained: each task's (a fused task's is its FusedAdapter), then each modality a contrastive
    task pairs by label. A records input's own adapter (a pair by sample, `shop.photo`) is not pretrained yet."""
    by_label = [m for pair in params.pairs().values() for m in pair if not by_sample(m)]
    return list(dict.fromkeys([*params.train.tasks, *by_label]))


def pretrain_model(params: Params, console: Console | None = None, unit: Unit = plain) -> dict:
    """Pretrains (or, off, says so in pretrain.out) and returns the metrics written to pretrain.metrics."""
    console, cfg, out = console or Console(), params.pretrain, Path(params.pretrain.out)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.enabled:
        (out / "model.safetensors").unlink(missing_ok=True)  # `train` must not find weights of an earlier run
        return write_summary(params, {"enabled": False})
    check_data(params)
    return unit("pretrain", run_pretraining, params, console)


def run_pretraining(params: Params, console: Console) -> dict:
    cfg, train, out = params.pretrain, params.train, Path(params.pretrain.out)
    d = init_distributed()
    callbacks = Callbacks([*progress_callbacks(console, out), DVCLiveLogger(out / "dvclive", console)])
    seed(train)
    names = names_of(params)
    data = load_task_data(Path(params.prepare.out), names, None, train.seed)
    pooled = {t: with_unlabelled(data[t].train, Path(params.prepare.out) / t) for t in names}
    unlabelled = {t: len(pooled[t]) - len(data[t].train) for t in names}
    model = build_model(params.model, Path(params.prepare.out), list(train.tasks), params.pairs(), train.modality_dropout)
    objective = MaskedPrediction(model.adapters, model.backbone, cfg.mask_ratio, cfg.teacher_decay,
                                 cfg.decoder_depth).to(d.device)
    groups = param_groups(objective, train.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train.warmup_steps, cfg.steps))
    indexed = {t: TaskData(t, Indexed(pooled[t]), None) for t in names}
    streams = build_streams(train, names, indexed, model, d)
    # the index rides beside the collated inputs, never into a modality's collate; and no label: unlabelled samples
    # have none, and pretraining reads none
    for t, s in streams.items():
        s.collate = lambda b, t=t, inputs=model.inputs(t): (collate_task(
            t, None, {**{k: v for k, v in b.items() if k != "index"}, "label": None}, inputs)[0], b["index"])
    probs = task_probabilities(train, [len(pooled[t]) for t in names])
    ckpt, sig = CheckpointManager(out / "checkpoints", train.keep_last), signature(params)
    shown = ", ".join(f"{t} (+{n} unlabelled)" if (n := unlabelled[t]) else t for t in names)
    console.print(f"pretraining {shown} for {cfg.steps} steps on {d.device.type}, masking "
                  f"{cfg.mask_ratio:.0%} of each sample's tokens; AdamW: {describe_groups(groups)}")
    # window: the last 20 losses; first and last: their means after step 20 and at the end
    state = {"step": 0, "elapsed": 0.0, "first": None, "last": None, "window": []}
    found = ckpt.load_latest(lambda meta: meta.get("signature") == sig, warn=console.print)
    if found:
        objective.load_state_dict(found[0])
        saved = found[1]
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        for t, pos in saved["positions"].items():
            streams[t].position = pos
        state = saved["pretrain"]
        set_rng_state(saved["rng"])
        console.print(f"resuming from step {state['step']} of {cfg.steps}")
    per_epoch = sum(s.batches_per_epoch for s in streams.values())
    callbacks.on_start(RunInfo(total_steps=cfg.steps, step=state["step"], steps_per_epoch=max(1, per_epoch),
                               tasks=names, is_main=True, rank=0, world=1, out=out, resumed=bool(found)))
    start = time.perf_counter() - state["elapsed"]
    while state["step"] < cfg.steps:
        task = pick_task(state["step"], names, probs, train.seed)
        loss = pretrain_step(objective, optimizer, scheduler, streams[task], train, d.device)
        state["step"] += 1
        window = state["window"] = (state["window"] + [loss])[-20:]
        if state["step"] == min(20, cfg.steps):
            state["first"] = sum(window) / len(window)
        callbacks.on_step(state["step"], {task: loss}, scheduler.get_last_lr()[0])
        if state["step"] % train.eval_every == 0 or state["step"] == cfg.steps:
            state["elapsed"], state["last"] = time.perf_counter() - start, sum(window) / len(window)
            ckpt.save(state["step"], objective.state_dict(), {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "pretrain": dict(state),
                "positions": {t: s.position for t, s in streams.items()}, "rng": rng_state()}, {"signature": sig})
    elapsed = time.perf_counter() - start
    weights = {k: v for k, v in model.state_dict().items() if k.startswith(("adapters.", "backbone."))}
    atomic_write(out / "model.safetensors", lambda tmp: save_file({k: v.contiguous().cpu() for k, v in weights.items()}, tmp))
    summary = {"enabled": True, "signature": sig, "tasks": names, "unlabelled": unlabelled, "steps": state["step"],
               "seconds": round(elapsed, 1),
               "loss_first": state["first"], "loss_last": state["last"]}
    callbacks.on_end(summary)
    console.print(f"pretrained {state['step']} steps in {elapsed:.0f} s: masked-prediction loss "
                  f"{state['first']:.4f} -> {state['last']:.4f}")
    return write_summary(params, summary)


def pretrain_step(objective: MaskedPrediction, optimizer, scheduler, stream: TaskStream, train, device) -> float:
    """One optimizer step on one batch of one task, then the teacher's EMA update; returns the loss."""
    objective.train()
    inputs, index = stream.next()
    # the stream's epoch is the batch's: it moves on only when the next epoch's first batch is drawn
    seeds = sample_seeds(train.seed * 1_000_003 + stream.index, stream.epoch, index)
    loss = objective(stream.task.name, to_device(inputs, device), seeds)["loss"]
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"pretraining loss is {loss.item()}: lower pretrain.lr")
    loss.backward()
    if train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in objective.parameters() if p.requires_grad], train.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    objective.update_teacher()
    return loss.item()


def write_summary(params: Params, summary: dict) -> dict:
    """pretrain.json in pretrain.out (what `train` reads to start from it) and the metrics JSON."""
    atomic_write_text(Path(params.pretrain.out) / "pretrain.json", json.dumps(summary, indent=1))
    Path(params.pretrain.metrics).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(params.pretrain.metrics), json.dumps(summary, indent=1))
    return summary
