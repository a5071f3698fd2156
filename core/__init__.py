"""What every modality shares, in layers; a module imports only from its own layer and those above it here
(tests/test_layout.py checks it):

    errors, stagetable a user's mistake; every flow declared once (names, commands, functions by name)
    nn/                building blocks (backbone, heads, task model, weights files)
    config             params.yaml -> typed config, every default
    data/              reading users' files, shards, batching, the default dataset
    modality           what a modality declares (modalities/<name>/ fills it in: training, inference, drawing)
    -- modalities/     the five modalities and their registries --
    tasks/             the tasks of one run: their data, the multi-task model, metrics, explanations
    runtime/           checkpoints, distributed setup, launching torchrun
    stages/            prepare, train, evaluate (+ report, explanations), export (+ model card)
    sweep/             `tessera sweep`: Optuna trials as DVC experiments (training loads its pruning callback by name)
    -- flows/          Prefect flows over the stages --
    entry/             the `tessera` CLI, torchrun's worker, predict, explain, serve, bench
"""
