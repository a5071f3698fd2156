"""Starting training: torchrun in a process group of its own, its output streamed, stopped whole however the
launcher ends, and restarted after a crash (each restart resumes from the last good checkpoint). The Prefect
train flow calls this; so could any other orchestrator."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from tessera.core.errors import UserError

WORKER = "tessera.core.entry.worker"  # the module torchrun runs in each training process


def torchrun_command(params: str, nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}",
           f"--node-rank={node_rank}"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=tessera"]
    elif nnodes == 1:  # a free port, not the fixed 29500: two trainings on one machine must not collide
        cmd += ["--standalone"]
    return cmd + ["-m", WORKER, "--params", params]


# looked up here, once: the child of a process with threads (a sweep's trials) must not dlopen between fork and exec
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


class Stopped(SystemExit):
    """A signal asked this process to stop: SIGINT (Ctrl-C) or SIGTERM. A SystemExit with the shell's status,
    128 + the signal's number (130, 143), so that `finally` blocks run and nothing prints a traceback; the
    `tessera` command prints one line for it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signal = signal.Signals(signum)


def raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


def stop_on_signals() -> None:
    """From now on SIGINT and SIGTERM raise Stopped in the main thread: the stage unwinds (a training's process
    group is stopped by run_group) and `tessera` ends with one line, exit status 130 or 143."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, raise_stopped)


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG);
    torchrun passes it on to its workers."""
    _prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_group(cmd: list[str], console: Console, poll: Callable[[], None] = lambda: None, cwd: Path | None = None) -> int:
    """Runs `cmd` in a process group of its own, streams its output to `console`, and calls `poll` every 2 s (the
    flow reports training progress there). However this returns (exit, exception, SIGTERM from a cancelled flow
    run), the group is gone; if this process is killed outright, the group gets SIGTERM from the kernel."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=cwd,
                            preexec_fn=die_with_parent if sys.platform == "linux" else None)
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set signal handlers
    previous = signal.signal(signal.SIGTERM, raise_stopped) if main else None  # -> SystemExit: `finally` runs
    stopping = threading.Event()

    def stream():
        for line in proc.stdout:
            if not stopping.is_set():  # what a stopped torchrun says (SignalException, its traceback) is noise
                console.print(line.rstrip(), highlight=False, markup=False, soft_wrap=True)  # as the child wrapped it

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            poll()
            time.sleep(2)
        reader.join(timeout=10)  # the last lines
        poll()
        return proc.wait()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            stopping.set()
            stop_group(proc)
        reader.join(timeout=10)
        if not reader.is_alive():  # closed under a reading thread, it would raise there
            proc.stdout.close()


def stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session), SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def launch_training(cmd: list[str], retries: int, user_error: Path, console: Console,
                    poll: Callable[[], None] = lambda: None) -> None:
    """Runs the torchrun command `cmd`, restarting it up to `retries` times after a crash. A user's mistake that a
    worker found (left in `user_error`, since torchrun reports every failure as status 1) is raised as a
    UserError at once: a restart would meet it again."""
    user_error.unlink(missing_ok=True)
    for attempt in range(retries + 1):
        console.print("+ " + " ".join(cmd), highlight=False, markup=False)
        code = run_group(cmd, console, poll)
        if code == 0:
            return
        if user_error.exists():
            raise UserError(user_error.read_text())
        console.print(f"training exited with status {code} (attempt {attempt + 1} of {retries + 1})")
        time.sleep(1)
    raise RuntimeError(f"training failed {retries + 1} times; see the log above")
