"""Shared fixtures: the debug-size config the CPU tests use, and a fixed seed for every test."""

import pytest
import torch

from core.config import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cfg() -> ModelConfig:
    """debug backbone (D=64, 2 blocks, 2 heads), no dropout: small enough for seconds on two cores."""
    return ModelConfig(size="debug")
