"""Shared core: backbone, heads, config, checkpoints; the training loop and distributed setup join it."""
