"""The tasks one run trains: datasets, the multi-task model, metrics, explanations."""
