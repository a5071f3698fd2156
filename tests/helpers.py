"""What several test files share: the small generated dataset's settings, params files, running `tessera`, and a
real Prefect server."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tessera.core.config import GenerateParams
from tessera.core.runtime.launch import stop_group

ROOT = Path(__file__).resolve().parents[1]
SMALL = GenerateParams(seed=5, languages=("en",), train_voices=("", "+m3", "+f2"), test_voices=("+m6",),
                       text_per_split=(120, 20), detection_per_split=(24, 8), records_per_split=(60, 20))


def merge(base: dict, override: dict) -> dict:
    return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in override.items()}}


def small_model(**overrides) -> dict:
    """params.yaml's `model` section at the size the tests train in seconds on two CPU cores: the debug backbone
    narrowed to D=32 (2 blocks, 2 heads), no dropout, 8 px digits, 16-token texts, 32 mel bands, 32 px canvases.
    `overrides` merge in key by key (`small_model(depth=1, detection={"num_queries": 4})`)."""
    return merge({"size": "debug", "embed_dim": 32, "depth": 2, "num_heads": 2,
                  "image": {"img_size": 8, "patch_size": 4}, "text": {"vocab_size": 300, "max_len": 16},
                  "audio": {"n_mels": 32, "patch_size": 16, "max_frames": 128},
                  "detection": {"img_size": 32, "patch_size": 8, "num_queries": 5, "decoder_depth": 1}}, overrides)


def write_params(data_dir: Path, out: Path, **train) -> Path:
    """A params.yaml over the `data_dir` fixture's prepared data, every output under `out`."""
    params = yaml.safe_load((data_dir / "base.yaml").read_text())
    params["train"] = {"epochs": 1, "batch_size": 16, "eval_every": 1000, "warmup_steps": 2, "num_workers": 0, "align": ["audio", "image"],
                       "out": str(out / "train"), "metrics": str(out / "metrics.json"), **train}
    params["evaluate"] = {"out": str(out / "reports"), "metrics": str(out / "eval.json")}
    params["export"] = {"out": str(out / "export"), "metrics": str(out / "export.json"), "parity_samples": 20}
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    return out / "params.yaml"


def tessera(*args, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tessera.core.entry.cli", *args], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line contains `marker` (zombies excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") \
                    and ") Z " not in (proc / "stat").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def wait_until_gone(marker: str, seconds: float = 30) -> list[int]:
    """Waits for every process with `marker` in its command line to end; returns those still alive."""
    import time

    deadline = time.time() + seconds
    while processes_with(marker) and time.time() < deadline:
        time.sleep(0.2)
    return processes_with(marker)


# the default pipeline at a size that runs end to end in about a minute on two cores
TINY = {
    "generate": {"languages": ["en"], "train_voices": ["", "+m3"], "test_voices": ["+f2"], "audio_takes": 1,
                 "text_per_split": [60, 10], "detection_per_split": [16, 4], "records_per_split": [40, 10]},
    "model": small_model(depth=1, detection={"num_queries": 4}),
    "train": {"epochs": 1, "batch_size": 16, "eval_every": 1000, "num_workers": 0},
    "export": {"parity_samples": 8},
}


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    """Runs a command to success (one thread per process: the tests run several at once), returns its output."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def copy_repo(repo: Path, to: Path) -> Path:
    """A copy of a git + DVC workspace (its DVC cache included) that a test may change."""
    shutil.copytree(repo, to, symlinks=True)
    return to


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, seconds: float, what: str, every: float = 1.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@contextlib.contextmanager
def prefect_server(home: Path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_UI_API_URL": api,  # the UI would otherwise ask 127.0.0.1:4200 for its API
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_PROFILE": "local", "OMP_NUM_THREADS": "1"}
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy():
        try:
            return urllib.request.urlopen(f"{api}/health", timeout=2).status == 200
        except OSError:
            return False
    try:
        wait_for(healthy, 90, "the Prefect server")
        yield env
    finally:
        stop_group(proc, grace=20)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels in a few hundred bytes: its IDAT holds one compressed row."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
                     + chunk(b"IEND", b""))
    return path
