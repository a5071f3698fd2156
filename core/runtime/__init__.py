"""Processes and state: checkpoints, distributed setup, the torchrun launcher, training callbacks."""
