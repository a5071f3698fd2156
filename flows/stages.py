"""One Prefect flow per pipeline stage. Each calls the stage's plain function in core/; the flow adds logs in the
Prefect UI, artifacts, and (for training) its own torchrun process group with retries.

`tessera <stage>` and therefore every `dvc repro` stage command run these flows (`run_stage`). With PREFECT_API_URL
set, each is a tracked flow run on that server. With none set, the same flow function runs untracked: Prefect's
alternative, a temporary server per process, costs about 8 s per stage (README, "Orchestration").
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefect import flow

from core.config import load_params
from core.errors import UserError
from flows.artifacts import (publish_evaluation, publish_export, publish_metrics, publish_quarantine, run_console, tracked,
                             update_progress)


def run_stage(stage_flow, **kwargs):
    """Runs a stage flow: tracked on the configured Prefect server, else the same function untracked."""
    return stage_flow(**kwargs) if tracked() else stage_flow.fn(**kwargs)


@flow(name="generate")
def generate(params: str = "params.yaml") -> dict:
    from core.digits import generate as run
    from core.digits import write_unused_note

    p = load_params(params)
    if not p.uses_default_data():
        write_unused_note(p.generate.out, p.prepare.root)
        run_console().print(f"prepare.root is {p.prepare.root}: the default dataset is not in use, not generated")
        return {}
    counts = run(p.generate)
    run_console().print(f"wrote {p.generate.out}: " + ", ".join(f"{m} {c['train']}+{c['test']}" for m, c in counts.items()))
    return counts


@flow(name="prepare")
def prepare(params: str = "params.yaml") -> dict:
    from core.prepare import prepare as run

    metas = run(load_params(params), run_console())
    counts = {m: meta["counts"] for m, meta in metas.items()}
    publish_metrics("prepare", {f"{m}.{s}.{k}": v for m, splits in counts.items() for s, c in splits.items()
                                for k, v in c.items()}, "samples in, prepared and quarantined per modality and split")
    publish_quarantine([q for meta in metas.values() for q in meta["quarantine"]])
    return counts


def torchrun_command(params: str, nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}",
           f"--node-rank={node_rank}"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=tessera"]
    elif nnodes == 1:  # a free port, not the fixed 29500: two trainings on one machine must not collide
        cmd += ["--standalone"]
    return cmd + ["-m", "core.cli", "train", "--params", params]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG);
    torchrun passes it on to its workers."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_group(cmd: list[str], progress_file: Path) -> int:
    """Runs `cmd` in a process group of its own, streams its output to the run's log, and reports training
    progress. However this returns (exit, exception, SIGTERM from a cancelled flow run), the group is gone;
    if this process is killed outright, the group gets SIGTERM from the kernel."""
    console = run_console()
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set signal handlers
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if main else None  # -> SystemExit: `finally` runs
    def stream():
        for line in proc.stdout:
            console.print(line.rstrip(), highlight=False, markup=False)

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            update_progress(progress_file)
            time.sleep(2)
        reader.join(timeout=10)  # the last lines
        update_progress(progress_file)
        return proc.wait()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session), SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@flow(name="train")
def train(params: str = "params.yaml", nproc_per_node: int | None = None, nnodes: int = 1, node_rank: int = 0,
          rdzv_endpoint: str = "") -> dict:
    """torchrun in its own process group; a crash is retried `orchestrate.train_retries` times, each retry
    resuming from the last good checkpoint (core/train.py does that by itself). params.yaml and the prepared data
    are checked here, before any launch; a user's mistake found inside training is reported once, never retried."""
    from core.train import check_data, user_error_file

    p = load_params(params)
    check_data(p)
    user_error_file(p).unlink(missing_ok=True)
    cmd = torchrun_command(params, nproc_per_node or p.orchestrate.nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    console = run_console()
    for attempt in range(p.orchestrate.train_retries + 1):
        console.print("+ " + " ".join(cmd), highlight=False, markup=False)
        code = run_group(cmd, Path(p.train.out) / "progress.json")
        if code == 0:
            break
        if user_error_file(p).exists():  # the user's mistake: a retry would meet it again
            raise UserError(user_error_file(p).read_text())
        console.print(f"training exited with status {code} (attempt {attempt + 1} of {p.orchestrate.train_retries + 1})")
        time.sleep(1)
    else:
        raise RuntimeError(f"training failed {p.orchestrate.train_retries + 1} times; see the log above")
    summary = json.loads(Path(p.train.metrics).read_text())
    publish_metrics("train", summary["test"], f"test metrics after {summary['steps']} steps, {summary['seconds']} s")
    return summary


@flow(name="evaluate")
def evaluate(params: str = "params.yaml") -> dict:
    from core.evaluate import run

    p = load_params(params)
    metrics = run(p, run_console())
    publish_metrics("evaluate", metrics, f"every task on the {p.evaluate.split} split")
    publish_evaluation(Path(p.evaluate.out) / "eval.md")
    return metrics


@flow(name="export")
def export(params: str = "params.yaml") -> dict:
    from core.export import run

    p = load_params(params)
    metrics = run(p, run_console())
    publish_metrics("export", metrics, "parity of every exported artifact with the eager model")
    publish_export(Path(p.export.out))
    return metrics
