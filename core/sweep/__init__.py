"""`tessera sweep`: hyperparameter search over params.yaml, every trial a DVC experiment. The Prefect flow
(flows/sweep.py) asks Optuna for trials and runs them with these parts:

    plan        params.yaml's `sweep` section checked whole before any trial: the searched keys, the objective
    study       the Optuna study in its journal (sweeps/<name>/journal.log: a rerun resumes it), sampler, pruner
    workspace   git and DVC, a trial's workspace of its own, the study's lock, the trials' process groups, promote
    trials      one trial run as `dvc exp run` and recorded; resuming a study an earlier run left
    pruning     the training callback a trial's training loads (TESSERA_CALLBACKS) to report to the study
    report      reports/sweep/ (trials, importance, picture, page) and metrics/sweep.json

Training never imports this package (tests/test_layout.py: it sits above the stages); a trial's training loads
the pruning callback by name.
"""
