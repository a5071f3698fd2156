"""Entry points: the `tessera` CLI, torchrun's worker, predict, explain on files, bench."""
