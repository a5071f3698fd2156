"""What a flow run shows in the Prefect UI: its log lines, metric tables, the evaluation report, a link to the
exported models, and training progress. Outside a flow run (no server configured) each of these is a no-op,
and the log goes to the terminal."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

from prefect.context import FlowRunContext
from rich.console import Console


def tracked() -> bool:
    """True when a Prefect server is configured (PREFECT_API_URL, or a profile's api.url)."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def in_run() -> bool:
    return FlowRunContext.get() is not None


class _LogLines(io.TextIOBase):
    """A file whose complete lines go to the flow run's logger (and so to the UI)."""

    def __init__(self, logger):
        self.logger, self.buffer = logger, ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(text)


def run_console() -> Console:
    """A console for the stage's output: the run's log inside a flow run, else the terminal."""
    if in_run():
        from prefect import get_run_logger

        return Console(file=_LogLines(get_run_logger()), width=120, soft_wrap=True)
    return Console()


def publish_metrics(stage: str, metrics: dict, description: str) -> None:
    """A table artifact, key `<stage>-metrics`: one row per metric, grouped by task."""
    if not in_run():
        return
    from prefect.artifacts import create_table_artifact

    rows = [{"task": k.split(".", 1)[0], "metric": k.split(".", 1)[-1], "value": round(v, 4) if isinstance(v, float) else v}
            for k, v in metrics.items()]
    create_table_artifact(rows, key=f"{stage}-metrics", description=description)


def publish_quarantine(rows: list[dict], limit: int = 500) -> None:
    """The quarantined samples (path, modality, reason) as a table artifact; the full list is quarantine.jsonl."""
    if not in_run() or not rows:
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(rows[:limit], key="quarantine",
                          description=f"{len(rows)} samples quarantined" + (f"; the first {limit}" if len(rows) > limit else ""))


def inline_images(markdown: str, folder: Path) -> str:
    """Local image links -> data URIs, so that the UI shows the pictures without access to this machine's files."""
    def inline(m: re.Match) -> str:
        path = folder / m.group(2)
        if not path.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
    return re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", inline, markdown)


def publish_evaluation(report: Path) -> None:
    if not in_run() or not report.is_file():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(inline_images(report.read_text(), report.parent), key="evaluation-report",
                             description="per-task metrics, confusion matrices and precision-recall curves")


def publish_export(folder: Path) -> None:
    if not in_run():
        return
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    create_link_artifact(folder.resolve().as_uri(), link_text=f"exported models: {folder}", key="exported-models",
                         description="ONNX, torch.export and safetensors per task")
    if (folder / "README.md").is_file():
        create_markdown_artifact((folder / "README.md").read_text(), key="model-card")


_progress: dict[str, dict] = {}


def report_progress(key: str, percent: float, description: str) -> None:
    """A progress artifact `key` (a bar in the UI): created on the first call of a run, updated after."""
    if not in_run():
        return
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    seen = _progress.setdefault(key, {})
    if "id" not in seen:
        seen["id"] = create_progress_artifact(percent, key=key, description=description)
    elif percent != seen.get("percent"):
        update_progress_artifact(seen["id"], percent)
    seen["percent"] = percent


def update_progress(folder: Path) -> None:
    """Training's progress as the run's artifacts, from the files core/runtime/progress.py writes in `folder`
    (train.out): progress.json (step, total) as a progress bar, validation.json (each validation's metrics) as a
    table with a row per validation, republished under its key when a validation was added."""
    if not in_run():
        return
    progress, validations = read_json(folder / "progress.json"), read_json(folder / "validation.json")
    if progress:
        report_progress("training-progress", 100.0 * progress["step"] / max(1, progress["total"]), "optimizer steps done")
    if validations and len(validations) != _progress.get("training-validation", {}).get("rows"):
        from prefect.artifacts import create_table_artifact

        rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in validations]
        create_table_artifact(rows, key="training-validation",
                              description="validation metrics as training goes: a row per validation")
        _progress["training-validation"] = {"rows": len(validations)}


def read_json(path: Path):
    """The file's JSON; None when it does not exist yet (replaced atomically, it is never half written)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
