"""`tessera train`: joint multi-task training of the shared backbone; one process per rank under torchrun.

Each optimizer step draws `grad_accum` task batches by the schedule (round-robin, size-proportional, or
temperature-sampled), each from an endless per-task stream. The schedule and the batch order are functions
of (seed, step) and (seed, task, epoch): with the RNG states and each stream's position saved in the
checkpoint, a resumed run takes exactly the steps the interrupted one would have taken.

`train_model` reads as torchtitan's loop: `build`, `restore`, then `train_step` after `train_step` with
`validate_and_checkpoint` every train.eval_every steps (early stopping is training's own rule), then `finish`. What
is not training hooks in as callbacks (core/runtime/callbacks.py) at those points: progress (core/runtime/progress.py),
DVCLive (core/runtime/dvclive_logger.py), and any named in TESSERA_CALLBACKS (a sweep's pruning).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from tessera.core.config import RECORDS, Params, TrainConfig
from tessera.core.data.batching import to_device
from tessera.core.data.files import atomic_write, atomic_write_bytes, atomic_write_text
from tessera.core.data.records import RecordsSplit
from tessera.core.data.shards import ShardedSplit
from tessera.core.errors import UserError
from tessera.core.nn.weights import read_state_dict
from tessera.core.runtime.callbacks import Callback, Callbacks, RunInfo, from_env
from tessera.core.runtime.checkpoint import CheckpointManager, rng_state, set_rng_state
from tessera.core.runtime.distributed import Dist, any_rank, barrier, init_distributed, parallelize
from tessera.core.runtime.dvclive_logger import DVCLiveLogger
from tessera.core.runtime.progress import progress_callbacks
from tessera.core.tasks.datasets import (Batches, PairedByLabel, PairedBySample, TaskData, collate_task, epoch_order,
                                        load_task_data)
from tessera.core.tasks.metrics import evaluate, headline
from tessera.core.tasks.multitask import MultiTaskModel, build_model, model_card
from tessera.modalities import REGISTRY, task_kind


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
                 "core/data/__init__.py", "core/data/batching.py", "core/data/files.py", "core/data/records.py",
                 "core/data/shards.py",
                 "core/entry/__init__.py", "core/entry/worker.py",
                 "core/kinds/__init__.py", "core/kinds/classification.py", "core/kinds/contrastive.py", "core/kinds/kind.py",
                 "core/kinds/regression.py",
                 "core/nn/__init__.py", "core/nn/backbone.py", "core/nn/fusion.py", "core/nn/heads.py", "core/nn/task_model.py",
                 "core/nn/weights.py",
                 "core/runtime/__init__.py", "core/runtime/checkpoint.py", "core/runtime/distributed.py",
                 "core/runtime/callbacks.py", "core/runtime/dvclive_logger.py", "core/runtime/progress.py",
                 "core/stages/__init__.py", "core/stages/train.py",
                 "core/tasks/__init__.py", "core/tasks/datasets.py", "core/tasks/metrics.py", "core/tasks/multitask.py",
                 "modalities/__init__.py", "modalities/audio/__init__.py", "modalities/detection/__init__.py",
                 "modalities/image/__init__.py", "modalities/tabular/__init__.py", "modalities/text/__init__.py")
PACKAGE_ROOT = Path(__file__).parents[2]


def run_signature(params: Params, callback_keys: list[str]) -> str:
    """A checkpoint resumes only a run with the same model and training settings (not `out`, `metrics`), the same
    prepared data (each modality's content key), the same code and the same callback keys. DVC reruns training when
    any of the first three changed, and `models/train` persists across reruns (for crash resume): without them, a
    rerun would resume the finished run it replaces and train nothing. A callback's key keeps its runs apart: a
    sweep's trial resumes only its own checkpoints, never those of the run its workspace was made from."""
    train = params.train.model_dump(exclude={"out", "metrics", "eval_every", "patience", "keep_last", "num_workers"})
    prepared = Path(params.prepare.out)
    data = {m: data_key(prepared / m)
            for m in sorted(set(params.train.tasks) | set(sources(params.pairs()))) if (prepared / m / "meta.json").exists()}
    code = hashlib.sha256(b"".join((PACKAGE_ROOT / f).read_bytes() for f in TRAINING_CODE)).hexdigest()
    return hashlib.sha256(json.dumps([params.model.model_dump(), params.prepare.model_dump(), train, data, code, callback_keys,
                                      pretrained_from(params)], sort_keys=True).encode()).hexdigest()[:16]


def pretrained_from(params: Params) -> str | None:
    """The signature of the pretraining run training starts from (pretrain.out's pretrain.json); None when off."""
    if not params.pretrain.enabled:
        return None
    card = Path(params.pretrain.out) / "pretrain.json"
    summary = json.loads(card.read_text()) if card.is_file() else {}
    if not summary.get("enabled"):
        raise UserError(f"params.yaml: pretrain.enabled is true, but {card} holds no pretrained model: run "
                        "`tessera pretrain` (or `dvc repro`) first, or set pretrain.enabled: false")
    return summary["signature"]


def start_from_pretrained(params: Params, model: MultiTaskModel) -> None:
    """With pretraining on, the adapters and the backbone start from pretrain.out's weights (the heads do not: the
    pretraining had none); each must be there with its shape, or the weights are another model's."""
    if pretrained_from(params) is None:
        return
    path = Path(params.pretrain.out) / "model.safetensors"
    weights, own = read_state_dict(path), model.state_dict()
    expected = {k for k in own if k.startswith(("adapters.", "backbone."))}
    wrong = sorted(k for k in expected if k not in weights or weights[k].shape != own[k].shape) + sorted(set(weights) - expected)
    if wrong:
        raise UserError(f"{path}: made for another model or other data ({len(wrong)} tensors differ, e.g. {wrong[0]}): "
                        "run `tessera pretrain` again with this params.yaml (dvc repro does)")
    model.load_state_dict(weights, strict=False)


def data_key(folder: Path) -> str | list:
    """What a prepared source is, for the run signature: a modality's content key; for records, each input's key and
    the digest of the records' index (which record has which input and class)."""
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format") != RECORDS:
        return meta.get("key")
    index = hashlib.sha256(b"".join((folder / f).read_bytes() for f in meta["splits"].values())).hexdigest()
    return [index, *(json.loads((folder / i["name"] / "meta.json").read_text()).get("key") for i in meta["inputs"])]


def user_error_file(params: Params) -> Path:
    """Where a training process leaves the message of a user's mistake it found (torchrun reports every failure
    as exit status 1), so that the launcher reports it once and does not retry it."""
    return Path(params.train.out) / "user_error.txt"


def sources(pairs: dict[str, tuple[str, str]]) -> list[str]:
    """The prepared folders contrastive tasks read: each modality, or each records source, their inputs name."""
    return list(dict.fromkeys(i.split(".")[0] for pair in pairs.values() for i in pair))


def check_data(params: Params) -> None:
    """What training needs of the prepared data, checked from meta.json files and label tensors before any process
    starts, so that a mistake stops with one message and no torchrun traceback: every task's data prepared, with
    training and validation samples; each contrastive task's pairs in both (by label: the same classes both sides)."""
    cfg, prepared, pairs = params.train, Path(params.prepare.out), params.pairs()
    for t in cfg.tasks:
        own, kind = task_kind(t, params.model).name, params.tasks[t].kind
        if kind not in (None, own):
            raise UserError(f"params.yaml: tasks.{t}.kind is {kind}, but {t}'s task is {own} (for a table, "
                            f"model.tabular.kind says which); set kind: {own}, or leave it out")
    metas = {}
    for m in dict.fromkeys([*cfg.tasks, *sources(pairs)]):
        role = "train.tasks" if m in cfg.tasks else "a contrastive task's inputs"
        if not (prepared / m / "meta.json").exists():
            fix = f"add prepare.sources.{m} and run `tessera prepare`, or remove {m} from train.tasks (or tasks)"
            raise UserError(f"{role} names {m}, but {prepared / m} holds no prepared data: {fix}")
        metas[m] = json.loads((prepared / m / "meta.json").read_text())
        counts = {s: c["prepared"] for s, c in metas[m]["counts"].items()}
        for split, fix in (("train", "add data"), ("val", "raise prepare.val_fraction, or add `val` rows where a "
                                                            "manifest has a split column")):
            if counts[split] == 0:
                raise UserError(f"{role} names {m}, but its {split} split is empty ({counts}; quarantined samples in "
                                f"{prepared / 'quarantine.jsonl'}): {fix}")
    for t, (a, b) in pairs.items():
        if "." in a:
            check_sample_pairs(t, a, b, metas[a.split(".")[0]], prepared)
            continue
        if metas[a]["classes"] != metas[b]["classes"]:
            raise UserError(f"tasks.{t} [{a}, {b}]: pairs are matched by label, but the classes differ ({a}: "
                            f"{metas[a]['classes']}; {b}: {metas[b]['classes']}); give both the same classes, "
                            f"or remove tasks.{t}")
        PairedByLabel(ShardedSplit(prepared / a, "train"), ShardedSplit(prepared / b, "train"), names=(a, b, "train"))
        if len(PairedByLabel(ShardedSplit(prepared / a, "val"), ShardedSplit(prepared / b, "val"), names=(a, b, "val"))) == 0:
            raise UserError(f"tasks.{t} [{a}, {b}]: the validation splits of {a} and {b} share no class, so alignment "
                            "cannot be validated: raise prepare.val_fraction, or add data")


def check_sample_pairs(task: str, a: str, b: str, meta: dict, prepared: Path) -> None:
    """A contrastive task over two inputs of one records source: both inputs exist, and some training and some
    validation records hold both."""
    source = a.split(".")[0]
    names = [i["name"] for i in meta["inputs"]]
    for ref in (a, b):
        if ref.split(".")[1] not in names:
            raise UserError(f"tasks.{task}.inputs names {ref}, but the records of {source} have no input "
                            f"{ref.split('.')[1]!r}; its inputs are {[f'{source}.{n}' for n in names]}")
    for split in ("train", "val"):
        if len(PairedBySample(RecordsSplit(prepared / source, split), a.split(".")[1], b.split(".")[1])) == 0:
            raise UserError(f"tasks.{task}: no {split} record of {source} holds both {a} and {b} (records lacking "
                            "either are left out of the task): add records with both, or raise prepare.val_fraction")


@dataclass
class Run:
    """One training process's pieces, made by `build`, the same on every rank. `state` is the loop's own, saved in
    each checkpoint: step (optimizer steps done), best (best validation headline), bad_evals (validations since it
    last improved), elapsed (seconds trained, across resumes)."""

    params: Params
    d: Dist
    model: MultiTaskModel  # the plain model: evaluation, checkpoints, the written weights
    net: torch.nn.Module  # the same weights as training calls them: compiled blocks, under DDP or FSDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: dict[str, TaskData]
    streams: dict[str, TaskStream]  # one per task, the contrastive ones last
    probs: np.ndarray | None  # the schedule's probability of each task; None: round-robin
    steps_per_epoch: int
    total_steps: int
    bf16: bool
    ckpt: CheckpointManager
    signature: str
    callbacks: Callbacks
    log: Callable[..., None]  # console.print on rank 0, nothing elsewhere
    # best starts below any headline: higher is better, and a regression's R² can start far below -1
    state: dict = field(default_factory=lambda: {"step": 0, "best": -math.inf, "bad_evals": 0, "elapsed": 0.0})

    @property
    def names(self) -> list[str]:
        return list(self.streams)

    def info(self, resumed: bool) -> RunInfo:
        """What the callbacks learn at the start."""
        return RunInfo(total_steps=self.total_steps, step=self.state["step"], steps_per_epoch=self.steps_per_epoch,
                       tasks=self.names, is_main=self.d.is_main, rank=self.d.rank, world=self.d.world,
                       out=Path(self.params.train.out), resumed=resumed)


# Full (unsharded) state dicts, gathered to the CPU: what a checkpoint holds, whatever the parallelism. The
# functions that take these options import torch.distributed.checkpoint themselves: its import (DTensor, sympy) costs
# ~0.5 s of CPU that every stage's process paid, the flows importing this module for check_data
FULL = dict(full_state_dict=True, cpu_offload=True)


def train_model(params: Params, console: Console | None = None, callbacks: Sequence[Callback] = ()) -> dict:
    """One training process (torchrun starts one per rank, core/entry/worker.py): every task for train.epochs,
    validating, checkpointing and stopping early; then the best weights, test metrics and the files the model
    needs go to train.out. `callbacks` join training's own and those TESSERA_CALLBACKS names."""
    console = console or Console()
    run = build(params, console, callbacks)
    resumed = restore(run)
    run.callbacks.on_start(run.info(resumed))
    start, stop = time.perf_counter() - run.state["elapsed"], False
    while run.state["step"] < run.total_steps and not stop:
        losses = train_step(run)
        run.callbacks.on_step(run.state["step"], losses, run.scheduler.get_last_lr()[0])
        if run.state["step"] % params.train.eval_every == 0 or run.state["step"] == run.total_steps:
            stop = validate_and_checkpoint(run, start)
    return finish(run, time.perf_counter() - start, console)


def build(params: Params, console: Console, extra: Sequence[Callback]) -> Run:
    """The process group, callbacks, seeds, data, model, optimizer, schedule and task streams of a fresh run."""
    cfg, out = params.train, Path(params.train.out)
    d = init_distributed()
    if cfg.batch_size % d.world:
        raise UserError(f"train.batch_size={cfg.batch_size} must be a multiple of the {d.world} processes")
    # made before seeding, so that whatever a callback's factory draws from the global generators changes no weight
    callbacks = Callbacks([*progress_callbacks(console, out), DVCLiveLogger(out / "dvclive", console),
                           *from_env(params), *extra])
    seed(cfg)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
    pairs = params.pairs()
    names = list(cfg.tasks) + list(pairs)
    data = load_task_data(Path(params.prepare.out), list(cfg.tasks), pairs, cfg.seed)
    model = build_model(params.model, Path(params.prepare.out), list(cfg.tasks), pairs, cfg.modality_dropout)
    start_from_pretrained(params, model)
    model.to(d.device)
    net = parallelize(model, d, cfg.parallel, cfg.compile, bf16)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=d.device.type == "cuda")
    streams = build_streams(cfg, names, data, model, d)
    steps_per_epoch = math.ceil(sum(s.batches_per_epoch for s in streams.values()) / cfg.grad_accum)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total_steps))
    probs = task_probabilities(cfg, [len(data[t].train) for t in names])
    log = console.print if d.is_main else (lambda *a, **k: None)
    log(f"training {', '.join(names)} for {total_steps} steps ({cfg.epochs} epochs of {steps_per_epoch}) "
        f"on {d.world} x {d.device.type}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"AdamW: {describe_groups(groups)}")
    return Run(params, d, model, net, optimizer, scheduler, data, streams, probs, steps_per_epoch, total_steps, bf16,
               CheckpointManager(out / "checkpoints", cfg.keep_last), run_signature(params, callbacks.keys), callbacks, log)


def seed(cfg: TrainConfig) -> None:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    np.random.seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def build_streams(cfg: TrainConfig, names: list[str], data: dict[str, TaskData], model: MultiTaskModel,
                  d: Dist) -> dict[str, TaskStream]:
    # A worker gathers batches from the mapped shards. On a GPU that overlaps with the step; on a CPU the worker
    # takes cores from the step's own threads (2 cores: 1 worker made steps 2x slower, with the in-memory reader).
    workers = cfg.num_workers
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) // d.world - 1)) if d.device.type == "cuda" else 0
    return {t: TaskStream(data[t], i, cfg.batch_size, d, cfg.seed,
                          lambda b, t=t, inputs=model.inputs(t), sides=model.sides(t): collate_task(t, sides, b, inputs),
                          workers, cfg.shuffle_buffer)
            for i, t in enumerate(names)}


def restore(run: Run) -> bool:
    """Takes up the newest readable checkpoint of this run's signature, if there is one (True): weights, optimizer,
    scheduler, the loop's state, each stream's position, the RNG states and the callbacks' states."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    found = run.ckpt.load_latest(lambda meta: meta.get("signature") == run.signature, warn=run.log)
    if not found:
        return False
    weights, saved, _ = found
    set_model_state_dict(run.model, weights, options=StateDictOptions(**FULL))
    # A task that has not had its first step yet (a checkpoint at step 3 of five round-robin tasks) has no
    # optimizer state, as in the interrupted run: load without it, and drop the state torch makes up for it
    # (a zero-gradient step), or its first real step would count as its second
    set_optimizer_state_dict(run.model, run.optimizer, saved["optimizer"],
                             options=StateDictOptions(**FULL, strict=False))
    for name, p in run.model.named_parameters():
        if name not in saved["optimizer"]["state"]:
            run.optimizer.state.pop(p, None)
    run.scheduler.load_state_dict(saved["scheduler"])
    for t, pos in saved["positions"].items():
        run.streams[t].position = pos
    run.state = saved["train"]
    set_rng_state(saved["rng"])
    run.callbacks.load_state_dict(saved["callbacks"])
    run.log(f"resuming from step {run.state['step']} of {run.total_steps}")
    return True


def train_step(run: Run) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches, each of the task the schedule picks for it; returns
    the loss of each task drawn (of its last micro-batch, on this rank)."""
    cfg, step = run.params.train, run.state["step"]
    run.net.train()
    losses = {}
    for micro in range(cfg.grad_accum):
        task = pick_task(step * cfg.grad_accum + micro, run.names, run.probs, cfg.seed)
        inputs, targets = to_device(run.streams[task].next(), run.d.device)
        with torch.autocast(run.d.device.type, dtype=torch.bfloat16, enabled=run.bf16):
            loss = run.net(task, inputs, targets)["loss"]
        (loss * cfg.weights.get(task, 1.0) / cfg.grad_accum).backward()
        losses[task] = loss.item()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state["step"] += 1
    return losses


def validate_and_checkpoint(run: Run, start: float) -> bool:
    """Validates at this step, tells the callbacks, saves a checkpoint (the best, if the headline improved) and
    says whether to stop: early (train.patience validations without improvement) or because a callback asked to
    on some rank. `start`: perf_counter() when the run would have started, had it never been interrupted."""
    state, patience = run.state, run.params.train.patience
    val = evaluate(run.model, run.data, "val", run.d.device, run.params.evaluate.batch_size)
    score = headline(val, list(run.params.train.tasks), run.params.pairs(), run.model.cfg)
    improved = score > state["best"] + 1e-6
    state["best"], state["bad_evals"] = (score, 0) if improved else (state["best"], state["bad_evals"] + 1)
    state["elapsed"] = time.perf_counter() - start
    asked = any_rank(run.callbacks.on_validation(state["step"], {**val, "headline": score}), run.d)
    save_checkpoint(run, score, best=improved)
    if state["bad_evals"] >= patience:
        run.log(f"early stop at step {state['step']}: no improvement in {patience} validations")
    elif asked:
        run.log(f"stopped at step {state['step']}: a callback asked to")
    return state["bad_evals"] >= patience or asked


def save_checkpoint(run: Run, score: float, best: bool) -> None:
    """A collective under FSDP (gathering the full state): every rank calls it, rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(**FULL)
    weights = get_model_state_dict(run.model, options=full)
    optimizer = get_optimizer_state_dict(run.model, run.optimizer, options=full)
    if run.d.is_main:
        run.ckpt.save(run.state["step"], weights, {
            "optimizer": optimizer, "scheduler": run.scheduler.state_dict(), "train": dict(run.state),
            "positions": {t: s.position for t, s in run.streams.items()}, "rng": rng_state(),
            "callbacks": run.callbacks.state_dict()},
            {"signature": run.signature, "score": score, **model_card(run.model)}, best=best)
    barrier()


def finish(run: Run, elapsed: float, console: Console) -> dict:
    """Best weights -> `<out>/model.safetensors` + model.json; test and validation metrics -> metrics JSON; the
    callbacks' `on_end` with that summary. Returns the summary."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    params, d, model = run.params, run.d, run.model
    best = run.ckpt.load_best(lambda meta: meta.get("signature") == run.signature, warn=run.log)
    if best is not None:
        set_model_state_dict(model, best[0], options=StateDictOptions(full_state_dict=True))
    test = evaluate(model, run.data, "test", d.device, params.evaluate.batch_size)
    val = evaluate(model, run.data, "val", d.device, params.evaluate.batch_size)
    val["headline"] = headline(val, list(params.train.tasks), params.pairs(), model.cfg)
    summary = {"test": test, "val": val, "steps": run.state["step"], "seconds": round(elapsed, 1),
               "best_step": best[2]["step"] if best else run.state["step"]}
    weights = get_model_state_dict(model, options=StateDictOptions(**FULL))  # a collective under FSDP: every rank takes part
    if d.is_main:
        write_model(params, model, weights, summary)
    run.callbacks.on_end(summary)
    if d.is_main:
        table = Table(title=f"trained {summary['steps']} steps in {elapsed:.0f} s; best step {summary['best_step']}")
        for col in ("metric", "val", "test"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for k in test:
            table.add_row(k, f"{val.get(k, float('nan')):.4f}", f"{test[k]:.4f}")
        console.print(table)
    barrier()  # no rank ends before rank 0 has written: a launcher that sees its ranks end finds the files
    return summary


def write_model(params: Params, model: MultiTaskModel, weights: dict[str, torch.Tensor], summary: dict) -> None:
    """train.out: model.safetensors, model.json, assets/<modality>/ (what the model needs besides its weights, a
    tokenizer; a records input's, of a fused or a contrastive task, in assets/<source>/<input>/); and the metrics
    JSON."""
    out = Path(params.train.out)
    atomic_write(out / "model.safetensors", lambda tmp: save_file({k: v.contiguous() for k, v in weights.items()}, tmp))
    folders = {m: m for m in model.adapters if m in REGISTRY}
    folders |= {f"{t}/{i}": m for t in model.fused for i, m in model.inputs(t).items()}
    folders |= {s["input"].replace(".", "/"): s["modality"] for pair in model.pairs.values() for s in pair if s["config"]}
    for folder, m in folders.items():
        for name in REGISTRY[m].assets:
            (out / "assets" / folder).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out / "assets" / folder / name, (Path(params.prepare.out) / folder / name).read_bytes())
    atomic_write_text(out / "model.json", json.dumps({**model_card(model), "pretrained": pretrained_from(params)}, indent=1))
    Path(params.train.metrics).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(params.train.metrics), json.dumps(summary, indent=1))
