"""Every flow Tessera runs, declared once: the pipeline's stages in dvc.yaml's order, then the two flows that drive
them (the pipeline and the sweep).

From this table come the Prefect flows (flows/stages.py), their deployments and the names `orchestrate.schedules`
takes (flows/schedule.py), and the `tessera` commands (core/entry/cli.py). dvc.yaml's stages are its `dvc` rows, in
order, each run by its command (tests/test_layout.py holds them equal).

It imports nothing: `tessera --help` reads it without loading Prefect or the stages. Functions are therefore named
as a package's entry points are, "module:attribute", and imported only when a flow is built or run. Training does
not import it either, so that an edit here never makes `dvc repro` retrain.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """A keyword argument of a flow beyond `params`, and the option `--<name>` of its command."""

    name: str
    type: type
    default: object
    help: str


@dataclass(frozen=True)
class Stage:
    name: str
    """The Prefect flow, its deployment, its key in orchestrate.schedules and, for a `dvc` row, the DVC stage"""
    help: str
    """What it does: the command's help and the flow's description"""
    section: str | None
    """The params.yaml section it reads (`tessera params <section>`); None: it takes no params.yaml"""
    run: str = ""
    """The plain function, called as run(params: Params, console, unit) -> dict (unit: core/units.py); the flow
    returns that dict"""
    publish: str = ""
    """What the flow shows in the Prefect UI beyond its log, called as publish(params, run's dict); "": nothing"""
    flow: str = ""
    """Instead of `run` and `publish`: a flow of its own (training under torchrun, the pipeline, the sweep)"""
    options: tuple[Option, ...] = ()
    command: str = ""
    """`tessera <command>`, when it is not the name (a group's subcommand: "data generate")"""
    dvc: bool = True
    """A dvc.yaml stage, whose `cmd` is `tessera <command>`"""
    cli: bool = True
    """False: core/entry/cli.py writes the command itself (the sweep checks the repository before Prefect starts)"""

    @property
    def words(self) -> list[str]:
        return (self.command or self.name).split()


TORCHRUN = (
    Option("nproc_per_node", int, None, "processes on this machine (one per GPU); default: orchestrate.nproc_per_node"),
    Option("nnodes", int, 1, "machines taking part (torchrun --nnodes)"),
    Option("node_rank", int, 0, "this machine's rank among them (torchrun --node-rank)"),
    Option("rdzv_endpoint", str, "", "host:port every machine can reach, for multi-node rendezvous"),
)

STAGES = (
    Stage("generate", "Write the trimodal digits dataset (images, speech, sentences, detection canvases) to generate.out.",
          "generate", run="tessera.core.data.digits:generate_default_data", command="data generate"),
    Stage("prepare", "Check every sample, quarantine bad ones, and write model-ready shards (cached by content hash).",
          "prepare", run="tessera.core.stages.prepare:prepare_data", publish="tessera.flows.stages:publish_prepared"),
    Stage("pretrain", "Pretrain the adapters and the shared backbone on every task's training inputs, labels unused "
          "(masked prediction of an EMA teacher's states), when pretrain.enabled; `train` then starts from them.",
          "pretrain", run="tessera.core.stages.pretrain:pretrain_model", publish="tessera.flows.stages:publish_pretrained"),
    Stage("train", "Train every configured task at once on the shared backbone, under torchrun; resumes from the "
          "latest good checkpoint, and restarts a crashed run (orchestrate.train_retries).",
          "train", flow="tessera.flows.stages:train", options=TORCHRUN),
    Stage("evaluate", "Report the trained model on the held-out split: metrics JSON, DVC plots, PNGs and reports/eval.md.",
          "evaluate", run="tessera.core.stages.evaluate:evaluate_model", publish="tessera.flows.stages:publish_evaluated"),
    Stage("export", "Export every task as ONNX, torch.export and safetensors; fail unless each matches the eager model.",
          "export", run="tessera.core.stages.export:export_models", publish="tessera.flows.stages:publish_exported"),
    Stage("pipeline", 'Run the stages DVC finds stale (all of them on a fresh clone), as one Prefect flow; "up to date" '
          "if none.", None, flow="tessera.flows.pipeline:pipeline", dvc=False),
    Stage("sweep", "Hyperparameter search as params.yaml's `sweep` section says: Optuna proposes trials, each runs the "
          "pipeline as a DVC experiment (`dvc exp show` lists them), pruned early where its validation lags; rerunning "
          "resumes. Tracked on the configured Prefect server, else on a temporary one.",
          "sweep", flow="tessera.flows.sweep:sweep", dvc=False, cli=False),
)

STAGE_NAMES = tuple(s.name for s in STAGES)  # also the keys orchestrate.schedules takes


def stage_named(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)
