"""Orchestration with the real things: a `prefect server` on 127.0.0.1, `tessera schedule` serving deployments,
the pipeline over real DVC, cancelling a training run, and the Prefect UI in headless Chromium."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tessera.core.runtime.launch import stop_group
from tessera.core.stagetable import STAGE_NAMES
from helpers import ROOT, copy_repo, prefect_server, processes_with, wait_for, wait_until_gone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server with its own PREFECT_HOME, for the module; yields the environment that points clients
    at it."""
    with prefect_server(tmp_path_factory.mktemp("prefect")) as env:
        yield env


@pytest.fixture(scope="module")
def served(server, dvc_repo, tmp_path_factory):
    """`tessera schedule` serving the repo's flows, the pipeline every 15 s; yields (repo, client factory)."""
    repo = copy_repo(dvc_repo, tmp_path_factory.mktemp("served") / "repo")
    # a `flows` package of the user's own in the working directory: the deployments load Tessera's by module anyway
    (repo / "flows/__init__.py").write_text("raise ImportError('the user\\'s own flows package was imported')\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["orchestrate"]["schedules"] = {"pipeline": {"interval": 15}}  # no stage reads orchestrate.*: nothing stale
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    long = {**params, "train": {**params["train"], "epochs": 500, "out": "models/long", "metrics": "metrics/long.json"}}
    (repo / "long.yaml").write_text(yaml.safe_dump(long, sort_keys=False))
    log = open(repo / "schedule.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tessera.core.entry.cli", "schedule"], cwd=repo, env=server, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with connect(server) as c:
            wait_for(lambda: {d.name for d in c.read_deployments()} == set(STAGE_NAMES), 90, "a deployment per flow")
        yield repo
    finally:
        stop_group(proc, grace=20)


@contextlib.contextmanager
def connect(server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        yield c


@pytest.fixture
def client(server):
    with connect(server) as c:
        yield c


def runs_of(client, deployment: str, state: str | None = None):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
                                 sort=FlowRunSort.START_TIME_ASC)
    return [r for r in runs if state is None or (r.state and r.state.type.value == state)]


def artifacts_of(client, run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key: a for a in found}


def flow_runs_named(client, name: str, state: str = "COMPLETED"):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    return [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
            if r.state and r.state.type.value == state]


def test_scheduled_pipeline_does_nothing_when_up_to_date_then_reruns_only_what_a_change_made_stale(served, client):
    first = wait_for(lambda: runs_of(client, "pipeline", "COMPLETED"), 150, "a scheduled pipeline run")[0]
    found = artifacts_of(client, first.id)
    assert "up to date" in found["pipeline-summary"].data
    assert any(row["metric"] == "accuracy" for row in json.loads(found["pipeline-metrics"].data))

    params = yaml.safe_load((served / "params.yaml").read_text())
    params["evaluate"]["split"] = "val"
    (served / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed_at = time.time()

    def rerun():
        for run in runs_of(client, "pipeline", "COMPLETED"):
            if run.start_time.timestamp() > changed_at:
                return run
    second = wait_for(rerun, 240, "a pipeline run after the change")
    assert "ran evaluate, export" in artifacts_of(client, second.id)["pipeline-summary"].data
    # each stage ran as its own tracked flow, with its artifacts
    evaluation = artifacts_of(client, flow_runs_named(client, "evaluate")[-1].id)
    assert "evaluate-metrics" in evaluation and "confusion matrix" in evaluation["evaluation-report"].data
    assert "data:image/png;base64," in evaluation["evaluation-report"].data
    exported = artifacts_of(client, flow_runs_named(client, "export")[-1].id)
    assert exported["exported-models"].data.startswith("[exported models") and "model-card" in exported
    assert not flow_runs_named(client, "train")  # nothing upstream of evaluate ran


def test_cancelling_a_training_run_leaves_no_torchrun_process(served, client):
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    marker = "long.yaml"
    run = run_deployment("train/train", parameters={"params": "long.yaml"}, timeout=0)
    wait_for(lambda: len(processes_with(f"--params {marker}")) >= 2, 120, "torchrun and its worker")
    wait_for(lambda: "training-progress" in artifacts_of(client, run.id), 60, "a training progress artifact")
    client.set_flow_run_state(run.id, Cancelling(), force=True)
    wait_for(lambda: client.read_flow_run(run.id).state.type.value == "CANCELLED", 90, "the run to be cancelled")
    assert wait_until_gone(f"--params {marker}", 30) == []


def test_ui_shows_the_pipeline_run_completed_with_its_metrics_artifact(served, client, server, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium")
    assert browser_path, "Debian's chromium is needed: apt-get install chromium (.ci/run does)"
    run = wait_for(lambda: runs_of(client, "pipeline", "COMPLETED"), 150, "a completed pipeline run")[-1]
    ui = server["PREFECT_API_URL"].removesuffix("/api")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])  # a fresh profile: Playwright's own
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{ui}/runs/flow-run/{run.id}?tab=Artifacts")  # the page keeps its open tab in the URL
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            metrics = page.get_by_text("pipeline-metrics").first
            try:
                metrics.wait_for(timeout=10_000)
            except PlaywrightTimeout:  # the tab by hand: the last "Artifacts" on the page (the first is the sidebar's)
                page.get_by_text("Artifacts", exact=True).last.click()
                metrics.wait_for(timeout=30_000)
        finally:
            page.screenshot(path=str(tmp_path / "flow-run.png"))
            browser.close()


@pytest.mark.slow
def test_a_pipeline_run_on_a_work_pool_holds_each_stage_run_with_its_units_and_trainings_progress(dvc_repo, tmp_path):
    """What a team runs beyond one process, and what it sees of it. A work pool on the server, a worker polling it,
    the deployments that `tessera deploy` registers; a triggered pipeline run after a change to training executes on
    the worker, in the repository. Its run graph: generate, prepare and pretrain are tasks Skipped; train,
    evaluate and export each a flow run whose parent is the pipeline's task of that stage, with a task per unit of
    work; training's progress artifact moves while it runs, and its validations are a table. A server of its own:
    the run is the only one on it, and on the module's `tessera schedule` serves deployments of the same names.
    With TESSERA_SCREENSHOTS set, the run's page (its graph) is saved as benchmarks/pipeline_run_graph.png."""
    repo = copy_repo(dvc_repo, tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # a new run (its signature; keys pretraining does not read), validating often; long enough (~260 steps, 6
    # validations, several seconds while the flow polls every 2 s) that the test, which polls the progress artifact,
    # sees it part-way: at 1 epoch it could see only the end
    params["train"].update(epochs=3, eval_every=40)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "prefect").mkdir()
    with prefect_server(tmp_path / "prefect") as server, connect(server) as client:
        subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "tessera-process", "--type", "process"],
                       env=server, check=True, capture_output=True)
        deployed = subprocess.run([sys.executable, "-m", "tessera.core.entry.cli", "deploy", "--pool", "tessera-process"],
                                  cwd=repo, env=server, capture_output=True, text=True)
        assert deployed.returncode == 0 and "deployed pipeline/pipeline to work pool tessera-process" in deployed.stdout, \
            deployed.stdout + deployed.stderr
        log = open(tmp_path / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "tessera-process"],
                                  cwd=tmp_path, env=server, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            from prefect.deployments import run_deployment
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
                run = run_deployment("pipeline/pipeline", timeout=0)
            progress, deadline = set(), time.time() + 600  # the values the progress artifact showed while it ran
            while not (run := client.read_flow_run(run.id)).state.is_final() and time.time() < deadline:
                progress |= {a.data for a in artifacts_keyed(client, "training-progress")}
                time.sleep(0.5)
        finally:
            stop_group(worker, grace=20)
        assert run.state.is_completed(), (tmp_path / "worker.log").read_text()[-3000:]
        assert "ran train, evaluate, export" in artifacts_of(client, run.id)["pipeline-summary"].data
        assert json.loads((repo / "metrics/eval.json").read_text())  # written in the repository: the working dir
        stages = {t.name: t for t in task_runs_of(client, run.id)}
        assert sorted(stages, key=lambda s: stages[s].start_time) == ["generate", "prepare", "pretrain", "train", "evaluate",
                                                                       "export"]
        assert [stages[s].state.name for s in ("generate", "prepare", "pretrain")] == ["Skipped"] * 3
        for stage in ("train", "evaluate", "export"):
            (child,) = client.read_flow_runs(flow_filter=flow_named(stage))
            assert child.parent_task_run_id == stages[stage].id and child.state.is_completed(), stage
            assert stages[stage].state.name == "Completed"
            units = {t.name for t in task_runs_of(client, child.id)}
            assert {"train": {"torchrun"}, "evaluate": {"metrics image", "metrics align", "explain text", "report",
                                                        "deletion curves"},
                    "export": {"export image pt2", "export image onnx", "export align_audio safetensors"}}[stage] <= units, units
        assert len(progress) >= 2 and min(progress) < 100, progress
        (validations,) = artifacts_keyed(client, "training-validation")
        rows = json.loads(validations.data)
        assert len(rows) >= 2 and rows[0]["step"] == 40 and "headline" in rows[0]
        if os.environ.get("TESSERA_SCREENSHOTS"):
            screenshot(f"{server['PREFECT_API_URL'].removesuffix('/api')}/runs/flow-run/{run.id}",
                       ROOT / "benchmarks/pipeline_run_graph.png")


def test_the_kubernetes_job_template_is_accepted_by_the_server(server, client):
    """flows/cluster/kubernetes.json as a Kubernetes work pool's base job template: the server stores it, takes a
    deployment whose job variables fit its schema, and refuses one whose do not."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError

    from tessera.flows.pipeline import pipeline

    template = json.loads((ROOT / "flows/cluster/kubernetes.json").read_text())
    client.create_work_pool(WorkPoolCreate(name="gpu-cluster", type="kubernetes", base_job_template=template))
    assert client.read_work_pool("gpu-cluster").base_job_template == template
    flow_id = client.create_flow_from_name(pipeline.name)
    ok = client.create_deployment(flow_id, "on-the-cluster", work_pool_name="gpu-cluster", job_variables={"gpus": 4},
                                  entrypoint="tessera.flows.pipeline.pipeline")
    assert client.read_deployment(ok).job_variables == {"gpus": 4}
    with pytest.raises(PrefectHTTPStatusError, match="422|gpus"):
        client.create_deployment(flow_id, "wrong", work_pool_name="gpu-cluster", job_variables={"gpus": "eight"},
                                 entrypoint="tessera.flows.pipeline.pipeline")


def test_a_format_that_fails_parity_is_red_on_its_own_unit_while_the_others_run_and_complete(run, tmp_path):
    """`tessera export`, tracked, with export.atol under ONNX Runtime's float differences (~1e-7) and over
    safetensors' 0.0: each unit `export <task> <format>` whose figures fail is Failed with the message the CLI
    prints for it, every other unit runs and is Completed, and the command ends with one line naming every failure,
    exit status 2, no traceback. The export goes to tmp_path: the `run` fixture's stays as the other tests read it."""
    from tessera.core.stages.export import FORMATS, parity_failure, parity_message

    atol, metrics = 1e-12, str(tmp_path / "export.json")
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["export"].update(out=str(tmp_path / "export"), metrics=metrics, atol=atol)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with prefect_server(tmp_path / "prefect") as server, connect(server) as client:
        result = subprocess.run([sys.executable, "-m", "tessera.core.entry.cli", "export", "-p", str(tmp_path / "params.yaml")],
                                env=server, capture_output=True, text=True)
        (flow_run,) = client.read_flow_runs(flow_filter=flow_named("export"))
        units = {t.name: t for t in task_runs_of(client, flow_run.id)}
    figures = json.loads(Path(metrics).read_text())  # every unit's, a failed one's too
    tasks = [k.removesuffix(".samples") for k in figures if k.endswith(".samples")]
    failures = {f"export {t} {f}": parity_failure(t, f, figures, atol) for t in tasks for f in FORMATS}
    failures = {name: failure for name, failure in failures.items() if failure}
    assert "export image onnx" in failures and "export image safetensors" not in failures, failures  # what it tests
    assert set(units) == {f"export {t} {f}" for t in tasks for f in FORMATS}
    for name, unit in units.items():
        if name in failures:
            assert unit.state.name == "Failed" and unit.state.message.endswith(parity_message([failures[name]], metrics))
        else:
            assert unit.state.name == "Completed", (name, unit.state)
    assert flow_run.state.name == "Failed"
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert result.stderr.splitlines()[-1] == "error: " + parity_message(list(failures.values()), metrics)


def flow_named(name: str):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    return FlowFilter(name=FlowFilterName(any_=[name]))


def task_runs_of(client, flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def artifacts_keyed(client, key: str) -> list:
    """The latest version of the artifact `key` (a list of one), or [] before it exists."""
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    return client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key])))


def screenshot(url: str, path: Path) -> None:
    """The page at `url` in headless Chromium once its run graph has drawn, as a PNG at `path`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            page.goto(url)
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            page.locator("canvas").first.wait_for(timeout=30_000)
            time.sleep(3)  # the graph lays its nodes out after the canvas appears
            page.screenshot(path=str(path))
        finally:
            browser.close()
