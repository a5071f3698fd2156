"""`tessera train`: joint multi-task training of the shared backbone; one process per rank under torchrun.

Each optimizer step draws `grad_accum` task batches by the schedule (round-robin, size-proportional, or
temperature-sampled), each from an endless per-task stream. The schedule and the batch order are functions
of (seed, step) and (seed, task, epoch): with the RNG states and each stream's position saved in the
checkpoint, a resumed run takes exactly the steps the interrupted one would have taken.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from rich.console import Console
from safetensors.torch import save_file
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.utils.data import DataLoader

from tessera.core.config import Params, TrainConfig
from tessera.core.data.batching import to_device
from tessera.core.data.files import atomic_write, atomic_write_bytes, atomic_write_text
from tessera.core.data.shards import ShardedSplit
from tessera.core.errors import UserError
from tessera.core.runtime.checkpoint import CheckpointManager, rng_state, set_rng_state
from tessera.core.runtime.distributed import Dist, barrier, init_distributed, parallelize
from tessera.core.runtime.sweep import ENV as TRIAL_ENV, Pruning
from tessera.core.tasks.datasets import Batches, PairedByLabel, TaskData, collate_task, epoch_order, load_task_data
from tessera.core.tasks.metrics import evaluate, headline
from tessera.core.tasks.multitask import MultiTaskModel, build_model, model_card
from tessera.modalities import REGISTRY


class TaskStream:
    """Endless batches of one task. Epoch e visits the order `epoch_order` draws from (seed, task, e) (shards
    shuffled, then samples within a bounded window), cut into global batches; rank r takes every world-th sample of
    each, so N ranks see exactly one rank's global batch. `position` = (epoch, batch) is all a resume needs."""

    def __init__(self, task: TaskData, index: int, batch_size: int, d: Dist, seed: int, collate, workers: int,
                 window: int):
        n = len(task.train)
        self.global_bs = max(d.world, min(batch_size, n) // d.world * d.world)
        self.batches_per_epoch = n // self.global_bs
        self.task, self.index, self.d, self.seed, self.collate, self.workers = task, index, d, seed, collate, workers
        self.window = window
        self.epoch, self.batch = 0, 0
        self._it = None

    def _loader(self) -> DataLoader:
        seed = self.seed * 1_000_003 + self.index * 10_007 + self.epoch
        order = epoch_order(self.task.train.starts, seed, self.window)
        batches = Batches(self.task.train, order, self.global_bs, self.batch, self.d.rank, self.d.world, self.collate)
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG, and a resumed
        # run, which starts a fresh iterator where the uninterrupted one kept its own, would then diverge.
        return DataLoader(batches, batch_size=None, num_workers=self.workers, pin_memory=self.d.device.type == "cuda",
                          generator=torch.Generator().manual_seed(seed), persistent_workers=False)

    def next(self):
        while True:
            if self._it is None:
                self._it = iter(self._loader())
            try:
                batch = next(self._it)
                self.batch += 1
                return batch
            except StopIteration:
                self.epoch, self.batch, self._it = self.epoch + 1, 0, None

    @property
    def position(self) -> list[int]:
        return [self.epoch, self.batch]

    @position.setter
    def position(self, pos) -> None:
        self.epoch, self.batch = int(pos[0]), int(pos[1])
        self._it = None


def task_probabilities(cfg: TrainConfig, sizes: list[int]) -> np.ndarray | None:
    """Sampling probabilities per task, or None for round-robin."""
    if cfg.schedule == "round_robin":
        return None
    t = 1.0 if cfg.schedule == "proportional" else cfg.temperature
    p = np.asarray(sizes, dtype=np.float64) ** (1.0 / t)
    return p / p.sum()


def pick_task(i: int, names: list[str], probs: np.ndarray | None, seed: int) -> str:
    """The task of micro-batch i: the same on every rank and after a resume (a function of seed and i alone)."""
    if probs is None:
        return names[i % len(names)]
    return names[int(np.random.default_rng([seed, i]).choice(len(names), p=probs))]


DECAYED_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as timm and CLIP make them: weight decay on the weight matrices of linear and convolution
    layers only; none on biases, norms, embeddings (positions, [CLS], queries, tokens) or the logit scale, which
    decay would pull towards zero for no reason (a scale at 0 is a temperature of 1)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, DECAYED_LAYERS)}
    groups = {True: {"params": [], "weight_decay": weight_decay}, False: {"params": [], "weight_decay": 0.0}}
    for p in model.parameters():
        if p.requires_grad:
            groups[id(p) in decayed]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def describe_groups(groups: list[dict]) -> str:
    return "; ".join(f"weight decay {g['weight_decay']:g} on {len(g['params'])} tensors "
                     f"({sum(p.numel() for p in g['params']) / 1e6:.3f}M)" for g in groups)


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


# The files a training process imports, relative to the package root (the repository's root in a checkout), and no
# others (tests/test_layout.py compares them with the worker's imports): dvc.yaml's train stage depends on exactly
# these, and a checkpoint resumes only a run of the same code. Reading inputs to predict on and drawing explanations
# (modalities/io.py, modalities/draw.py) are not among them: editing them retrains nothing.
TRAINING_CODE = ("core/__init__.py", "core/config.py", "core/errors.py", "core/modality.py",
                 "core/data/__init__.py", "core/data/batching.py", "core/data/files.py", "core/data/shards.py",
                 "core/entry/__init__.py", "core/entry/worker.py",
                 "core/nn/__init__.py", "core/nn/backbone.py", "core/nn/heads.py", "core/nn/task_model.py", "core/nn/weights.py",
                 "core/runtime/__init__.py", "core/runtime/checkpoint.py", "core/runtime/distributed.py", "core/runtime/sweep.py",
                 "core/stages/__init__.py", "core/stages/train.py",
                 "core/tasks/__init__.py", "core/tasks/datasets.py", "core/tasks/metrics.py", "core/tasks/multitask.py",
                 "modalities/__init__.py", "modalities/audio/__init__.py", "modalities/detection/__init__.py",
                 "modalities/image/__init__.py", "modalities/tabular/__init__.py", "modalities/text/__init__.py")
PACKAGE_ROOT = Path(__file__).parents[2]


def run_signature(params: Params) -> str:
    """A checkpoint resumes only a run with the same model and training settings (not `out`, `metrics`), the same
    prepared data (each modality's content key) and the same code. DVC reruns training when any of these changed,
    and `models/train` persists across reruns (for crash resume): without them, a rerun would resume the finished
    run it replaces and train nothing. A sweep's trial (TRIAL_ENV) resumes only its own checkpoints, never those
    of the run its workspace was made from."""
    train = params.train.model_dump(exclude={"out", "metrics", "eval_every", "patience", "keep_last", "num_workers"})
    prepared = Path(params.prepare.out)
    data = {m: json.loads((prepared / m / "meta.json").read_text()).get("key")
            for m in sorted(set(params.train.tasks) | set(params.train.align)) if (prepared / m / "meta.json").exists()}
    files = [f for p in TRAINING_CODE for f in ([PACKAGE_ROOT / p] if p.endswith(".py") else sorted((PACKAGE_ROOT / p).rglob("*.py")))]
    code = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    trial = os.environ.get(TRIAL_ENV, "")
    return hashlib.sha256(json.dumps([params.model.model_dump(), params.prepare.model_dump(), train, data, code, trial],
                                     sort_keys=True).encode()).hexdigest()[:16]


def read_logs(folder: Path) -> dict[str, str]:
    """DVCLive's files under `folder` as {relative path: text}. Each checkpoint stores them: DVCLive appends to its
    TSVs and rewrites metrics.json in place, so a kill leaves them ahead of the checkpoint, or cut mid-write."""
    return {str(f.relative_to(folder)): f.read_text() for f in sorted(folder.rglob("*")) if f.is_file()}


def restore_logs(folder: Path, files: dict[str, str]) -> None:
    """Puts DVCLive's files back as a checkpoint stored them, so the resumed run logs on from that step."""
    shutil.rmtree(folder, ignore_errors=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / name, text)


def user_error_file(params: Params) -> Path:
    """Where a training process leaves the message of a user's mistake it found (torchrun reports every failure
    as exit status 1), so that the launcher reports it once and does not retry it."""
    return Path(params.train.out) / "user_error.txt"


def check_data(params: Params) -> None:
    """What training needs of the prepared data, checked from meta.json files and label tensors before any process
    starts, so that a mistake stops with one message and no torchrun traceback: every task and aligned modality
    prepared, with training and validation samples, and the align pair's classes the same on both sides."""
    cfg, prepared = params.train, Path(params.prepare.out)
    metas = {}
    for m in dict.fromkeys([*cfg.tasks, *cfg.align]):
        role = "train.tasks" if m in cfg.tasks else "train.align"
        if not (prepared / m / "meta.json").exists():
            fix = f"add prepare.sources.{m} and run `tessera prepare`, or remove {m} from {role}"
            raise UserError(f"{role} names {m}, but {prepared / m} holds no prepared data: {fix}")
        metas[m] = json.loads((prepared / m / "meta.json").read_text())
        counts = {s: c["prepared"] for s, c in metas[m]["counts"].items()}
        for split, fix in (("train", "add data"), ("val", "raise prepare.val_fraction, or add `val` rows where a "
                                                            "manifest has a split column")):
            if counts[split] == 0:
                raise UserError(f"{role} names {m}, but its {split} split is empty ({counts}; quarantined samples in "
                                f"{prepared / 'quarantine.jsonl'}): {fix}")
    if cfg.align:
        a, b = cfg.align
        if metas[a]["classes"] != metas[b]["classes"]:
            raise UserError(f"train.align [{a}, {b}]: pairs are matched by label, but the classes differ ({a}: "
                            f"{metas[a]['classes']}; {b}: {metas[b]['classes']}); give both the same classes, "
                            "or set train.align: []")
        PairedByLabel(ShardedSplit(prepared / a, "train"), ShardedSplit(prepared / b, "train"), names=(a, b, "train"))
        if len(PairedByLabel(ShardedSplit(prepared / a, "val"), ShardedSplit(prepared / b, "val"), names=(a, b, "val"))) == 0:
            raise UserError(f"train.align [{a}, {b}]: the validation splits of {a} and {b} share no class, so alignment "
                            "cannot be validated: raise prepare.val_fraction, or add data")


def train_model(params: Params, console: Console | None = None) -> dict:
    """One training process (torchrun starts one per rank, core/entry/worker.py): every task for
    train.epochs, validating, checkpointing and stopping early; then the best weights, test metrics and the
    files the model needs go to train.out."""
    cfg = params.train
    d = init_distributed()
    console = console or Console()
    log = console.print if d.is_main else (lambda *a, **k: None)
    if cfg.batch_size % d.world:
        raise UserError(f"train.batch_size={cfg.batch_size} must be a multiple of the {d.world} processes")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    np.random.seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")

    names = list(cfg.tasks) + (["align"] if cfg.align else [])
    data = load_task_data(Path(params.prepare.out), list(cfg.tasks), tuple(cfg.align) or None, cfg.seed)
    model = build_model(params.model, Path(params.prepare.out), list(cfg.tasks), tuple(cfg.align) or None).to(d.device)
    net = parallelize(model, d, cfg.parallel, cfg.compile, bf16)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=d.device.type == "cuda")

    # A worker gathers batches from the mapped shards. On a GPU that overlaps with the step; on a CPU the worker
    # takes cores from the step's own threads (2 cores: 1 worker made steps 2x slower, with the in-memory reader).
    workers = cfg.num_workers
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) // d.world - 1)) if d.device.type == "cuda" else 0
    streams = {t: TaskStream(data[t], i, cfg.batch_size, d, cfg.seed, lambda b, t=t: collate_task(t, model.align, b), workers,
                             cfg.shuffle_buffer)
               for i, t in enumerate(names)}
    steps_per_epoch = math.ceil(sum(s.batches_per_epoch for s in streams.values()) / cfg.grad_accum)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total_steps))
    probs = task_probabilities(cfg, [len(data[t].train) for t in names])
    pruning = Pruning.from_env(d.rank)
    weights = {t: cfg.weights.get(t, 1.0) for t in names}

    out = Path(cfg.out)
    ckpt = CheckpointManager(out / "checkpoints", cfg.keep_last)
    signature = run_signature(params)
    state = {"step": 0, "best": -1.0, "bad_evals": 0, "elapsed": 0.0}
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    found = ckpt.load_latest(lambda meta: meta.get("signature") == signature, warn=log)
    if found:
        weights_sd, saved, meta = found
        set_model_state_dict(model, weights_sd, options=full)
        # A task that has not had its first step yet (a checkpoint at step 3 of five round-robin tasks) has no
        # optimizer state, as in the interrupted run: load without it, and drop the state torch makes up for it
        # (a zero-gradient step), or its first real step would count as its second
        set_optimizer_state_dict(model, optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False))
        for name, p in model.named_parameters():
            if name not in saved["optimizer"]["state"]:
                optimizer.state.pop(p, None)
        scheduler.load_state_dict(saved["scheduler"])
        for t, pos in saved["positions"].items():
            streams[t].position = pos
        state = saved["train"]
        set_rng_state(saved["rng"])
        if d.is_main:
            restore_logs(out / "dvclive", saved["logs"])
        log(f"resuming from step {state['step']} of {total_steps}")

    def save(score: float, best: bool) -> None:
        weights_sd = get_model_state_dict(model, options=full)
        opt_sd = get_optimizer_state_dict(model, optimizer, options=full)
        if d.is_main:
            ckpt.save(state["step"], weights_sd, {
                "optimizer": opt_sd, "scheduler": scheduler.state_dict(), "train": dict(state),
                "positions": {t: s.position for t, s in streams.items()}, "rng": rng_state(),
                "logs": read_logs(out / "dvclive")},
                {"signature": signature, "score": score, **model_card(model)}, best=best)
        barrier()

    live = Live(str(out / "dvclive"), resume=bool(found), save_dvc_exp=False, dvcyaml=None, report=None) if d.is_main else None
    log(f"training {', '.join(names)} for {total_steps} steps ({cfg.epochs} epochs of {steps_per_epoch}) "
        f"on {d.world} x {d.device.type}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"AdamW: {describe_groups(groups)}")
    progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not d.is_main)
    bar = progress.add_task("train", total=total_steps, completed=state["step"], info="")
    stopped, start = False, time.perf_counter() - state["elapsed"]
    val = {}
    with progress:
        while state["step"] < total_steps and not stopped:
            net.train()
            step_losses = {}
            for micro in range(cfg.grad_accum):
                task = pick_task(state["step"] * cfg.grad_accum + micro, names, probs, cfg.seed)
                inputs, targets = to_device(streams[task].next(), d.device)
                with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16):
                    losses = net(task, inputs, targets)
                (losses["loss"] * weights[task] / cfg.grad_accum).backward()
                step_losses[task] = losses["loss"].item()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            if d.is_main and (state["step"] % 10 == 0 or state["step"] == total_steps):  # for the Prefect UI
                atomic_write_text(out / "progress.json", json.dumps({"step": state["step"], "total": total_steps}))
            if live:
                for t, v in step_losses.items():
                    live.log_metric(f"train/loss_{t}", v)
                live.log_metric("train/lr", scheduler.get_last_lr()[0])
                live.next_step()
            progress.update(bar, advance=1, info=" ".join(f"{t}={v:.3f}" for t, v in step_losses.items()))
            if state["step"] % cfg.eval_every == 0 or state["step"] == total_steps:
                val = evaluate(model, data, "val", d.device, params.evaluate.batch_size)
                score = headline(val, names, model.align)
                improved = score > state["best"] + 1e-6
                state["best"], state["bad_evals"] = (score, 0) if improved else (state["best"], state["bad_evals"] + 1)
                state["elapsed"] = time.perf_counter() - start
                if live:
                    for k, v in val.items():
                        live.log_metric(f"val/{k}", v, plot=True)
                    live.log_metric("val/headline", score)
                save(score, best=improved)
                stopped = state["bad_evals"] >= cfg.patience
                if stopped:
                    log(f"early stop at step {state['step']}: no improvement in {cfg.patience} validations")
                elif pruning and pruning.should_stop(state["step"], {**val, "headline": score}):
                    stopped = True
                    log(f"pruned at step {state['step']}: the sweep's {params.sweep.pruner.kind} pruner stopped this trial")
    elapsed = time.perf_counter() - start
    return finish(params, model, ckpt, signature, data, d, elapsed, state, live, console)


def finish(params: Params, model: MultiTaskModel, ckpt: CheckpointManager, signature: str, data, d: Dist,
           elapsed: float, state: dict, live, console: Console) -> dict:
    """Best weights -> `<out>/model.safetensors` + model.json; test and validation metrics -> metrics JSON."""
    best = ckpt.load_best(lambda meta: meta.get("signature") == signature,
                          warn=console.print if d.is_main else lambda *a: None)
    if best is not None:
        set_model_state_dict(model, best[0], options=StateDictOptions(full_state_dict=True))
    test = evaluate(model, data, "test", d.device, params.evaluate.batch_size)
    val = evaluate(model, data, "val", d.device, params.evaluate.batch_size)
    val["headline"] = headline(val, list(data), model.align)
    summary = {"test": test, "val": val, "steps": state["step"], "seconds": round(elapsed, 1),
               "best_step": best[2]["step"] if best else state["step"]}
    # a collective under FSDP: every rank takes part, rank 0 writes
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        out = Path(params.train.out)
        atomic_write(out / "model.safetensors", lambda tmp: save_file({k: v.contiguous() for k, v in weights.items()}, tmp))
        for m in model.adapters:  # what the model needs besides its weights (a tokenizer), per modality
            for name in REGISTRY[m].assets:
                (out / "assets" / m).mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(out / "assets" / m / name, (Path(params.prepare.out) / m / name).read_bytes())
        atomic_write_text(out / "model.json", json.dumps(model_card(model), indent=1))
        Path(params.train.metrics).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(params.train.metrics), json.dumps(summary, indent=1))
        if live:
            live.end()
        table = Table(title=f"trained {state['step']} steps in {elapsed:.0f} s; best step {summary['best_step']}")
        for col in ("metric", "val", "test"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for k in test:
            table.add_row(k, f"{val.get(k, float('nan')):.4f}", f"{test[k]:.4f}")
        console.print(table)
    barrier()  # no rank ends before rank 0 has written: a launcher that sees its ranks end finds the files
    return summary
