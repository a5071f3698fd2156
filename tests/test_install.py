"""A clean install is consistent: pip's resolver is satisfied and every pinned library imports together."""

import importlib
import subprocess
import sys

import pytest


def test_pip_check_passes():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("module", [
    "torch", "torchvision", "torchaudio", "timm", "librosa", "soundfile", "tokenizers", "safetensors",
    "torchmetrics", "scipy", "sklearn", "prefect", "typer", "rich", "yaml", "dvc", "dvclive", "onnx",
    "onnxruntime", "pycocotools", "matplotlib", "espeakng_loader", "prefect.server.api.server",
])
def test_imports(module):
    importlib.import_module(module)


def test_torch_trio_versions_agree():
    import torch
    import torchaudio
    import torchvision

    assert (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0], torchaudio.__version__.split("+")[0]) == (
        "2.11.0", "0.26.0", "2.11.0")
